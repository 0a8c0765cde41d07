"""Preprocessing and augmentation on small synthetic volumes: retina location, slab crop, clipping, presets,
mapping back to the source scan, augmentation axes, patch grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from octa3d.config import Config
from octa3d.data.subject import Geometry, Subject
from octa3d.data.presets import Clip3DPreset, Patch2DPreset
from octa3d.data import scaling
from octa3d.data.transforms import (ClipScaleIntensityd, PreprocessRecord, ResizeToInputd, RetinalSlabCropd,
                                    apply_transforms, aspect_padding, clip_scale, clip_scale_resize, drop_axis,
                                    hist_percentiles, locate_retina, patch_grid, resize, slab_bounds,
                                    to_source_space, uint8_percentiles)
from octa3d.errors import DataError


def band_volume(shape=(1, 16, 48, 16), band=(20, 28), depth_axis=1, seed=0) -> np.ndarray:
    """uint8 noise (0..29) with a bright band (150..179) over ``band`` along ``depth_axis``."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 30, size=shape, dtype=np.uint8)
    sl = [slice(None)] * len(shape)
    sl[depth_axis + 1] = slice(*band)
    v[tuple(sl)] += 150
    return v


def make_cfg(dim="3d", size=(16,), modality="OCTA", **pre) -> Config:
    cfg = Config()
    cfg.model.dim = dim
    cfg.data.modality = modality
    cfg.preprocess.input_size = list(size)
    cfg.preprocess.augment = False
    for k, v in pre.items():
        section = cfg.data if hasattr(cfg.data, k) else cfg.preprocess
        assert hasattr(section, k), k
        setattr(section, k, v)
    return cfg


def fake_loader(arrays: dict):
    """Loader returning the array registered for a subject id, with a default geometry."""
    def load(subject: Subject, modality: str):
        a = arrays[subject.id]
        return a, Geometry.default(a.shape[1:])
    return load


# ---------------------------------------------------------------------------------------------- retina / slab
@pytest.mark.parametrize("band", [(20, 28), (6, 12), (36, 44)])
@pytest.mark.parametrize("depth_axis", [0, 1, 2])
def test_locate_retina_finds_band(band, depth_axis):
    shape = [1, 16, 16, 16]
    shape[depth_axis + 1] = 48
    vol = band_volume(tuple(shape), band, depth_axis)
    start, stop = locate_retina(vol, depth_axis)
    assert abs(start - band[0]) <= 2 and abs(stop - band[1]) <= 2
    assert abs((start + stop) / 2 - sum(band) / 2) <= 1


def test_locate_retina_flat_profile_falls_back_to_centre():
    vol = np.full((1, 8, 40, 8), 7, np.uint8)
    start, stop = locate_retina(vol, 1)
    assert (start + stop) / 2 == 20


def test_slab_bounds_fraction_voxels_and_clamping():
    assert slab_bounds(48, 0.5, (20, 28)) == (12, 36)           # 24 voxels centred on 24
    assert slab_bounds(48, 10, (20, 28)) == (19, 29)             # voxels
    assert slab_bounds(48, 100, (20, 28)) == (0, 48)             # clamped to the depth
    assert slab_bounds(48, 0.5, (0, 4)) == (0, 24)               # clamped inside the volume
    assert slab_bounds(48, 0.5, (44, 48)) == (24, 48)


@pytest.mark.parametrize("band", [(20, 28), (26, 34)])
def test_slab_crop_contains_band_centred(band):
    vol = band_volume(band=band)
    d = RetinalSlabCropd("image", depth_axis=1, slab_depth=0.5)({"image": vol})
    (s0, e0), (s, e), (s2, e2) = d["crop_box"]
    assert (s0, e0, s2, e2) == (0, 16, 0, 16)                    # lateral axes kept
    assert e - s == 24 and s <= band[0] and e >= band[1]
    assert abs((s + e) / 2 - sum(band) / 2) <= 1
    assert d["image"].shape == (1, 16, 24, 16) and d["image"].dtype == np.uint8


# ---------------------------------------------------------------------------------------------- intensity
@pytest.mark.parametrize("q", [(0.5, 99.5), (0, 100), (2, 98), (50, 50.5)])
def test_hist_percentiles_equal_numpy(q):
    x = np.random.default_rng(1).integers(0, 256, 5001).astype(np.uint8)
    counts = np.bincount(x, minlength=256)
    np.testing.assert_allclose(hist_percentiles(counts, q), np.percentile(x, q), atol=1e-9)


@pytest.mark.parametrize("channels", [1, 2])
def test_uint8_fast_path_matches_percentile_clipping(channels):
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 30.0, size=(channels, 12, 30, 14)).clip(0, 255).astype(np.uint8)
    fast, used = clip_scale(x, (0.5, 99.5))
    slow, _ = clip_scale(x.astype(np.float32), (0.5, 99.5))
    assert fast.dtype == np.float32 and fast.shape == x.shape
    assert fast.min() >= 0 and fast.max() <= 1 and fast.max() == 1
    assert np.abs(fast - slow).max() <= 1 / 255
    for c in range(channels):
        lo, hi = np.percentile(x[c], (0.5, 99.5))
        assert used[c] == pytest.approx((lo, hi))


def test_constant_channel_becomes_zeros():
    out, _ = clip_scale(np.full((1, 4, 4), 9, np.uint8), (1, 99))
    assert out.dtype == np.float32 and not out.any()


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("modality,channels", [("OCTA", 1), ("OCT+OCTA", 2)])
def test_clip3d_preset_shapes_and_record(modality, channels):
    vol = np.concatenate([band_volume(seed=i) for i in range(channels)])
    cfg = make_cfg(size=(16, 12, 16), modality=modality)
    preset = Clip3DPreset(cfg, loader=fake_loader({"a": vol}))
    x, rec = preset.preprocess(Subject("a", "DR", {"OCTA": "x"}))
    assert x.dtype == np.float32 and x.shape == (channels, 16, 12, 16)
    assert 0 <= x.min() and x.max() <= 1
    assert rec.geometry.shape == (16, 48, 16) and rec.cropped_shape == (16, 24, 16)
    assert rec.crop_box[1] == (12, 36) and rec.input_shape == (16, 12, 16) and rec.channels == channels
    assert rec.stored_shape == x.shape and len(rec.intensity) == channels
    back = PreprocessRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back == rec


def test_clip3d_rejects_wrong_channels_and_2d():
    cfg = make_cfg(modality="OCT+OCTA")
    preset = Clip3DPreset(cfg, loader=fake_loader({"a": band_volume(), "b": np.zeros((2, 8, 8), np.uint8)}))
    with pytest.raises(DataError, match="channel"):
        preset.preprocess(Subject("a", "DR", {}))
    with pytest.raises(DataError, match="volume"):
        preset.preprocess(Subject("b", "DR", {}))


@pytest.mark.parametrize("modality,channels", [("OCTA", 1), ("OCT+OCTA", 2)])
def test_patch2d_computed_projection(modality, channels):
    vol = np.concatenate([band_volume(shape=(1, 20, 48, 16), seed=i) for i in range(channels)])
    cfg = make_cfg(dim="2d", size=(24,), modality=modality)
    x, rec = Patch2DPreset(cfg, loader=fake_loader({"a": vol})).preprocess(Subject("a", "DR", {"OCTA": "x"}))
    assert x.dtype == np.float32 and x.shape == (channels, 24, 24) and 0 <= x.min() and x.max() <= 1
    assert rec.geometry.shape == (20, 16) and rec.meta["slab"] == [12, 36]
    assert rec.meta["volume"]["shape"] == [20, 48, 16]


def test_patch2d_projection_map_and_2d_image():
    cfg = make_cfg(dim="2d", size=(24,), projection="OCTA(FULL)")
    img = np.random.default_rng(3).integers(0, 256, (30, 40), dtype=np.uint8)
    reads = []
    preset = Patch2DPreset(cfg, loader=fake_loader({"k": img[None]}), image_reader=lambda p: reads.append(p) or img)
    x, rec = preset.preprocess(Subject("m", "DR", {"OCTA": "vol"}, projections={"OCTA(FULL)": "map.bmp"}))
    assert reads == ["map.bmp"] and x.shape == (1, 24, 24) and rec.geometry.shape == (30, 40)
    assert preset.source_paths(Subject("m", "DR", {"OCTA": "vol"}, projections={"OCTA(FULL)": "map.bmp"})) \
        == ["map.bmp"]
    x, rec = preset.preprocess(Subject("k", "CNV", {"image": "k.png"}))  # 2D image: projection setting unused
    assert x.shape == (1, 24, 24) and x.dtype == np.float32 and rec.geometry.shape == (30, 40)


def test_patch2d_patch_grid_samples():
    img = np.random.default_rng(4).integers(0, 256, (1, 40, 50), dtype=np.uint8)
    cfg = make_cfg(dim="2d", size=(16,), patch_size=20, patch_stride=0)
    preset = Patch2DPreset(cfg, loader=fake_loader({"k": img}))
    stored, rec = preset.preprocess(Subject("k", "CNV", {"image": "k.png"}))
    assert stored.shape == (1, 40, 50) == rec.stored_shape and rec.n_samples == 2 * 3
    for i in range(rec.n_samples):
        s = preset.sample(stored.astype(np.float16), rec, i)
        assert s.shape == (1, 16, 16) and s.dtype == np.float32
    (y0, y1), (x0, x1) = rec.patches[-1]
    np.testing.assert_allclose(preset.sample(stored, rec, 5), to_input(stored[:, y0:y1, x0:x1], (16, 16)))


def to_input(a, size):
    return torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(a))[None], size=size,
                                           mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize("shape,size,stride,n", [((40, 50), 20, 0, 6), ((100, 70), 32, 0, 12),
                                                 ((64, 64), 32, 16, 9), ((10, 50), 20, 20, 3)])
def test_patch_grid_count_and_coverage(shape, size, stride, n):
    boxes = patch_grid(shape, size, stride)
    assert len(boxes) == n
    covered = np.zeros(shape, bool)
    for (y0, y1), (x0, x1) in boxes:
        assert 0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]
        assert y1 - y0 == min(size, shape[0]) and x1 - x0 == min(size, shape[1])
        covered[y0:y1, x0:x1] = True
    assert covered.all()


# ---------------------------------------------------------------------------------------------- back to source
def test_to_source_space_round_trip_places_blob():
    vol = band_volume(shape=(1, 32, 48, 32))
    vol[:, 8:14, 22:26, 18:24] = 255                                 # blob inside the retina
    cfg = make_cfg(size=(16,), clip_percentiles=[0.0, 100.0])
    x, rec = Clip3DPreset(cfg, loader=fake_loader({"a": vol})).preprocess(Subject("a", "DR", {}))
    cam = (x[0] > 0.9).astype(np.float32)                             # only the blob is that bright
    assert cam.any()
    back = to_source_space(cam, rec)
    assert back.shape == rec.geometry.shape == vol.shape[1:] and back.dtype == np.float32
    s, e = rec.crop_box[1]
    assert not back[:, :s].any() and not back[:, e:].any()            # zeros outside the slab
    got = np.argwhere(back > 0.5).mean(axis=0)
    want = np.argwhere(vol[0] == 255).mean(axis=0)
    np.testing.assert_allclose(got, want, atol=1.0)
    assert to_source_space(torch.from_numpy(x), rec).shape == (1, *vol.shape[1:])   # channel axis kept
    with pytest.raises(ValueError):
        to_source_space(np.zeros((8, 8, 8)), rec)


def test_to_source_space_patch():
    img = np.zeros((1, 40, 50), np.uint8)
    img[0, 25:35, 35:45] = 200
    img[0, 0, 0] = 1
    cfg = make_cfg(dim="2d", size=(16,), patch_size=20)
    preset = Patch2DPreset(cfg, loader=fake_loader({"k": img}))
    stored, rec = preset.preprocess(Subject("k", "CNV", {}))
    i = next(i for i, ((y0, y1), (x0, x1)) in enumerate(rec.patches) if y0 <= 30 < y1 and x0 <= 40 < x1)
    back = to_source_space(preset.sample(stored, rec, i)[0], rec, patch=i)
    assert back.shape == (40, 50)
    np.testing.assert_allclose(np.argwhere(back > 0.5).mean(axis=0), [29.5, 39.5], atol=1.0)


# ---------------------------------------------------------------------------------------------- 2D aspect ratio
@pytest.mark.parametrize("shape,target,pad", [((496, 512), (224, 224), [(8, 8), (0, 0)]),
                                              ((496, 768), (224, 224), [(136, 136), (0, 0)]),
                                              ((40, 40), (16, 16), [(0, 0), (0, 0)]),
                                              ((30, 40), (20, 40), [(0, 0), (10, 10)]),
                                              ((31, 40), (40, 40), [(4, 5), (0, 0)])])
def test_aspect_padding(shape, target, pad):
    got = aspect_padding(shape, target)
    assert got == pad
    padded = [n + a + b for n, (a, b) in zip(shape, got)]
    assert padded[0] / padded[1] == pytest.approx(target[0] / target[1], rel=0.01)


def square_blob_image(h: int, w: int) -> np.ndarray:
    img = np.zeros((1, h, w), np.uint8)
    img[0, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4] = 200   # an 8x8 square in the middle
    img[0, 0, 0] = 1
    return img


@pytest.mark.parametrize("h,w", [(20, 40), (40, 20), (24, 36)])
def test_patch2d_keeps_the_aspect_ratio_by_padding(h, w):
    """Images of other aspect ratios (Kermany 512x496 and 768x496) are padded, not stretched: a square stays
    square in the network input, and the padding is zeros."""
    img = square_blob_image(h, w)
    cfg = make_cfg(dim="2d", size=(16,), clip_percentiles=[0.0, 100.0])
    preset = Patch2DPreset(cfg, loader=fake_loader({"k": img}))
    x, rec = preset.preprocess(Subject("k", "CNV", {"image": "k.png"}))
    assert x.shape == (1, 16, 16) and rec.pad == aspect_padding((h, w), (16, 16)) and any(map(any, rec.pad))
    rows, cols = np.nonzero(x[0] > 0.5)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1     # the square is not distorted
    (a, b), (c, d) = (tuple(max(0, int(n * 16 / max(h, w)) - 1) for n in p) for p in rec.pad)  # input pixels
    assert a + b + c + d > 0
    assert not x[0, :a].any() and not x[0, 16 - b:].any() and not x[0, :, :c].any() and not x[0, :, 16 - d:].any()
    back = to_source_space(x[0], rec)                                 # CAM-like map back onto the image
    assert back.shape == (h, w)
    np.testing.assert_allclose(np.argwhere(back > 0.5).mean(axis=0), np.argwhere(img[0] == 200).mean(axis=0),
                               atol=0.6)
    assert PreprocessRecord.from_dict(json.loads(json.dumps(rec.to_dict()))).pad == rec.pad
    assert "aspect" in preset.cache_settings()


def test_to_source_space_inverts_aspect_padding_exactly():
    """Without resampling (input = padded size) the mapping back is the exact inverse: the source image again."""
    img = np.random.default_rng(5).integers(0, 256, (1, 30, 40), dtype=np.uint8)
    cfg = make_cfg(dim="2d", size=(40,), clip_percentiles=[0.0, 100.0])
    x, rec = Patch2DPreset(cfg, loader=fake_loader({"k": img})).preprocess(Subject("k", "CNV", {"image": "k"}))
    assert rec.pad == [(5, 5), (0, 0)] and not x[:, :5].any() and not x[:, 35:].any()
    np.testing.assert_array_equal(to_source_space(x, rec), x[:, 5:35])
    np.testing.assert_allclose(x[0, 5:35], (img[0] - img.min()) / (img.max() - img.min()), atol=1e-6)


def test_square_images_and_patches_are_not_padded():
    img = square_blob_image(32, 32)
    x, rec = Patch2DPreset(make_cfg(dim="2d", size=(16,)), loader=fake_loader({"k": img})).preprocess(
        Subject("k", "CNV", {}))
    assert rec.pad == [] and "pad" in rec.to_dict()
    _, rec = Patch2DPreset(make_cfg(dim="2d", size=(16,), patch_size=12), loader=fake_loader({"k": img[:, :20]})
                           ).preprocess(Subject("k", "CNV", {}))
    assert rec.pad == [] and rec.patches
    old = rec.to_dict()
    del old["pad"]                                                    # records cached before the field existed
    assert PreprocessRecord.from_dict(old).pad == []


def test_drop_axis_geometry():
    g = Geometry((5, 6, 7), spacing=(0.1, 0.2, 0.3), origin=(1.0, 2.0, 3.0), direction=tuple(np.eye(3).ravel()))
    p = drop_axis(g, 1)                                               # NumPy axis 1 = SimpleITK y
    assert p.shape == (5, 7) and p.spacing == (0.1, 0.3) and p.origin == (1.0, 3.0)
    assert p.direction == (1.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- augmentation
def test_augmentation_never_flips_depth_3d():
    cfg = make_cfg(augment=True)
    aug = Clip3DPreset(cfg).augment
    aug.set_random_state(seed=0)
    x = torch.zeros(1, 16, 32, 16)
    x[:, :, 4:10, :] = 1.0                                            # retina near the top of the depth axis
    x[:, :4] += 0.5                                                   # lateral marker at the start of axis 0
    flipped_lateral = 0
    for _ in range(12):
        y = aug({"image": x.clone()})["image"]
        assert type(y) is torch.Tensor and y.dtype == torch.float32 and y.shape == x.shape
        profile = y[0].mean(dim=(0, 2))
        assert 3 <= int(profile.argmax()) <= 10                        # band stays at the same depth
        flipped_lateral += bool(y[0, -4:].mean() > y[0, :4].mean())
    assert flipped_lateral > 0                                        # lateral flips do happen


def test_augmentation_2d_keeps_vertical_and_identity_when_disabled():
    aug = Patch2DPreset(make_cfg(dim="2d", size=(24,), augment=True)).augment
    aug.set_random_state(seed=1)
    x = torch.zeros(1, 24, 24)
    x[:, 3:8, :] = 1.0                                                # B-scan: retina in the top rows
    for _ in range(12):
        y = aug({"image": x.clone()})["image"]
        assert 2 <= int(y[0].mean(dim=1).argmax()) <= 9
    ident = Patch2DPreset(make_cfg(dim="2d", size=(24,), augment=False)).augment
    assert torch.equal(ident({"image": x})["image"], x)


# ---------------------------------------------------------------------------------------------- clip + resize
def test_uint8_percentiles_on_views_equal_numpy():
    x = np.random.default_rng(1).integers(0, 256, (7, 40, 9), dtype=np.uint8)
    view = x[:, 5:31]  # a slab crop: not contiguous
    q = [0.5, 10, 50, 99.5]
    np.testing.assert_allclose(uint8_percentiles(view, q), np.percentile(view, q), atol=1e-9)
    np.testing.assert_allclose(uint8_percentiles(x.reshape(-1), q), np.percentile(x, q), atol=1e-9)


@pytest.mark.parametrize("shape,size,dtype", [((2, 40, 32, 40), (16, 16, 16), np.uint8),
                                              ((1, 10, 20, 30), (32, 7, 30), np.uint8),
                                              ((1, 9, 11, 8), (9, 11, 8), np.uint8),
                                              ((2, 20, 30), (64, 12), np.float32),
                                              ((1, 16, 16, 16), (8, 24, 8), np.int16)])
@pytest.mark.parametrize("block_bytes", [None, 64])
def test_clip_scale_resize_equals_clip_then_resize(shape, size, dtype, block_bytes, monkeypatch):
    if block_bytes:  # many small blocks along the first axis
        monkeypatch.setattr(scaling, "_BLOCK_BYTES", block_bytes)
    x = np.random.default_rng(2).integers(0, 200, shape).astype(dtype)
    fused, used = clip_scale_resize(x, (0.5, 99.5), size)
    clipped, used_ref = clip_scale(x, (0.5, 99.5))
    assert fused.dtype == np.float32 and fused.shape == (shape[0], *size) and used == used_ref
    np.testing.assert_allclose(fused, resize(clipped, size), atol=1e-5)


def test_clip3d_pipeline_equals_unfused_steps():
    from octa3d.config import Config
    from octa3d.data.presets import Clip3DPreset
    from octa3d.data.subject import Geometry

    cfg = Config()
    cfg.data.modality, cfg.preprocess.input_size, cfg.preprocess.augment = "OCT+OCTA", [12, 10, 8], False
    rng = np.random.default_rng(3)
    vol = rng.integers(0, 40, (2, 20, 48, 24), dtype=np.uint8)
    vol[:, :, 18:30] += 150  # a bright retina band along depth
    image, record = Clip3DPreset(cfg).preprocess_array(vol, Geometry.default(vol.shape[1:]))
    ref = apply_transforms([RetinalSlabCropd("image", 1, cfg.preprocess.slab_depth),
                ClipScaleIntensityd("image", cfg.preprocess.clip_percentiles),
                ResizeToInputd("image", (12, 10, 8))], {"image": vol})
    np.testing.assert_allclose(image, ref["image"], atol=1e-5)
    assert record.crop_box == ref["crop_box"] and record.intensity == ref["intensity"]


# ---------------------------------------------------------------------------------------------- --normalize
def test_normalization_stats_constants():
    assert scaling.normalization_stats("none", 1) is None
    assert scaling.normalization_stats("imagenet", 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert scaling.normalization_stats("imagenet", 2) == ((0.449, 0.449), (0.226, 0.226))
    x = np.random.default_rng(0).random((3, 4, 4), dtype=np.float32)
    y = scaling.normalize(x, *scaling.normalization_stats("imagenet", 3))
    np.testing.assert_allclose(y[1], (x[1] - 0.456) / 0.224, rtol=1e-6)
    np.testing.assert_allclose(scaling.normalize(torch.from_numpy(y), *scaling.normalization_stats("imagenet", 3),
                                                 inverse=True).numpy(), x, atol=1e-6)


@pytest.mark.parametrize("dim", ["3d", "2d"])
def test_presets_normalize_samples_and_augment_in_unit_range(dim):
    """Samples are (x - 0.449) / 0.226 of the 0..1 preprocessing; augmentation runs on 0..1 values in between."""
    vol = band_volume()
    plain_cfg = make_cfg(dim=dim, size=(16,) * int(dim[0]))
    norm_cfg = make_cfg(dim=dim, size=(16,) * int(dim[0]), normalize="imagenet")
    cls = Clip3DPreset if dim == "3d" else Patch2DPreset
    plain, norm = cls(plain_cfg, loader=fake_loader({"a": vol})), cls(norm_cfg, loader=fake_loader({"a": vol}))
    stored, rec = plain.preprocess(Subject("a", "DR", {"OCTA": "x"}))
    stored2, _ = norm.preprocess(Subject("a", "DR", {"OCTA": "x"}))
    np.testing.assert_array_equal(stored, stored2)  # the cache holds 0..1 values either way
    assert plain.cache_settings() == norm.cache_settings()
    np.testing.assert_allclose(norm.sample(stored, rec), (plain.sample(stored, rec) - 0.449) / 0.226, rtol=1e-5)

    for c in (plain_cfg, norm_cfg):
        c.preprocess.augment = True
    plain, norm = cls(plain_cfg), cls(norm_cfg)
    plain.augment.set_random_state(seed=3)
    norm.augment.set_random_state(seed=3)
    a = plain.augment({"image": torch.from_numpy(plain.sample(stored, rec))})["image"]
    b = norm.augment({"image": torch.from_numpy(norm.sample(stored, rec))})["image"]
    torch.testing.assert_close(torch.as_tensor(b), (torch.as_tensor(a) - 0.449) / 0.226, atol=1e-5, rtol=1e-5)
