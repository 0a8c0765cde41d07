"""RNG state capture for exact resume (octa3d.utils.seed)."""

import random

import numpy as np
import torch

from octa3d.utils.seed import rng_state, set_rng_state


def test_rng_state_roundtrip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
