"""DataHandler: item structure, label filtering, patch datasets, the persistent cache (hits, invalidation,
corruption) and patch aggregation — with a fake loader that counts its calls."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from octa3d.config import Config
from octa3d.data.datasets import DataHandler, aggregate_patches, source_fingerprint
from octa3d.data.subject import Geometry, Subject
from octa3d.data.transforms import PreprocessRecord
from octa3d.errors import DataError

CLASSES = ["NORMAL", "DR"]


class FakeLabels:
    """Duck-typed label map: OTHERS is an excluded class."""

    class_names = CLASSES

    def index(self, raw):
        return {"NORMAL": 0, "DR": 1}.get(raw)


class CountingLoader:
    """Fake ``load_subject``: a banded uint8 volume (or 2D image) per subject; counts calls."""

    def __init__(self, shape=(1, 12, 40, 12)):
        self.shape, self.calls = shape, 0

    def __call__(self, subject: Subject, modality: str):
        self.calls += 1
        rng = np.random.default_rng(int(subject.id[1:]))
        a = rng.integers(0, 30, self.shape, dtype=np.uint8)
        if len(self.shape) == 4:
            a[:, :, 15:23] += 150
        return a, Geometry.default(a.shape[1:])


@pytest.fixture
def data_log(caplog):
    # the "octa3d" logger may not propagate (utils.log.setup_logging): listen on octa3d.data directly
    lg = logging.getLogger("octa3d.data")
    old = lg.level
    lg.addHandler(caplog.handler)
    lg.setLevel(logging.DEBUG)
    yield caplog
    lg.removeHandler(caplog.handler)
    lg.setLevel(old)


def make_cfg(tmp_path: Path, dim="3d", size=(16,), **pre) -> Config:
    cfg = Config()
    cfg.model.dim = dim
    cfg.run.num_workers = 0
    cfg.preprocess.input_size = list(size)
    cfg.preprocess.augment = False
    cfg.preprocess.cache_dir = str(tmp_path / "cache")
    for k, v in pre.items():
        setattr(cfg.preprocess, k, v)
    return cfg


def make_subjects(tmp_path: Path, labels=("NORMAL", "DR", "DR", "NORMAL"), key="OCTA") -> list[Subject]:
    subs = []
    for i, lab in enumerate(labels):
        f = tmp_path / "scans" / f"s{i}.npy"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"source file")                 # only its size/mtime matter to the cache key
        subs.append(Subject(f"s{i}", lab, {key: str(f)}))
    return subs


def drain(handler: DataHandler, subjects, train=False):
    return [handler.dataset(subjects, train)[i] for i in range(len(subjects))]


# ---------------------------------------------------------------------------------------------- items
def test_item_structure_and_labels(tmp_path):
    subs = make_subjects(tmp_path)
    h = DataHandler(make_cfg(tmp_path), FakeLabels(), loader=CountingLoader())
    ds = h.dataset(subs, train=False)
    assert len(ds) == 4 and ds.labels == [0, 1, 1, 0]
    item = ds[1]
    assert set(item) == {"image", "label", "subject", "patch"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 16, 16, 16)
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    assert item["subject"] == "s1" and item["patch"] == -1
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    rec = h.record("s1")
    assert isinstance(rec, PreprocessRecord) and rec.geometry.shape == (12, 40, 12)


def test_train_items_augmented_and_loader_batches(tmp_path):
    subs = make_subjects(tmp_path)
    cfg = make_cfg(tmp_path, augment=True)
    h = DataHandler(cfg, FakeLabels(), loader=CountingLoader())
    item = h.dataset(subs, train=True)[0]
    assert type(item["image"]) is torch.Tensor and item["image"].dtype == torch.float32
    assert item["image"].shape == (1, 16, 16, 16)
    batches = list(h.loader(subs, train=True, batch_size=3))
    assert [len(b["subject"]) for b in batches] == [3]  # a lone last training sample is dropped (BatchNorm)
    assert [len(b["subject"]) for b in h.loader(subs, train=False, batch_size=3)] == [3, 1]
    assert batches[0]["image"].shape == (3, 1, 16, 16, 16) and batches[0]["label"].dtype == torch.int64
    order = [s for b in batches for s in b["subject"]]
    again = [s for b in h.loader(subs, train=True, batch_size=3) for s in b["subject"]]
    assert order == again                             # seeded shuffling
    ev = [s for b in h.loader(subs, train=False, batch_size=3) for s in b["subject"]]
    assert ev == ["s0", "s1", "s2", "s3"]


def test_excluded_labels_dropped_and_empty_raises(tmp_path, data_log):
    subs = make_subjects(tmp_path, labels=("NORMAL", "OTHERS", "DR", None))
    h = DataHandler(make_cfg(tmp_path), FakeLabels(), loader=CountingLoader())
    ds = h.dataset(subs, train=False)
    assert ds.subject_ids == ["s0", "s2"]
    assert any("dropped 2 subject" in r.getMessage() and r.levelno == logging.INFO for r in data_log.records)
    with pytest.raises(DataError, match="no usable subjects"):
        h.dataset(subs[1:2], train=True)


# ---------------------------------------------------------------------------------------------- cache
def test_cache_hit_skips_loader(tmp_path, data_log):
    subs = make_subjects(tmp_path)
    loader = CountingLoader()
    cfg = make_cfg(tmp_path)
    first = drain(DataHandler(cfg, FakeLabels(), loader=loader), subs)
    assert loader.calls == 4
    files = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 4 and len(list((tmp_path / "cache").rglob("*.json"))) == 4
    arr = np.load(files[0], mmap_mode="r")
    assert arr.dtype == np.float16 and arr.shape == (1, 16, 16, 16) and files[0].parent.name == files[0].stem[:2]
    h2 = DataHandler(make_cfg(tmp_path), FakeLabels(), loader=loader)   # a new handler, same settings
    second = drain(h2, subs)
    assert loader.calls == 4
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"])
    assert h2.warm(subs) == {"hits": 4, "misses": 0} and loader.calls == 4
    assert any("4 hits, 0 misses" in r.getMessage() for r in data_log.records)


@pytest.mark.parametrize("change", ["input_size", "clip_percentiles", "slab_depth", "touch", "modality"])
def test_cache_invalidation(tmp_path, change):
    subs = make_subjects(tmp_path)
    loader = CountingLoader()
    assert DataHandler(make_cfg(tmp_path), FakeLabels(), loader=loader).warm(subs, progress=False)["misses"] == 4
    cfg = make_cfg(tmp_path)
    if change == "input_size":
        cfg.preprocess.input_size = [12]
    elif change == "clip_percentiles":
        cfg.preprocess.clip_percentiles = [1.0, 99.0]
    elif change == "slab_depth":
        cfg.preprocess.slab_depth = 0.4
    elif change == "modality":
        cfg.data.modality = "OCT"
    else:
        p = Path(subs[2].paths["OCTA"])
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    h = DataHandler(cfg, FakeLabels(), loader=loader)
    counts = h.warm(subs, progress=False)
    expected = 1 if change == "touch" else 4
    assert counts["misses"] == expected and loader.calls == 4 + expected
    drain(h, subs)
    assert loader.calls == 4 + expected
    if change == "input_size":
        assert h.dataset(subs, False)[0]["image"].shape == (1, 12, 12, 12)


def test_folder_fingerprint_changes_with_slices(tmp_path):
    folder = tmp_path / "OCTA" / "10001"
    folder.mkdir(parents=True)
    for i in (1, 2):
        (folder / f"{i}.bmp").write_bytes(b"x" * i)
    before = source_fingerprint([str(folder)])
    assert source_fingerprint([str(folder)]) == before
    (folder / "3.bmp").write_bytes(b"y")
    assert source_fingerprint([str(folder)]) != before


@pytest.mark.parametrize("what", ["npy", "json"])
def test_corrupt_cache_entry_rebuilt(tmp_path, data_log, what):
    subs = make_subjects(tmp_path)[:1]
    loader = CountingLoader()
    h = DataHandler(make_cfg(tmp_path), FakeLabels(), loader=loader)
    good = h.dataset(subs, False)[0]["image"]
    (victim,) = (tmp_path / "cache").rglob(f"*.{what}")
    victim.write_bytes(victim.read_bytes()[: 40])     # truncated write / disk trouble
    h2 = DataHandler(make_cfg(tmp_path), FakeLabels(), loader=loader)
    item = h2.dataset(subs, False)[0]
    assert loader.calls == 2 and torch.equal(item["image"], good)
    assert any(r.levelno == logging.WARNING and "rebuilding" in r.getMessage() for r in data_log.records)
    drain(DataHandler(make_cfg(tmp_path), FakeLabels(), loader=loader), subs)
    assert loader.calls == 2                           # the rebuilt entry is good


# ---------------------------------------------------------------------------------------------- 2D patches
def test_patch_dataset_items_inherit_labels(tmp_path):
    subs = make_subjects(tmp_path, labels=("NORMAL", "DR"), key="image")
    loader = CountingLoader(shape=(1, 30, 40))
    cfg = make_cfg(tmp_path, dim="2d", size=(12,), patch_size=20, patch_stride=0)
    h = DataHandler(cfg, FakeLabels(), loader=loader)
    ds = h.dataset(subs, train=False)
    assert len(ds) == 2 * 4 and loader.calls == 2                     # 2x2 grid per image, cached once
    items = [ds[i] for i in range(len(ds))]
    assert [it["patch"] for it in items] == [0, 1, 2, 3] * 2
    assert [int(it["label"]) for it in items] == [0] * 4 + [1] * 4
    assert all(it["image"].shape == (1, 12, 12) and it["image"].dtype == torch.float32 for it in items)
    assert h.record("s1").patches[3] == [(10, 30), (20, 40)]           # last row/col aligned to the border
    assert loader.calls == 2


def test_whole_image_2d_dataset(tmp_path):
    subs = make_subjects(tmp_path, labels=("NORMAL", "DR"), key="image")
    h = DataHandler(make_cfg(tmp_path, dim="2d", size=(16, 20)), FakeLabels(), loader=CountingLoader((1, 30, 40)))
    item = h.dataset(subs, train=False)[1]
    assert item["image"].shape == (1, 16, 20) and item["patch"] == -1


def test_aggregate_patches_means():
    ids = ["a", "b", "a", "c", "b", "a"]
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.4, 0.6], [1.0, 0.0], [0.8, 0.2], [0.0, 1.0]])
    uniq, mean = aggregate_patches(ids, torch.from_numpy(probs))
    assert uniq == ["a", "b", "c"]
    np.testing.assert_allclose(mean, [[0.2, 0.8], [0.7, 0.3], [1.0, 0.0]])
    uniq, mean = aggregate_patches(ids, probs[:, 1])
    np.testing.assert_allclose(mean, [0.8, 0.3, 0.0])
    with pytest.raises(ValueError):
        aggregate_patches(ids[:-1], probs)


def test_epoch_sampler_order_depends_on_seed_and_epoch_and_shards_cover_all():
    from octa3d.data.datasets import EpochSampler

    s = EpochSampler(10, shuffle=True, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e0] != [i for i, _ in e1] and {e for _, e in e1} == {1}
    s.set_epoch(0)
    assert list(s) == e0  # a resumed run draws the same epoch again
    shards = [EpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    seen = [i for sh in shards for i, _ in sh]
    assert len(seen) == 12 and set(seen) == set(range(10))  # padded with repeats, nothing dropped


def test_augmentation_is_independent_of_workers(tmp_path):
    """Same (seed, epoch) -> same augmented batches whether loaded in-process or by 2 workers."""
    subjects = make_subjects(tmp_path)
    out = []
    for workers in (0, 2):
        cfg = make_cfg(tmp_path, augment=True)
        cfg.run.num_workers = workers
        handler = DataHandler(cfg, FakeLabels(), loader=CountingLoader())
        loader = handler.loader(subjects, train=True, batch_size=2)
        loader.sampler.set_epoch(1)
        out.append(torch.cat([b["image"] for b in loader]))
    assert torch.equal(out[0], out[1])


def test_training_loader_never_ends_with_a_single_sample(tmp_path):
    subjects = make_subjects(tmp_path, labels=("NORMAL", "DR", "DR", "NORMAL", "DR"))
    handler = DataHandler(make_cfg(tmp_path), FakeLabels(), loader=CountingLoader())
    sizes = [len(b["label"]) for b in handler.loader(subjects, train=True, batch_size=2)]
    assert sizes == [2, 2]  # 5 = 2 + 2 + 1: the lone sample would break BatchNorm
    assert [len(b["label"]) for b in handler.loader(subjects, train=False, batch_size=2)] == [2, 2, 1]
