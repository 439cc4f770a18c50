"""Model-test settings and fixtures; helpers live in model_testkit.py."""
from __future__ import annotations

import pytest
import torch

from sinkrec.model import ARCHS

# The 2 CPU cores are shared with other jobs: with the default thread pool, spin-waiting
# threads make these tiny-tensor tests ~40x slower under load. One thread is fastest here.
torch.set_num_threads(1)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
