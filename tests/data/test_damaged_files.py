"""Damaged inputs: every reader refuses a file shorter than its header says, naming it, and
refuses a declared size above ``--max-voxels`` before allocating it (checked in a subprocess under a small
``RLIMIT_AS``). The damaged files are generated here from small valid ones."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.config import Config
from octa3d.config.schema import DataConfig
from octa3d.data.bmp import bmp_dims, encode_bmp8
from octa3d.data.datasets import PreprocessCache
from octa3d.data.presets import build_preset
from octa3d.data.readers import MAX_VOXELS, load_subject, read_image_2d, read_volume
from octa3d.data.subject import Subject
from octa3d.errors import DataError

RNG = np.random.default_rng(0)
VOL = RNG.integers(1, 250, (6, 20, 24)).astype(np.uint8)


def bmp_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, sl in enumerate(VOL, 1):
        (folder / f"{i}.bmp").write_bytes(encode_bmp8(sl))
    return folder


# ------------------------------------------------------------------------------------------- item 1: truncation
@pytest.mark.parametrize("keep", [30, 600, -10])
def test_truncated_bmp_slice_is_refused_naming_it(tmp_path, keep, cut):
    folder = bmp_folder(tmp_path / "OCTA" / "10001")
    assert np.array_equal(read_volume(folder)[0], VOL)
    cut(folder / "3.bmp", keep)
    with pytest.raises(DataError, match=r"3\.bmp is truncated"):
        read_volume(folder)


@pytest.mark.parametrize("keep", [30, 700])
def test_truncated_bmp_image_is_refused(tmp_path, keep, cut):
    f = tmp_path / "a.bmp"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([VOL[0]] * 3, -1), isVector=True), str(f))  # 24-bit
    cut(f, keep)
    with pytest.raises(DataError, match=r"a\.bmp is truncated"):
        read_image_2d(f)


def rle8_bmp(width: int, height: int, body: bytes) -> bytes:
    """An 8-bit RLE-compressed BMP (BI_RLE8) whose header declares ``body``'s size."""
    offset = 14 + 40 + 1024
    palette = np.zeros((256, 4), np.uint8)
    palette[:, :3] = np.arange(256, dtype=np.uint8)[:, None]
    header = b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 0, 0, 256, 256)
    return header + info + palette.tobytes() + body


def test_truncated_rle8_bmp_is_reported_from_its_declared_size():
    body = b"".join(bytes([24, 7, 0, 0]) for _ in range(20)) + b"\x00\x01"  # 20 rows of 24 pixels of 7
    data = rle8_bmp(24, 20, body)
    assert bmp_dims(data[:38], len(data)) == (24, 20, 8)
    assert bmp_dims(data[:38], len(data) - 30).startswith("truncated")


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, name, cut):
    f = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(VOL), str(f))
    cut(f, -200)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')} is truncated"):
        read_volume(f)


def test_complete_multi_member_gzip_nifti_is_read(tmp_path):
    """A trailer that disagrees (two gzip members) is decompressed and counted, not refused."""
    plain = tmp_path / "v.nii"
    sitk.WriteImage(sitk.GetImageFromArray(VOL), str(plain))
    data = plain.read_bytes()
    (tmp_path / "m.nii.gz").write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert np.array_equal(read_volume(tmp_path / "m.nii.gz")[0], VOL)


def test_truncated_multipage_tiff_does_not_lose_pages(tmp_path, cut):
    f = tmp_path / "v.tif"
    sitk.WriteImage(sitk.GetImageFromArray(VOL), str(f))
    assert read_volume(f)[0].shape == VOL.shape
    cut(f, -100)
    with pytest.raises(DataError, match=r"v\.tif is truncated or damaged \(page"):
        read_volume(f)


def test_truncated_jpeg_is_refused_alone_and_in_a_slice_folder(tmp_path, cut):
    folder = tmp_path / "scan"
    folder.mkdir()
    for i, sl in enumerate(VOL, 1):
        sitk.WriteImage(sitk.GetImageFromArray(sl), str(folder / f"{i}.jpg"))
    assert read_volume(folder)[0].shape == VOL.shape
    cut(folder / "2.jpg", -40)
    with pytest.raises(DataError, match=r"2\.jpg is truncated .*end-of-image"):
        read_volume(folder)
    with pytest.raises(DataError, match=r"2\.jpg is truncated"):
        read_image_2d(folder / "2.jpg")


def test_truncated_npy_is_refused(tmp_path, cut):
    np.save(tmp_path / "v.npy", VOL)
    with pytest.raises(DataError, match=r"v\.npy is truncated"):
        read_volume(cut(tmp_path / "v.npy", -50))


def test_truncated_dicom_file_does_not_silently_drop_a_slice(tmp_path, cut, dicom_series):
    dicom_series(tmp_path, VOL)
    assert read_volume(tmp_path)[0].shape == VOL.shape
    cut(tmp_path / "3.dcm", -300)
    with pytest.raises(DataError, match=r"3\.dcm belong\(s\) to no readable series"):
        read_volume(tmp_path)


def test_cache_never_stores_a_sample_read_from_a_damaged_file(tmp_path, cut):
    folder = bmp_folder(tmp_path / "OCTA" / "10001")
    cut(folder / "4.bmp", 600)
    cfg = Config()
    cfg.data.modality = "OCTA"
    cfg.model.input_size = [16]
    cfg.preprocess.cache_dir = str(tmp_path / "cache")
    cache = PreprocessCache(tmp_path / "cache", build_preset(cfg))
    subject = Subject(id="10001", label="NORMAL", paths={"OCTA": str(folder)})
    with pytest.raises(DataError, match=r"4\.bmp is truncated"):
        cache.get(subject)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


# ------------------------------------------------------------------------------ item 2: bounded memory
def test_the_default_bound_is_the_schema_default():
    assert MAX_VOXELS == DataConfig().max_voxels == 1_000_000_000


def test_max_voxels_reaches_the_readers(tmp_path):
    folder = bmp_folder(tmp_path / "OCTA" / "10001")
    subject = Subject(id="10001", label=None, paths={"OCTA": str(folder)})
    assert load_subject(subject, "OCTA", max_voxels=VOL.size)[0].shape == (1, *VOL.shape)
    with pytest.raises(DataError, match=r"10001.*24×20×6 = 2,880 voxels \(6 slices.*--max-voxels 2,879"):
        load_subject(subject, "OCTA", max_voxels=VOL.size - 1)


def bomb_files(folder: Path) -> dict[str, Path]:
    """Small files whose headers declare more than 10⁹ voxels (the issue's memory bombs)."""
    out = {}
    big = encode_bmp8(np.zeros((2, 2), np.uint8))
    head = bytearray(big[:54])
    struct.pack_into("<ii", head, 18, 60000, 40000)
    out["bmp"] = folder / "bomb.bmp"
    out["bmp"].write_bytes(bytes(head) + big[54:] + bytes(100))  # ~1.2 KB
    out["rle8"] = folder / "rle.bmp"
    out["rle8"].write_bytes(rle8_bmp(60000, 40000, b"\x00\x01"))  # ~1 KB
    slices = folder / "slices"
    slices.mkdir()
    for i in (1, 2):
        (slices / f"{i}.bmp").write_bytes(out["bmp"].read_bytes())
    out["slices"] = slices
    out["npy"] = folder / "bomb.npy"
    with open(out["npy"], "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2000,) * 3})
        f.write(bytes(64))
    for name in ("bomb.nii", "bomb.nii.gz"):
        small = folder / "small.nii"
        sitk.WriteImage(sitk.GetImageFromArray(VOL), str(small))
        hdr = bytearray(small.read_bytes())
        struct.pack_into("<4h", hdr, 40, 3, 5000, 5000, 5000)
        out[name] = folder / name
        out[name].write_bytes(gzip.compress(bytes(hdr)) if name.endswith(".gz") else bytes(hdr))
    return out


CHILD = """
import json, resource, sys
from octa3d.data.readers import read_image_2d, read_volume
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 400 * 2**20, resource.RLIM_INFINITY))  # 400 MB to spare
out = {}
for kind, path in json.loads(sys.argv[1]).items():
    try:
        (read_image_2d if kind in ("bmp", "rle8") else read_volume)(path)
        out[kind] = "read"
    except BaseException as exc:
        out[kind] = f"{type(exc).__name__}: {exc}"
try:  # the guard works: an allocation of the bombs' size fails under this limit
    bytearray(2_400_000_000)
    out["probe"] = "allocated"
except MemoryError:
    out["probe"] = "MemoryError"
print(json.dumps(out))
"""


def test_memory_bombs_are_refused_before_allocation(tmp_path):
    files = bomb_files(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("probe") == "MemoryError"
    for kind, path in files.items():
        assert got[kind].startswith("DataError: ") and "--max-voxels" in got[kind], (kind, got[kind])
        assert path.name in got[kind], got[kind]


def test_full_disk_while_caching_is_one_line_and_leaves_no_entry(tmp_path, monkeypatch):
    import errno

    from octa3d.errors import Octa3dError

    folder = bmp_folder(tmp_path / "OCTA" / "10001")
    cfg = Config()
    cfg.data.modality = "OCTA"
    cfg.model.input_size = [16]
    cache = PreprocessCache(tmp_path / "cache", build_preset(cfg))
    subject = Subject(id="10001", label="NORMAL", paths={"OCTA": str(folder)})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(Octa3dError, match=r"disk is full") as err:
        cache.get(subject)
    assert str(tmp_path / "cache") in str(err.value) and "\n" not in str(err.value)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    assert cache.lookup(cache.key(subject)) is None
