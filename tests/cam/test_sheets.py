"""Review sheets (octa3d.cam.sheets): panels named as the user knows the slices (OCTA-500 B-scan files are 1-based),
the second section named for what it is (a slow-axis section, not a B-scan), the modality shown, and millimetre
scale bars where the spacing is physical."""

from __future__ import annotations

import numpy as np
import pytest

from octa3d.cam import sheets


def _volume(shape=(100, 20, 30), peak=(81, 10, 7)):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, shape, dtype=np.uint8)
    cam = np.zeros(shape, np.float32)
    cam[peak] = 1.0
    return vol, cam


@pytest.fixture
def panels(monkeypatch):
    """The panels review_figure_3d/2d hand to review_sheet."""
    seen: list = []

    def capture(p, title, wrap=140):
        seen[:] = list(p)
        return np.zeros((1, 1, 3), np.uint8)

    monkeypatch.setattr(sheets, "review_sheet", capture)
    return seen


def test_bscan_numbered_as_its_file_and_slow_axis_section_named(panels):
    vol, cam = _volume()
    names = [f"{i}.bmp" for i in range(1, 101)]
    sheets.review_figure_3d(vol, cam, 1, "t", spacing=(0.06, 0.1, 0.2), channel="OCTA", slice_names=names)
    (enface, *_), (bscan, *_), (section, *_) = panels
    assert "en-face OCTA" in enface
    # array index 81 is the file 82.bmp: the 82nd B-scan
    assert bscan.startswith("OCTA B-scan 82 of 100 (82.bmp)") and "through the CAM peak" in bscan
    assert section.startswith("OCTA slow-axis section at B-scan column 7") and "B-scan 8" not in section
    # without slice files (a NIfTI): the 0-based array index, and which axis
    sheets.review_figure_3d(vol, cam, 1, "t")
    assert panels[1][0].startswith("B-scan at index 81 (0-based, of 100; axis 0)")
    assert panels[2][0].startswith("slow-axis section at index 7 (0-based, of 30; axis 2)")
    assert all(p[2] is None for p in panels)  # no spacing: no scale bars


def test_panels_carry_the_millimetres_they_show(panels):
    vol, cam = _volume()
    sp = (0.06, 0.1, 0.2)  # mm per array axis (slow, depth, fast)
    sheets.review_figure_3d(vol, cam, 1, "t", spacing=sp)
    (_, en_img, en_mm), (_, b_img, b_mm), (_, s_img, s_mm) = panels
    assert en_mm == pytest.approx((100 * 0.06, 30 * 0.2))  # slow x fast
    assert b_mm == pytest.approx((20 * 0.1, 30 * 0.2))  # depth x fast
    assert s_mm == pytest.approx((20 * 0.1, 100 * 0.06))  # depth x slow
    # the en-face view keeps its physical aspect: square pixels
    assert en_mm[0] / en_img.shape[0] == pytest.approx(en_mm[1] / en_img.shape[1], rel=0.02)
    sheets.review_figure_2d(vol[0], cam[81], "t", spacing=(0.1, 0.2), channel="OCTA(FULL)")
    assert panels[0][0] == "OCTA(FULL)" and panels[1][0] == "OCTA(FULL) + CAM"
    assert panels[1][2] == pytest.approx((20 * 0.1, 30 * 0.2))


def test_scale_bars_are_drawn_in_each_panel_only_with_spacing():
    vol = np.zeros((40, 32, 40), np.uint8)
    cam = np.zeros(vol.shape, np.float32)
    kw = {"no_map": "all zero", "channel": "OCT"}  # black panels, no peak marker: only the bars are white
    bare = sheets.review_figure_3d(vol, cam, 1, "t", **kw)
    scaled = sheets.review_figure_3d(vol, cam, 1, "t", spacing=(0.15, 2 / 32, 0.15), **kw)
    assert bare.shape == scaled.shape  # laterally isotropic: the same layout
    rows, cols = np.nonzero((bare != scaled).any(axis=-1))
    assert rows.size and rows.min() > bare.shape[0] - 140  # in the lower part of the panels
    # one bar group per panel: the differences fall into three separate column bands
    gaps = np.flatnonzero(np.diff(np.unique(cols)) > 100)
    assert len(gaps) == 2


def test_scale_bar_lengths_are_round_numbers():
    assert sheets._nice_mm(1.8) == 1 and sheets._nice_mm(0.6) == 0.5 and sheets._nice_mm(0.06) == pytest.approx(0.05)
    assert sheets._nice_mm(2.5) == 2 and sheets._mm_text(0.05) == "50 µm" and sheets._mm_text(1.0) == "1 mm"
