"""History CSV, TensorBoard images (octa3d.utils.tracking)."""

import torch

from octa3d.utils.tracking import History, slice_grid


def test_slice_grid_shape():
    img = slice_grid(torch.rand(3, 2, 8, 10, 12))
    assert img.shape == (1, 10, 36) and float(img.max()) <= 1.0


def test_history_rewrites_an_epoch_instead_of_duplicating_it(tmp_path):
    h = History(tmp_path / "history.csv")
    h.append({"epoch": 1, "loss": 1.0})
    h.append({"epoch": 2, "loss": 0.5})
    h.append({"epoch": 2, "loss": 0.4})  # a resumed epoch replaces its row
    h2 = History(tmp_path / "history.csv")
    h2.load()
    assert [r["loss"] for r in h2.rows] == [1.0, 0.4]
