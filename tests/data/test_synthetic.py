"""Tests of the synthetic OCTA-500 generator (tiny volumes; the whole file runs in a few seconds)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy.ndimage import uniform_filter1d

from octa3d.data import synthetic as syn
from octa3d.errors import DataError

SHAPE = (10, 40, 12)  # S B-scans, D depth rows, W columns: every axis a different size to catch transposes
N = 6                 # one eye per class


def numeric_bmps(folder: str | Path) -> list[str]:
    """Slice files in B-scan order (10.bmp after 9.bmp)."""
    return [str(p) for p in sorted(Path(folder).glob("*.bmp"), key=lambda p: int(p.stem))]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("synth") / "data"
    return root, syn.generate(root, N, SHAPE, seed=7)


def test_octa500_layout(dataset: tuple[Path, list[dict]]) -> None:
    root, recs = dataset
    fov = root / "OCTA_6mm"
    ids = [str(10001 + i) for i in range(N)]
    assert [r["id"] for r in recs] == ids
    assert sorted(p.name for p in root.iterdir()) == ["OCTA_6mm", "Text labels.xlsx", syn.MARKER]
    for sid in ids:
        for mod in ("OCTA", "OCT"):
            files = numeric_bmps(fov / mod / sid)
            assert [Path(f).name for f in files] == [f"{n}.bmp" for n in range(1, SHAPE[0] + 1)]
            assert sitk.ReadImage(files[0], sitk.sitkUInt8).GetSize() == (SHAPE[2], SHAPE[1])  # D rows x W cols
        for kind in syn.PROJECTIONS:
            proj = sitk.ReadImage(str(fov / "Projection Maps" / kind / f"{sid}.bmp"), sitk.sitkUInt8)
            assert proj.GetSize() == (SHAPE[2], SHAPE[0])  # S x W en-face
        assert (fov / "Lesion Masks" / f"{sid}.nii.gz").is_file()
    assert not list(root.rglob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("mod", ["OCTA", "OCT"])
def test_bmps_are_8bit_palette(dataset: tuple[Path, list[dict]], mod: str) -> None:
    root, _ = dataset
    raw = (root / "OCTA_6mm" / mod / "10001" / "1.bmp").read_bytes()
    offset = struct.unpack_from("<I", raw, 10)[0]
    header_size, width, height, _, bits, compression = struct.unpack_from("<IiiHHI", raw, 14)
    n_colours = struct.unpack_from("<I", raw, 46)[0] or 256
    assert raw[:2] == b"BM" and header_size == 40 and bits == 8 and compression == 0
    assert (width, abs(height)) == (SHAPE[2], SHAPE[1])
    assert n_colours == 256 and offset == 14 + 40 + 4 * n_colours  # a colour table precedes the pixels
    table = np.frombuffer(raw[54:offset], np.uint8).reshape(256, 4)
    assert (table[:, :3] == np.arange(256)[:, None]).all()  # grayscale palette
    # Read without a pixel type, a palette BMP comes back as RGB (as the real data does).
    assert sitk.ReadImage(str(root / "OCTA_6mm" / mod / "10001" / "1.bmp")).GetNumberOfComponentsPerPixel() == 3


def test_label_table(dataset: tuple[Path, list[dict]]) -> None:
    root, recs = dataset
    table = pd.read_excel(root / "Text labels.xlsx")
    assert list(table.columns) == ["ID", "Gender", "Age", "OS/OD", "Disease"]
    assert table["ID"].tolist() == [int(r["id"]) for r in recs]
    assert sorted(table["Disease"]) == sorted(syn.CLASSES)  # balanced: one eye per class
    assert set(table["OS/OD"]) <= {"OS", "OD"} and set(table["Gender"]) <= {"M", "F"}
    assert table["Age"].between(18, 95).all()


def test_masks_align_with_the_stacks(dataset: tuple[Path, list[dict]]) -> None:
    root, recs = dataset
    for i, rec in enumerate(recs):
        stack = sitk.ReadImage(numeric_bmps(rec["paths"]["OCTA"]), sitk.sitkUInt8)
        mask = sitk.ReadImage(rec["paths"]["mask"])
        assert mask.GetSize() == stack.GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(mask.GetSpacing(), (6 / SHAPE[2], 2 / SHAPE[1], 6 / SHAPE[0]))
        m = sitk.GetArrayFromImage(mask)
        assert m.any() == (rec["disease"] != "NORMAL")
        # What was written is exactly the in-memory rendering of that eye (same voxels, same mask).
        ref = syn.make_volume(SHAPE, rec["disease"], seed=7, index=i)
        assert np.array_equal(sitk.GetArrayFromImage(stack), ref["octa"])
        assert np.array_equal(m, ref["mask"])
        oct_stack = sitk.ReadImage(numeric_bmps(rec["paths"]["OCT"]), sitk.sitkUInt8)
        assert np.array_equal(sitk.GetArrayFromImage(oct_stack), ref["oct"])


def test_deterministic(dataset: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, _ = dataset
    again = tmp_path / "again"
    syn.generate(again, N, SHAPE, seed=7)
    assert tree_bytes(again) == tree_bytes(root)
    other = tmp_path / "other"
    syn.generate(other, N, SHAPE, seed=8)
    a, b = tree_bytes(root), tree_bytes(other)
    assert a.keys() == b.keys()
    assert a["OCTA_6mm/OCTA/10001/5.bmp"] != b["OCTA_6mm/OCTA/10001/5.bmp"]


# Signature direction: a diseased eye vs its healthy twin (same seed/index = same anatomy and noise).
# (class, mask label, modality, +1 brighter / -1 darker inside the mask)
SIGNATURES = [("DR", 1, "octa", -1), ("DR", 2, "octa", 1), ("CNV", 1, "octa", 1), ("CNV", 1, "oct", 1),
              ("AMD", 1, "oct", 1), ("CSC", 1, "oct", -1), ("RVO", 1, "octa", -1)]


@pytest.mark.parametrize("disease,label,modality,sign", SIGNATURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_signature_direction(disease: str, label: int, modality: str, sign: int, seed: int) -> None:
    shape = (16, 64, 16)
    sick = syn.make_volume(shape, disease, seed=seed, index=2)
    twin = syn.make_volume(shape, "NORMAL", seed=seed, index=2)
    assert not twin["mask"].any()
    inside = sick["mask"] == label
    assert inside.sum() >= 3, f"{disease}: mask label {label} is (almost) empty"
    delta = sick[modality][inside].mean() - twin[modality][inside].mean()
    assert sign * delta > 10, f"{disease} {modality}: mean inside the mask changed by {delta:.1f}"
    # Outside the lesion (and away from deformed layers) the two eyes are the same voxels.
    assert np.array_equal(sick["oct"][:, :5], twin["oct"][:, :5])


def test_drusen_elevate_the_rpe() -> None:
    shape = (16, 64, 16)
    for seed in range(4):
        sick = syn.make_volume(shape, "AMD", seed=seed, index=1)
        twin = syn.make_volume(shape, "NORMAL", seed=seed, index=1)
        deep = (sick["mask"] == 1).sum(1) >= 3  # columns under a druse
        s, w = np.nonzero(deep)
        # Brightest (3-row smoothed) depth of each column: the RPE; the median resists speckle outliers.
        peak = [np.median(uniform_filter1d(v["oct"][s, :, w].astype(np.float32), 3, axis=1).argmax(1))
                for v in (sick, twin)]
        assert peak[0] - peak[1] <= -1  # the RPE sits higher (smaller row index) over drusen


@pytest.mark.parametrize("modality", ["oct", "octa"])
def test_retina_band_in_the_middle_rows(modality: str) -> None:
    for seed in range(3):
        vol = syn.make_volume((12, 64, 12), "NORMAL", seed=seed)[modality].astype(np.float32)
        profile = vol.mean(axis=(0, 2))
        peak = int(profile.argmax())
        assert 0.25 * 64 < peak < 0.8 * 64
        assert profile[:6].mean() < 0.3 * profile.max() and profile[-6:].mean() < 0.5 * profile.max()


def test_nifti_layout(tmp_path: Path) -> None:
    root = tmp_path / "nii"
    recs = syn.generate(root, 3, SHAPE, seed=1, layout="nifti")
    assert sorted(p.name for p in root.iterdir()) == ["manifest.csv", syn.MARKER, "volumes"]
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    assert list(manifest.columns) == ["subject", "label", "path", "group", "mask"]
    assert manifest["label"].tolist() == ["NORMAL", "AMD", "CNV"]
    for row, rec in zip(manifest.itertuples(), recs):
        assert row.path == f"volumes/{rec['id']}_octa.nii.gz" and row.mask == f"volumes/{rec['id']}_mask.nii.gz"
        vol, mask = sitk.ReadImage(str(root / row.path)), sitk.ReadImage(str(root / row.mask))
        oct_ = sitk.ReadImage(str(root / "volumes" / f"{rec['id']}_oct.nii.gz"))
        for img in (vol, mask, oct_):
            assert img.GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0]) and img.GetPixelID() == sitk.sitkUInt8
            assert np.allclose(img.GetSpacing(), syn.spacing_of(SHAPE))
        assert np.array_equal(sitk.GetArrayFromImage(vol), syn.make_volume(SHAPE, row.label, 1, int(row.Index))["octa"])


def test_both_layouts_share_the_masks(tmp_path: Path) -> None:
    root = tmp_path / "both"
    syn.generate(root, 2, SHAPE, layout="both")
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    assert manifest["mask"].tolist() == ["OCTA_6mm/Lesion Masks/10001.nii.gz", "OCTA_6mm/Lesion Masks/10002.nii.gz"]
    assert (root / "Text labels.xlsx").is_file() and (root / "OCTA_6mm" / "OCTA" / "10002").is_dir()


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "d"
    syn.generate(root, 2, SHAPE)
    with pytest.raises(DataError, match="--overwrite"):
        syn.generate(root, 2, SHAPE)
    syn.generate(root, 1, SHAPE, overwrite=True)  # replaces it: no stale eye left
    assert [p.name for p in (root / "OCTA_6mm" / "OCTA").iterdir()] == ["10001"]
    real = tmp_path / "real"
    (real / "OCTA_6mm" / "OCTA").mkdir(parents=True)
    with pytest.raises(DataError, match="not written by --mode synth"):
        syn.generate(real, 1, SHAPE, overwrite=True)
    assert (real / "OCTA_6mm" / "OCTA").is_dir()
