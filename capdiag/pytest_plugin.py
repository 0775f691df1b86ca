"""pytest plugin (entry point ``pytest11``): ``pytest --capdiag path/to/model.py``.

Collects every capdiag check as its own test item named after the check, so failures read
like test failures with the finding's explanation, and ``-k``, ``-m`` and JUnit XML work as
usual. Items carry the marker ``capdiag`` plus ``capdiag_quick`` or ``capdiag_full``. The CLI's
model and check options are here as ``--capdiag-NAME`` (``capdiag.options``: one table for both):
``--capdiag-weights/-data/-tokenizer/-precision/-seed/-device/-factory/-arg/-only/-skip/-quick``. Fixtures:
``capdiag_subject`` (wrap a model object) and ``capdiag_batch`` (a synthetic batch).

This module imports only pytest, the standard library and ``capdiag.options`` (itself standard
library only) at import time: runs that do not use ``--capdiag`` pay nothing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .options import MODEL, SELECT, add_pytest


def pytest_addoption(parser):
    group = parser.getgroup("capdiag", "capdiag captioner checks")
    group.addoption("--capdiag", action="append", default=[], metavar="MODEL",
                    help="collect capdiag's checks on this model file (or module name); repeatable")
    add_pytest(group, MODEL + SELECT)  # the CLI's model and check options, as --capdiag-NAME
    group.addoption("--capdiag-out", default=None, help="folder for capdiag's plots")


def pytest_configure(config):
    config.addinivalue_line("markers", "capdiag: a capdiag check collected by --capdiag")
    config.addinivalue_line("markers", "capdiag_quick: a quick (structural) capdiag check")
    config.addinivalue_line("markers", "capdiag_full: a capdiag check that trains a copy of the model")


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so they apply to our items
def pytest_collection_modifyitems(session, config, items):
    for target in config.getoption("capdiag"):
        items.extend(CapdiagFile.from_parent(session, path=_path(config, target), target=target).collect())


def _path(config, target: str) -> Path:
    p = Path(target)
    return p.resolve() if p.exists() else Path(config.rootpath) / target.replace(".", "/")


class CapdiagFile(pytest.File):
    def __init__(self, *, target: str, **kwargs):
        super().__init__(**kwargs)
        self.target = target
        self._subject = None
        self._error = None

    def collect(self):
        from .registry import list_checks

        from .errors import CapdiagError
        from .options import selected

        try:
            from .prompted.front import declares_prompted

            chosen = set(selected(self._option, "prompted" if declares_prompted(self.target) else "captioner"))
        except CapdiagError as e:  # an unknown check name: one line, as the CLI says it
            raise pytest.UsageError(f"capdiag: {e}") from None
        for cls in list_checks():
            if cls.name not in chosen:
                continue
            item = CapdiagItem.from_parent(self, name=cls.name, check_name=cls.name)
            item.add_marker("capdiag")
            item.add_marker("capdiag_quick" if cls.cheap else "capdiag_full")
            yield item

    def subject(self):
        """Build the model and subject once per file; a loading error fails every item the same way."""
        if self._subject is None and self._error is None:
            from .errors import CapdiagError
            from .options import subject_from

            try:
                _, self._subject = subject_from(self.target, self._option, progress=False)
            except CapdiagError as e:
                self._error = str(e)
        return self._subject

    def _option(self, name: str):
        return self.config.getoption(f"capdiag_{name}")


class CapdiagFailure(Exception):
    pass


class CapdiagItem(pytest.Item):
    def __init__(self, *, check_name: str, **kwargs):
        super().__init__(**kwargs)
        self.check_name = check_name

    def runtest(self):
        from .finding import Status
        from .registry import get_check
        from .runner import run_check
        from .testing import explain

        subject = self.parent.subject()
        if subject is None:
            raise CapdiagFailure(f"capdiag could not load {self.parent.target}: {self.parent._error}")
        finding = run_check(subject, get_check(self.check_name))
        out = self.config.getoption("capdiag_out")
        if out:
            from .viz.findings import render

            finding = render(finding, Path(out))
        self.user_properties.append(("capdiag_summary", finding.summary))
        if finding.status is Status.SKIP:
            pytest.skip(finding.summary)
        if finding.status is Status.WARN:
            import warnings

            warnings.warn(explain(finding), UserWarning)
        if finding.status.failed:
            raise CapdiagFailure(explain(finding))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, CapdiagFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"capdiag: {self.check_name}"


@pytest.fixture
def capdiag_subject():
    """Factory: ``capdiag_subject(model, vocab_size=..., ...)`` -> a Subject for check functions."""
    from .api import subject_for

    return subject_for


@pytest.fixture
def capdiag_batch():
    """Factory: ``capdiag_batch(vocab_size, n=8, image_size=64, pad_id=0, bos_id=1, eos_id=2)`` ->
    (images, captions) from capdiag's synthetic data (ImageNet-normalized)."""
    from .captioner import IMAGENET_MEAN, IMAGENET_STD
    from .intake.data import SyntheticCaptions

    def make(vocab_size, n=8, image_size=64, pad_id=0, bos_id=1, eos_id=2, seed=0):
        data = SyntheticCaptions(vocab_size, pad_id, bos_id, eos_id, image_size, IMAGENET_MEAN, IMAGENET_STD)
        return data.batch(n, seed=seed)

    return make
