"""docs/benchmarks.md's tables are the benchmarks' own output: each generated block equals what its
results file (benchmarks/results/*.json, written by the benchmark's --json) renders to."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _docs():
    spec = importlib.util.spec_from_file_location("bench_docs", ROOT / "benchmarks" / "docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_blocks_match_their_results():
    docs = _docs()
    text = docs.DOC.read_text()
    names = [m.group(2) for m in docs.BLOCK.finditer(text)]
    assert {"false_alarms", "localization", "localization_clean"} <= set(names)
    assert docs.rendered(text) == text, "docs/benchmarks.md is stale: run `python benchmarks/docs.py`"


def test_a_changed_result_shows_as_stale(tmp_path, monkeypatch):
    docs = _docs()
    for f in docs.RESULTS.glob("*.json"):
        (tmp_path / f.name).write_text(f.read_text().replace('"false_locations": 0', '"false_locations": 3'))
    monkeypatch.setattr(docs, "RESULTS", tmp_path)
    text = docs.DOC.read_text()
    assert "**3 of" in docs.rendered(text) and docs.rendered(text) != text


def test_readme_and_docs_stay_short_and_linked():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 450
    for doc in ("docs/benchmarks.md", "docs/architecture.md", "docs/design.md"):
        assert doc in readme and (ROOT / doc).is_file()
