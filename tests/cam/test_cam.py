"""Class activation maps (octa3d.cam): maps peak where a hand-built network looks, every backend (MONAI
GradCAM/GradCAM++, medcam), exports in the source geometry (NIfTI source with an odd affine, OCTA-500 BMP stack with
FOV spacing, 2D patches) and lesion localization scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from octa3d.config import Config
from octa3d.data.subject import Subject
from octa3d.data.presets import build_preset
from octa3d.cam import CamComputer, CamExporter, CamItem, localization, minmax, resolve_cam_class
from octa3d.cam.localization import summarize
from octa3d.errors import ConfigError
from octa3d.utils.tracking import tensorboard_writer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BlobNet(nn.Module):
    """Logit 1 = mean of a blurred, pooled input; logit 0 = its negative. Its Grad-CAM for class 1 is the
    (pooled) image itself, so the map must peak on the brightest blob; for class 0 it is empty."""

    def __init__(self, dims: int = 3) -> None:
        super().__init__()
        conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(conv.weight, 1.0 / 3 ** dims)
        pool = nn.AvgPool3d(2) if dims == 3 else nn.AvgPool2d(2)
        self.features = nn.Sequential(conv, nn.ReLU(), pool)  # target layer "features.2": half resolution
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(1, 2))
        with torch.no_grad():
            self.head[2].weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head[2].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def blob_batch(size: int = 16) -> torch.Tensor:
    x = torch.full((2, 1, size, size, size), 0.05)
    x[0, 0, 2:5, 3:6, 2:5] = 1.0  # sample 0: near the origin corner
    x[1, 0, 10:14, 9:13, 11:14] = 1.0  # sample 1: near the far corner
    return x


def _inside(peak: tuple[int, ...], box: tuple[slice, ...], tol: int = 1) -> bool:
    return all(s.start - tol <= p < s.stop + tol for p, s in zip(peak, box))


BOXES = [(slice(2, 5), slice(3, 6), slice(2, 5)), (slice(10, 14), slice(9, 13), slice(11, 14))]


@pytest.mark.parametrize("backend", ["gradcam", "gradcam++", "layercam", "hirescam", "occlusion", "medcam"])
def test_cam_peaks_on_the_blob_with_per_sample_targets(backend):
    torch.manual_seed(0)
    net = BlobNet().eval()
    cam = CamComputer([net], backend, "features.2" if backend != "occlusion" else "")
    x = blob_batch()
    maps = cam(x, torch.tensor([1, 1]))
    assert maps.shape == (2, 16, 16, 16) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    for i in range(2):
        peak = np.unravel_index(int(np.argmax(maps[i])), maps[i].shape)
        assert _inside(peak, BOXES[i]), (backend, i, peak)
        # high = important: the blob is hot, the far background cold (MONAI's default would invert this)
        assert maps[i][BOXES[i]].mean() > 0.5 > maps[i][tuple(slice(0, 2) if i else slice(14, 16) for _ in
                                                               range(3))].mean()
    assert cam.status == ["ok", "ok"]
    # mixed targets in one batch: class 0 has no positive evidence anywhere (empty map); sample 0 unaffected
    mixed = cam(x, torch.tensor([1, 0]))
    assert np.allclose(mixed[0], maps[0], atol=1e-5)
    assert np.allclose(mixed[1], 0)
    if backend != "medcam":  # medcam rescales every map itself: its emptiness cannot be seen
        assert cam.status == ["ok", "empty"]


@pytest.mark.parametrize("backend", ["gradcam", "layercam", "hirescam", "occlusion"])
def test_2d_maps_peak_on_the_blob(backend):
    net = BlobNet(dims=2).eval()
    x = torch.full((1, 1, 16, 16), 0.05)
    x[0, 0, 9:13, 3:7] = 1.0
    maps = CamComputer([net], backend, "features.2" if backend != "occlusion" else "")(x, torch.tensor([1]))
    assert maps.shape == (1, 16, 16) and 0 <= maps.min() and maps.max() <= 1
    assert _inside(np.unravel_index(int(np.argmax(maps[0])), (16, 16)), (slice(9, 13), slice(3, 7)))


def test_fusion_is_the_mean_of_the_scaled_layer_maps():
    from octa3d.model import create_model

    torch.manual_seed(0)
    model = create_model("cnn", "3d", 1, 2).eval()
    x, t = torch.rand(2, 1, 16, 16, 16), torch.tensor([1, 0])
    a = CamComputer([model], "layercam", "features.block1")(x, t)
    b = CamComputer([model], "layercam", "features.block2")(x, t)
    both = CamComputer([model], "layercam", "features.block1,features.block2")(x, t)
    expect = minmax(torch.from_numpy((a + b) / 2).reshape(2, -1)).reshape(both.shape).numpy()
    np.testing.assert_allclose(both, expect, atol=1e-5)
    with pytest.raises(ConfigError, match="medcam explains one layer"):
        CamComputer([model], "medcam", "features.block1,features.block2")


def test_status_names_constant_and_non_finite_maps():
    from octa3d.cam.backends import map_status

    assert map_status(torch.zeros(4, 4)) == "empty"
    assert map_status(torch.full((4, 4), 2.0)) == "constant"
    assert map_status(torch.tensor([[1.0, float("nan")]])) == "non-finite"
    assert map_status(torch.tensor([[0.0, 1.0]])) == "ok"


def test_default_layers_adapt_to_the_input_size():
    from octa3d.cam.layers import MAX_STRIDE, default_layers, feature_shapes
    from octa3d.model import create_model, get_spec

    for name in ("cnn", "resnet18"):
        model = create_model(name, "3d", 1, 2).eval()
        for shape in ((32, 32, 32), (64, 64, 64), (32, 64, 32)):
            layers = default_layers(model, name, shape, 1)
            shapes = feature_shapes(model, layers, shape, 1)
            finest = max(shapes.values(), key=lambda s: np.prod(s))
            assert all(f * MAX_STRIDE >= s for f, s in zip(finest, shape)), (name, shape, layers, shapes)
            assert layers[0] != get_spec(name).cam_layer  # the registered last layer is too coarse here


def test_deletion_and_insertion_scores_follow_a_known_answer():
    from octa3d.cam.faithfulness import deletion_insertion

    net = BlobNet().eval()
    x = blob_batch()[:1]
    good = np.zeros((1, 16, 16, 16), np.float32)
    good[0][BOXES[0]] = 1.0  # the blob first: deleting it removes the evidence at once
    bad = 1.0 - good  # the blob last
    s_good = deletion_insertion([net], x.numpy(), good, target=1)
    s_bad = deletion_insertion([net], x.numpy(), bad, target=1)
    assert s_good["deletion_auc"] < s_good["deletion_auc_random"] < s_bad["deletion_auc"] + 1e-6
    assert s_good["insertion_auc"] > s_bad["insertion_auc"]


def test_registry_model_backward_hooks_work():
    from octa3d.model import create_model

    model = create_model("cnn", "3d", 1, 2).eval()
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    maps = CamComputer([model, create_model("cnn", "3d", 1, 2)], "gradcam", "features.block3.act")(
        torch.rand(2, 1, 16, 16, 16), torch.tensor([0, 1]))
    assert maps.shape == (2, 16, 16, 16) and np.isfinite(maps).all()


def test_helpers():
    assert resolve_cam_class(None, ["NORMAL", "CNV"]) is None
    assert resolve_cam_class("cnv", ["NORMAL", "CNV"]) == 1
    assert resolve_cam_class("0", ["NORMAL", "CNV"]) == 0
    with pytest.raises(ConfigError, match="0=NORMAL"):
        resolve_cam_class("DR", ["NORMAL", "CNV"])
    m = minmax(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert torch.equal(m, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    cam = np.zeros((4, 4))
    cam[1, 1], cam[3, 3] = 1.0, 0.5
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 0:2] = 1
    loc = localization(cam, mask)
    assert loc == {"hit": True, "hit_exact": True, "mass_inside": pytest.approx(1 / 1.5), "lesion_fraction": 0.25,
                   "mass_ratio": pytest.approx(4 / 1.5)}
    assert localization(cam, np.zeros_like(mask)) is None
    # tolerance: a peak one voxel beside the lesion is a hit with tolerance 1, not exactly
    near = np.zeros((4, 4))
    near[2, 1] = 1.0
    assert localization(near, mask, (1, 1))["hit"] and not localization(near, mask, (1, 1))["hit_exact"]
    assert not localization(near, mask)["hit"]
    assert localization(cam, mask, ok=False)["hit"] is False  # a map without evidence is a miss
    # en face (volumes): a peak above the lesion (the lifted retina over a fluid dome) misses in 3D, hits en face
    vol_mask = np.zeros((6, 10, 6), np.uint8)
    vol_mask[2:4, 6:8, 2:4] = 1
    above = np.zeros((6, 10, 6))
    above[3, 1, 2] = 1.0
    up = localization(above, vol_mask, (1, 1, 1), depth_axis=1)
    assert not up["hit"] and up["hit_enface"]
    aside = np.zeros((6, 10, 6))
    aside[0, 7, 5] = 1.0  # right depth, wrong place en face
    assert localization(aside, vol_mask, (0, 0, 0), depth_axis=1)["hit_enface"] is False
    assert "hit_enface" not in localization(cam, mask, depth_axis=1)  # 2D maps: no en-face test
    assert localization(above, vol_mask, depth_axis=1, ok=False)["hit_enface"] is False
    both = summarize({"a": dict(up, true="CSC"), "b": dict(localization(aside, vol_mask, depth_axis=1), true="CSC")})
    assert both["per_class"]["CSC"]["pointing_game_enface"] == 0.5 and both["per_class"]["CSC"]["pointing_game"] == 0
    with pytest.raises(ConfigError, match="--cam-layer"):
        CamExporter(_cfg(cam_layer="nope"), [BlobNet()], ["A", "B"], Path("."), None)


# ------------------------------------------------------------------------------------ exports in source space
def _cfg(size=16, dim="3d", cam="gradcam", cam_layer="features.2", **pre) -> Config:
    cfg = Config()
    cfg.model.dim, cfg.model.model = dim, "cnn"
    cfg.preprocess.input_size = [size]
    cfg.preprocess.augment = False
    cfg.eval.cam, cfg.eval.cam_layer = cam, cam_layer
    for k, v in pre.items():
        setattr(cfg.preprocess, k, v)
    return cfg


def test_nifti_export_round_trip_cropped_and_resized(tmp_path, nifti_scan, same_geometry):
    src, vol = nifti_scan(tmp_path / "scanA.nii.gz")
    cfg = _cfg()
    subject = Subject("scanA", "CNV", {"image": str(src)})
    preset = build_preset(cfg)
    image, record = preset.preprocess(subject)
    assert record.crop_box[1] != (0, 40)  # the slab crop really happened (and the resize: 40 rows -> 16)
    tb = tensorboard_writer(tmp_path / "tb")
    report = CamExporter(cfg, [BlobNet()], ["NORMAL", "CNV"], tmp_path / "cams", preset, tb=tb).export(
        [CamItem(subject, record, lambda: image[None], np.array([0.3, 0.7]), 1)])
    tb.close()
    cam_f, in_f = tmp_path / "cams" / "scanA_cam.nii.gz", tmp_path / "cams" / "scanA_input.nii.gz"
    same_geometry(cam_f, src)
    same_geometry(in_f, src)
    cam = sitk.GetArrayFromImage(sitk.ReadImage(str(cam_f)))
    assert cam.dtype == np.float32 and cam.shape == vol.shape and 0 <= cam.min() and cam.max() <= 1
    s0, s1 = record.crop_box[1]
    assert np.all(cam[:, :s0] == 0) and np.all(cam[:, s1:] == 0)  # nothing outside the slab the network saw
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert _inside(peak, (slice(2, 5), slice(17, 21), slice(2, 5)), tol=2), peak
    inp = sitk.GetArrayFromImage(sitk.ReadImage(str(in_f)))
    assert inp.dtype == np.uint8 and np.array_equal(inp, vol)
    assert (tmp_path / "cams" / "scanA_review.png").read_bytes()[:8] == PNG_MAGIC
    assert report["cam"]["n_subjects"] == 1 and report["cam"]["layer"] == "features.2"
    assert "localization" not in report  # no mask
    assert any((tmp_path / "tb").iterdir())


def test_empty_map_is_reported_not_drawn(tmp_path, caplog, nifti_scan):
    """Explaining class 0 of BlobNet has no positive evidence: the subject's status says so, a warning names it,
    no peak is claimed, the review sheet says NO EVIDENCE MAP, and localisation counts it as a miss."""
    src, _ = nifti_scan(tmp_path / "scanB.nii.gz")
    cfg = _cfg()
    cfg.eval.cam_class = "NORMAL"
    subject = Subject("scanB", "CNV", {"image": str(src)})
    preset = build_preset(cfg)
    image, record = preset.preprocess(subject)
    with caplog.at_level("WARNING", logger="octa3d"):
        report = CamExporter(cfg, [BlobNet()], ["NORMAL", "CNV"], tmp_path / "cams", preset).export(
            [CamItem(subject, record, lambda: image[None], np.array([0.3, 0.7]), 1)])
    sub = report["subjects"]["scanB"]
    assert sub["status"] == "empty" and sub["peak"] is None
    assert report["cam"]["status_counts"] == {"empty": 1}
    assert "scanB" in caplog.text and "no positive evidence" in caplog.text
    assert (tmp_path / "cams" / "scanB_review.png").read_bytes()[:8] == PNG_MAGIC
    assert "faithfulness" not in report  # no evidence, nothing to delete in order


def test_octa500_bmp_stack_export_and_localization(tmp_path, same_geometry):
    from octa3d.data.sources import discover
    from octa3d.data.synthetic import generate

    generate(tmp_path / "data", 2, (16, 32, 16), seed=1, classes=("CNV",))
    cfg = _cfg(cam="medcam")
    cfg.data.data_root = str(tmp_path / "data")
    subjects = discover(cfg.data, "3d")
    preset = build_preset(cfg)
    items = []
    for s in subjects:
        image, record = preset.preprocess(s)
        items.append(CamItem(s, record, lambda image=image: image[None], np.array([0.2, 0.8]), 1))
    report = CamExporter(cfg, [BlobNet()], ["NORMAL", "CNV"], tmp_path / "cams", preset).export(items)
    for s in subjects:
        cam_f = tmp_path / "cams" / f"{s.id}_cam.nii.gz"
        img = sitk.ReadImage(str(cam_f))
        assert img.GetSize() == (16, 32, 16)
        assert np.allclose(img.GetSpacing(), (6 / 16, 2 / 32, 6 / 16))  # FOV spacing of the BMP stack
        same_geometry(cam_f, tmp_path / "cams" / f"{s.id}_input_OCTA.nii.gz")  # the modality read
        same_geometry(cam_f, Path(s.mask))
    assert not list((tmp_path / "cams").glob("*_input.nii.gz"))
    loc = report["localization"]["per_class"]["CNV"]
    assert loc["n"] == 2 and 0 <= loc["pointing_game"] <= 1 and 0 <= loc["mass_inside"] <= 1
    assert loc["pointing_game_enface"] >= loc["pointing_game"]  # a 3D hit is an en-face hit
    assert loc["mass_ratio"] == pytest.approx(loc["mass_inside"] / loc["lesion_fraction"], rel=0.5)
    assert report["localization"]["tolerance_voxels"] == [1, 1, 1]  # the retinal slab (<= 16 rows) at 16^3 input
    assert report["cam"]["backend"] == "medcam"
    faith = report["faithfulness"]
    assert faith["n"] == 2 and 0 <= faith["deletion_auc"] <= 1 and 0 <= faith["insertion_auc"] <= 1


def test_2d_patch_model_export(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 30, (40, 56), dtype=np.uint8)
    img[30:36, 40:48] = 255
    np.save(tmp_path / "img.npy", img)
    cfg = _cfg(size=16, dim="2d", patch_size=16)
    subject = Subject("img", "CNV", {"image": str(tmp_path / "img.npy")})
    preset = build_preset(cfg)
    stored, record = preset.preprocess(subject)
    assert len(record.patches) > 1
    item = CamItem(subject, record, lambda: np.stack([preset.sample(stored, record, p)
                                                      for p in range(len(record.patches))]), np.array([0.4, 0.6]), 1)
    CamExporter(cfg, [BlobNet(2)], ["NORMAL", "CNV"], tmp_path / "cams", preset).export([item])
    cam = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cams" / "img_cam.nii.gz")))
    assert cam.shape == img.shape
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert 28 <= peak[0] < 38 and 38 <= peak[1] < 50, peak
    assert (tmp_path / "cams" / "img_review.png").read_bytes()[:8] == PNG_MAGIC


def test_two_channel_export_one_file_per_modality_and_sheet_names_it(tmp_path, monkeypatch):
    """Issue 13 items 9 and 11: with OCT+OCTA, one input file per channel named by modality (no unnamed duplicate of
    the OCT channel), and the review sheet is told which modality it draws, the slice files' names (B-scans
    numbered as the files are) and the physical spacing (scale bars)."""
    from octa3d.cam import export
    from octa3d.data.sources import discover
    from octa3d.data.synthetic import generate

    generate(tmp_path / "data", 1, (8, 24, 8), seed=1, classes=("CNV",))
    cfg = _cfg()
    cfg.data.data_root, cfg.data.modality = str(tmp_path / "data"), "OCT+OCTA"
    (s,) = discover(cfg.data, "3d")
    preset = build_preset(cfg)
    image, record = preset.preprocess(s)
    seen = {}
    real = export.review_figure_3d

    def spy(volume, *a, **k):
        seen.update(k, volume=volume)
        return real(volume, *a, **k)

    monkeypatch.setattr(export, "review_figure_3d", spy)
    report = CamExporter(cfg, [BlobNet()], ["NORMAL", "CNV"], tmp_path / "cams", preset).export(
        [CamItem(s, record, lambda: image[None, 1:], np.array([0.2, 0.8]), 1)])
    names = sorted(f.name for f in (tmp_path / "cams").iterdir())
    assert names == [f"{s.id}_cam.nii.gz", f"{s.id}_input_OCT.nii.gz", f"{s.id}_input_OCTA.nii.gz",
                     f"{s.id}_review.png", "names.csv"]
    assert set(report["subjects"][s.id]["files"]) == {"cam", "input_OCT", "input_OCTA", "review"}
    truth = {}
    for mod in ("OCT", "OCTA"):
        files = sorted(Path(s.paths[mod]).glob("*.bmp"), key=lambda f: int(f.stem))
        truth[mod] = sitk.GetArrayFromImage(sitk.ReadImage([str(f) for f in files], sitk.sitkUInt8))
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cams" / f"{s.id}_input_{mod}.nii.gz")))
        assert np.array_equal(stored, truth[mod]), mod
    assert not np.array_equal(truth["OCT"], truth["OCTA"])
    # the sheet draws the OCTA channel and says so; B-scans are named by their files, 1.bmp first
    assert seen["channel"] == "OCTA" and np.array_equal(seen["volume"], truth["OCTA"])
    assert seen["slice_names"] == [f"{i}.bmp" for i in range(1, 9)]
    assert np.allclose(seen["spacing"], (6 / 8, 2 / 24, 6 / 8))  # mm per array axis: scale bars


def test_scan_channels_and_slice_files(tmp_path):
    """Which modality each exported channel holds, for every kind of source; slice files in stacking order."""
    from octa3d.cam.sources import scan_channels, slice_files
    from octa3d.data.record import PreprocessRecord

    def rec(channels=1, kind="clip3d", meta=None):
        return PreprocessRecord(source={}, crop_box=[], cropped_shape=[], input_shape=[], channels=channels,
                                kind=kind, meta=meta or {})

    eye = tmp_path / "OCTA_6mm" / "OCTA" / "10001"
    eye.mkdir(parents=True)
    for i in range(1, 11):
        (eye / f"{i}.bmp").write_bytes(b"")
    oct_s = Subject("10001", None, {"OCT": "o", "OCTA": str(eye)})
    assert [c.modality for c in scan_channels(oct_s, rec(2), "OCT+OCTA")] == ["OCT", "OCTA"]
    assert [c.modality for c in scan_channels(oct_s, rec(), "OCTA")] == ["OCTA"]
    assert [c.modality for c in scan_channels(Subject("10001", None, {"image": str(eye)}), rec(), "OCT")] == ["OCTA"]
    f = tmp_path / "scan.nii.gz"
    f.write_bytes(b"")
    assert [c.modality for c in scan_channels(Subject("scan", None, {"image": str(f)}), rec(), "OCTA")] == [None]
    proj = Subject("10001", None, {"OCTA": str(eye)}, projections={"OCTA(FULL)": "p.bmp"})
    assert scan_channels(proj, rec(kind="patch2d", meta={"projection": "OCTA(FULL)"}), "OCTA")[0].modality == \
        "OCTA(FULL)"
    assert slice_files(str(eye)) == [f"{i}.bmp" for i in range(1, 11)]  # numeric, not name order
    (eye / "5.bmp").unlink()
    assert slice_files(str(eye)) is None  # a gap: no claim about which file a B-scan is
    assert slice_files(str(f)) is None and slice_files(None) is None


# ------------------------------------------------------------------------------------ --mode explain


def test_distinct_subjects_get_distinct_cam_files_and_a_names_table(tmp_path, nifti_scan):
    """IDs that sanitise alike (a/b and a_b, x y and x_y, ../../evil and evil, Case1 and case1) once overwrote each
    other's maps; each subject now gets its own files, inside the folder, and names.csv maps ID -> stem."""
    import csv

    src, _ = nifti_scan(tmp_path / "scan.nii.gz")
    cfg = _cfg()
    cfg.eval.faithfulness_subjects = 0
    preset = build_preset(cfg)
    ids = ["a/b", "a_b", "x y", "x_y", "../../evil", "evil", "Case1", "case1", "=cmd"]
    items = []
    for sid in ids:
        subject = Subject(sid, "CNV", {"image": str(src)})
        image, record = preset.preprocess(subject)
        items.append(CamItem(subject, record, lambda image=image: image[None], np.array([0.3, 0.7]), 1))
    out = tmp_path / "run" / "cams"
    report = CamExporter(cfg, [BlobNet()], ["NORMAL", "CNV"], out, preset).export(items)
    stems = {sid: report["subjects"][sid]["file_stem"] for sid in ids}
    assert len({s.casefold() for s in stems.values()}) == len(ids)
    assert stems["a_b"] == "a_b" and stems["evil"] == "evil"  # plain IDs keep their names
    assert len(list(out.glob("*_cam.nii.gz"))) == len(ids) and len(list(out.glob("*_review.png"))) == len(ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "scan.nii.gz"]  # nothing escaped the folder
    with (out / "names.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["subject"].removeprefix("'"): r["file_stem"] for r in rows} == stems  # '=cmd: no formula
    for sid, stem in stems.items():
        assert report["subjects"][sid]["files"]["cam"] == str(out / f"{stem}_cam.nii.gz")
