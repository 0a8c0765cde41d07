"""The CPU-fast augmentation transforms against the references they replace (a 3D ``grid_sample`` of the same
affine; seeded noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from octa3d.data.augment import RandGaussianNoiseTorchd, RandPlaneAffined

def _grid_sample_3d(x: torch.Tensor, depth_axis: int, angle: float, scales) -> torch.Tensor:
    """Reference: one 3D grid_sample of the rotation about ``depth_axis`` and scaling, in pixel units."""
    shape = x.shape[1:]
    v = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape],
                                   indexing="ij"), -1) * torch.tensor(scales, dtype=torch.float64)
    a, b = [k for k in range(3) if k != depth_axis]
    src = v.clone()
    src[..., a] = np.cos(angle) * v[..., a] - np.sin(angle) * v[..., b]
    src[..., b] = np.sin(angle) * v[..., a] + np.cos(angle) * v[..., b]
    grid = torch.stack([src[..., k] * 2 / shape[k] for k in (2, 1, 0)], -1)[None].float()
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


@pytest.mark.parametrize("depth_axis", [0, 1, 2])
def test_separable_affine_equals_3d_grid_sample(depth_axis):
    x = torch.rand(2, 12, 16, 10)
    t = RandPlaneAffined("image", prob=1.0, rotate=0.5, scale=0.2, depth_axis=depth_axis)
    t.set_random_state(seed=depth_axis)
    y = t({"image": x.clone()})["image"]
    assert type(y) is torch.Tensor and y.shape == x.shape and t.angle != 0
    torch.testing.assert_close(y, _grid_sample_3d(x, depth_axis, t.angle, t.scales), atol=1e-5, rtol=0)


def test_plane_affine_2d_and_probability():
    x = torch.rand(3, 14, 9)
    t = RandPlaneAffined("image", prob=1.0, rotate=0.5, scale=0.2)
    t.set_random_state(seed=5)
    y = t({"image": x})["image"]
    ref = _grid_sample_3d(x[:, None], 0, t.angle, (1.0, *t.scales[:2]))[:, 0]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    off = RandPlaneAffined("image", prob=0.0, rotate=0.5, scale=0.2, depth_axis=1)
    assert torch.equal(off({"image": x})["image"], x)


def test_torch_noise_is_seeded_bounded_and_shared_by_keys():
    x = torch.zeros(2, 8, 8, 8)
    t = RandGaussianNoiseTorchd(["image", "other"], prob=1.0, std=0.05)
    t.set_random_state(seed=0)
    a = t({"image": x, "other": x.clone()})
    t.set_random_state(seed=0)
    b = t({"image": x, "other": x.clone()})
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], a["other"])
    assert 0 < float(a["image"].std()) <= 0.05 * 1.2 and torch.equal(x, torch.zeros_like(x))
