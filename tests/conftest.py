"""Shared fixtures. tests/ is on sys.path (pytest rootdir-relative import), so `import zoo` works."""
from __future__ import annotations

import pytest
import torch

from capdiag.models import zoo

torch.set_num_threads(2)


@pytest.fixture
def zoo_subject():
    """Factory: zoo_subject(arch, bug) -> Subject on CPU over synthetic data."""
    import capdiag

    def make(arch="transformer", bug=None, **kw):
        return capdiag.subject_for(zoo.make(arch, bug), **{**zoo.HINTS, **kw})

    return make
