"""Shared fixtures. tests/ is on sys.path (pytest rootdir-relative import), so `import zoo` works."""
from __future__ import annotations

import pytest
import torch

from capdiag.testing import zoo

torch.set_num_threads(2)

# torchvision's model builders import torch._dynamo, whose _inductor test operators register a
# TORCH_LIBRARY namespace in C++. pytester's in-process runs restore sys.modules afterwards, so a first
# import inside one of them is undone in Python but not in C++, and the next run's import fails
# ("Only a single TORCH_LIBRARY can be used ..."). Importing it once here keeps it out of that churn.
import torch._dynamo  # noqa: E402,F401


@pytest.fixture
def zoo_subject():
    """Factory: zoo_subject(arch, bug) -> Subject on CPU over synthetic data."""
    import capdiag

    def make(arch="transformer", bug=None, **kw):
        return capdiag.subject_for(zoo.make(arch, bug), **{**zoo.HINTS, **kw})

    return make
