"""Renderers: Report -> terminal text, JSON (and, later, HTML/TensorBoard)."""
