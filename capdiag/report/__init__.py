"""Sinks for findings: console text, JSON, HTML and TensorBoard (each imported only when used)."""
