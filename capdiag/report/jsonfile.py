"""Report -> a JSON file: the machine-readable form CI and scripts read (``capdiag check --json``)."""
from __future__ import annotations

import json
from pathlib import Path

from ..finding import Report


def write_json(report: Report, path) -> Path:
    """Write ``report.to_dict()`` to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2))
    return path
