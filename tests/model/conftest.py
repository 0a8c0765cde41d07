"""Shared settings for the model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run each model test on one intra-op thread.

    These tests run many small convolutions. On a shared 2-core machine, two OpenMP threads that wait for each
    other at every parallel region made single steps up to 40 times slower (0.2 s → 8 s per AE step) whenever
    another process held a core; with one thread the cost is steady and about the same when the machine is idle.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
