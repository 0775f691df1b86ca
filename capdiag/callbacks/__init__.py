"""Thin adapters of ``TrainingDiagnostics`` for training frameworks (optional extras)."""
