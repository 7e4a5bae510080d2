"""Fixtures of the parity tests (tiny models against their PyTorch references)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The models here are tiny: a second thread only adds synchronisation (and, on a busy
    # 2-core machine, waits for a core).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
