"""The Data_Handler: labelled subjects → cached, preprocessed datasets and seeded DataLoaders.

Cache design. The deterministic preprocessing of a subject (decode, slab crop, clip/scale, resize) is stored once
under ``cache_dir``::

    <cache_dir>/<key[:2]>/<key>.npy    float16 array (memory-mappable: np.load(mmap_mode="r"))
    <cache_dir>/<key[:2]>/<key>.json   its PreprocessRecord

``key`` = SHA-256 of (a) the preset's settings (kind, modality, input shape, depth axis, slab depth, clip
percentiles, and for 2D projection/patch settings, plus :data:`~octa3d.data.transforms.PREPROCESS_VERSION`),
(b) a fingerprint of every source file/folder (absolute path + size + ``mtime_ns``; for a folder of slices a
hash of its sorted ``(name, size, mtime_ns)`` entries) and (c) the subject's imposed spacing. Changing a setting
or touching a file therefore yields a new key: stale entries are never read (they are simply left behind;
delete the folder to reclaim space). Both files are written atomically; an entry that cannot be read back (or
whose shape disagrees with its record) is rebuilt with a warning. MONAI's ``PersistentDataset`` was not used: it
hashes the input dictionary, not the files behind it, and cannot store records, float16 or patch grids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from octa3d.config import Config
from octa3d.data.presets import build_preset
from octa3d.data.subject import Subject
from octa3d.data.transforms import ImageReader, Loader, PreprocessRecord
from octa3d.errors import DataError
from octa3d.utils import dist
from octa3d.utils.io import atomic_path, atomic_write_text
from octa3d.utils.seed import seed_worker
from octa3d.utils.tracking import progress_enabled

log = logging.getLogger("octa3d.data")


class LabelMap(Protocol):
    """What the handler needs from :mod:`octa3d.data.labels` (duck-typed)."""

    class_names: Sequence[str]

    def index(self, raw_label: str) -> int | None:
        """Class index of a raw label, or None when the class is excluded."""


# ---------------------------------------------------------------------------------------------- cache
def source_fingerprint(paths: Iterable[str]) -> list[list[Any]]:
    """Identity of the source files: ``[abs_path, size, mtime_ns]`` per file, a listing hash per folder."""
    out: list[list[Any]] = []
    for p in sorted({os.path.abspath(p) for p in paths}):
        try:
            st = os.stat(p)
        except OSError:
            out.append([p, "missing"])  # the loader reports it; a later appearance changes the key
            continue
        if stat.S_ISDIR(st.st_mode):
            entries = []
            with os.scandir(p) as it:
                for e in it:
                    es = e.stat()
                    entries.append((e.name, es.st_size, es.st_mtime_ns))
            digest = hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()
            out.append([p, "dir", len(entries), digest])
        else:
            out.append([p, st.st_size, st.st_mtime_ns])
    return out


class PreprocessCache:
    """Persistent cache of one preset's deterministic output (see the module docstring).

    Args:
        root: cache folder.
        preset: a :class:`~octa3d.data.presets.Clip3DPreset` / ``Patch2DPreset``.
    """

    def __init__(self, root: str | Path, preset: Any) -> None:
        self.root = Path(root)
        self.preset = preset
        self.hits = 0
        self.misses = 0

    def key(self, subject: Subject) -> str:
        """Cache key of ``subject`` under the preset's settings and its files' current state."""
        doc = {"settings": self.preset.cache_settings(),
               "sources": source_fingerprint(self.preset.source_paths(subject)),
               "spacing": list(subject.spacing) if subject.spacing else None}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def paths(self, key: str) -> tuple[Path, Path]:
        """``(<key>.npy, <key>.json)``."""
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def lookup(self, key: str, subject_id: str = "?") -> tuple[np.ndarray, PreprocessRecord] | None:
        """The memory-mapped array and record under ``key``, or None if absent or unreadable."""
        npy, meta = self.paths(key)
        if not (npy.exists() and meta.exists()):
            return None
        try:
            record = PreprocessRecord.from_dict(json.loads(meta.read_text(encoding="utf-8")))
            array = np.load(npy, mmap_mode="r")
            if array.dtype != np.float16 or tuple(array.shape) != record.stored_shape:
                raise ValueError(f"stored {array.dtype}{tuple(array.shape)}, record says {record.stored_shape}")
        except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            log.warning("cache entry %s of subject %s is unreadable (%s); rebuilding it", npy, subject_id, exc)
            return None
        return array, record

    def store(self, key: str, array: np.ndarray, record: PreprocessRecord) -> None:
        """Write an entry atomically (array first: a record on disk implies its array is complete)."""
        npy, meta = self.paths(key)
        with atomic_path(npy) as tmp:
            np.save(tmp, np.ascontiguousarray(array, dtype=np.float16))
        try:
            atomic_write_text(meta, json.dumps(record.to_dict()))
        except BaseException:
            npy.unlink(missing_ok=True)  # an array without its record is never read: do not leave it behind
            raise

    def get(self, subject: Subject, key: str | None = None) -> tuple[np.ndarray, PreprocessRecord]:
        """The cached entry of ``subject``, preprocessing and storing it on a miss."""
        key = key or self.key(subject)
        hit = self.lookup(key, subject.id)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        log.debug("cache miss: subject %s (key %s)", subject.id, key[:12])
        array, record = self.preset.preprocess(subject)
        self.store(key, array, record)
        hit = self.lookup(key, subject.id)
        if hit is None:  # unwritable/odd file system: still serve this sample
            return array.astype(np.float16), record
        return hit


# ---------------------------------------------------------------------------------------------- dataset
class SubjectDataset(Dataset):
    """Samples of labelled subjects from the cache: one per subject, or one per patch for patch grids.

    Items: ``{"image": float32 (C, *input_shape), "label": int64 scalar, "subject": str, "patch": int}``
    (``patch`` = -1 for whole-image samples).
    """

    def __init__(self, items: list[tuple[Subject, int]], cache: PreprocessCache, train: bool,
                 patch_counts: list[int] | None = None, seed: int = 0) -> None:
        self.items, self.cache, self.train, self.seed = items, cache, train, seed
        self.preset = cache.preset
        self.index: list[tuple[int, int]] = []
        for i in range(len(items)):
            n = patch_counts[i] if patch_counts else 0
            self.index.extend((i, p) for p in (range(n) if n else [-1]))
        self._keys: dict[int, str] = {}  # per process: file stats once per subject, not once per epoch

    @property
    def labels(self) -> list[int]:
        """Label of every sample (for class weights / weighted samplers)."""
        return [self.items[i][1] for i, _ in self.index]

    @property
    def subject_ids(self) -> list[str]:
        """Subject of every sample."""
        return [self.items[i][0].id for i, _ in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        # EpochSampler yields (index, epoch): the augmentation of a sample is then a function of (seed, epoch,
        # index) alone -- the same with any --num-workers, under DDP, and after --resume.
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        si, patch = self.index[i]
        subject, label = self.items[si]
        if si not in self._keys:
            self._keys[si] = self.cache.key(subject)
        stored, record = self.cache.get(subject, self._keys[si])
        image = torch.from_numpy(self.preset.sample(stored, record, patch))
        if self.train:
            self.preset.augment.set_random_state(seed=_mix(self.seed, epoch, i))
            image = torch.as_tensor(self.preset.augment({"image": image})["image"], dtype=torch.float32)
        return {"image": image.contiguous(), "label": torch.tensor(label, dtype=torch.int64),
                "subject": subject.id, "patch": patch}


def _mix(*values: int) -> int:
    """A 32-bit seed from several integers (splitmix-style, so nearby inputs give unrelated seeds)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h % 2**32


class EpochSampler(Sampler):
    """Per-epoch order from ``(seed, epoch)``, sharded over DDP ranks, yielding ``(index, epoch)`` pairs.

    Like ``DistributedSampler`` (padding with repeats so every rank gets the same count; evaluation code keys
    predictions by subject so repeats count once), but it also hands the epoch to the dataset so augmentation is
    reproducible without relying on worker RNG streams. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) is drawn next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world
        order += order[: total - len(order)] if order else []
        return iter((i, self.epoch) for i in order[self.rank:total:self.world])


def _init_worker(worker_id: int) -> None:
    """Seed NumPy/Python from torch's per-worker seed, and the MONAI random transforms of this worker's copy."""
    seed_worker(worker_id)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "preset"):
        info.dataset.preset.augment.set_random_state(seed=info.seed % 2**32)


class DataHandler:
    """Builds datasets and loaders for a stage from labelled subjects, with the persistent preprocessing cache.

    Args:
        cfg: the run's :class:`~octa3d.config.Config` (preprocessing settings, seed, workers, cache folder).
        label_map: object with ``.index(raw_label) -> int | None`` and ``.class_names``.
        loader: ``(subject, modality) -> (array (C, *spatial), Geometry)``; default
            :func:`octa3d.data.readers.load_subject`.
        image_reader: ``path -> (H, W)`` for projection-map BMPs; default :func:`octa3d.data.readers.read_image_2d`.
    """

    def __init__(self, cfg: Config, label_map: LabelMap, loader: Loader | None = None,
                 image_reader: ImageReader | None = None) -> None:
        self.cfg, self.label_map = cfg, label_map
        self.preset = build_preset(cfg, loader=loader, image_reader=image_reader)
        self.cache = PreprocessCache(cfg.cache_dir, self.preset)
        self._subjects: dict[str, Subject] = {}
        # seeded once (not per dataset): a loader rebuilt every epoch must not replay the same augmentations
        self.preset.augment.set_random_state(seed=cfg.run.seed % 2**32)

    def _register(self, subjects: Iterable[Subject]) -> None:
        for s in subjects:
            self._subjects[s.id] = s

    def labelled(self, subjects: Sequence[Subject]) -> list[tuple[Subject, int]]:
        """``(subject, class index)`` pairs; subjects whose label is excluded (or missing) are dropped (INFO)."""
        kept, dropped = [], {}
        for s in subjects:
            idx = self.label_map.index(s.label) if s.label is not None else None
            if idx is None:
                dropped[str(s.label)] = dropped.get(str(s.label), 0) + 1
            else:
                kept.append((s, int(idx)))
        if dropped:
            log.info("dropped %d subject(s) with excluded labels: %s", sum(dropped.values()),
                     ", ".join(f"{k} x{v}" for k, v in sorted(dropped.items())))
        return kept

    def warm(self, subjects: Sequence[Subject], progress: bool = True) -> dict[str, int]:
        """Preprocess every (labelled) subject missing from the cache, with a progress bar.

        Run before training so that epoch 1 does not pay decode time inside the loop.

        Returns:
            ``{"hits": n, "misses": n}`` for these subjects.
        """
        return self._warm(self.labelled(subjects), progress)

    def _warm(self, items: list[tuple[Subject, int]], progress: bool) -> dict[str, int]:
        from tqdm.auto import tqdm


        self._register(s for s, _ in items)
        keyed = [(s, self.cache.key(s)) for s, _ in items]
        missing = [(s, k) for s, k in keyed if self.cache.lookup(k, s.id) is None]
        counts = {"hits": len(keyed) - len(missing), "misses": len(missing)}
        log.debug("cache %s: %d hits, %d misses", self.cache.root, counts["hits"], counts["misses"])
        for s, k in tqdm(missing, desc=f"preprocessing {len(missing)} subjects", unit="subject",
                         disable=not progress or not missing or not progress_enabled(), leave=False):
            self.cache.get(s, k)
        return counts

    def dataset(self, subjects: Sequence[Subject], train: bool) -> SubjectDataset:
        """Dataset of the labelled ``subjects`` (train: with augmentation when ``--augment``).

        Raises:
            DataError: when no subject is left after dropping excluded labels.
        """
        items = self.labelled(subjects)
        if not items:
            raise DataError(f"no usable subjects for this {'training' if train else 'evaluation'} dataset "
                            f"({len(subjects)} given; classes kept: {', '.join(self.label_map.class_names)})")
        self._register(s for s, _ in items)
        counts = None
        if self.cfg.preprocess.patch_size > 0 and self.cfg.spatial_dims == 2:
            # the patch count of each image is in its record: preprocess (or read) them now
            self._warm(items, progress=True)
            counts = [self.record(s.id).n_samples for s, _ in items]
        return SubjectDataset(items, self.cache, train, counts, seed=self.cfg.run.seed)

    def loader(self, subjects: Sequence[Subject], train: bool, batch_size: int, shuffle: bool | None = None,
               sampler: Sampler | None = None, num_workers: int | None = None,
               drop_last: bool | None = None) -> DataLoader:
        """DataLoader over :meth:`dataset` (seeded shuffling and workers).

        The default sampler is an :class:`EpochSampler` (sharded under DDP): call ``loader.sampler.set_epoch(e)``
        before each epoch; order and augmentation then depend only on ``--seed``, the epoch and the sample.

        Args:
            subjects: subjects of this split.
            train: augment (and, by default, shuffle).
            batch_size: samples per batch.
            shuffle: default: ``train``.
            sampler: a custom sampler instead of the :class:`EpochSampler`.
            num_workers: default ``--num-workers``.
            drop_last: drop the last incomplete batch; default: only a training batch of a single sample
                (BatchNorm cannot train on one sample; with per-epoch shuffling no subject is left out for good).
        """
        ds = self.dataset(subjects, train)
        workers = self.cfg.run.num_workers if num_workers is None else num_workers
        if sampler is None:
            sampler = EpochSampler(len(ds), train if shuffle is None else shuffle, self.cfg.run.seed,
                                   dist.rank(), dist.world_size())
        if drop_last is None:
            drop_last = train and len(sampler) % batch_size == 1
        gen = torch.Generator()
        gen.manual_seed(self.cfg.run.seed)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          worker_init_fn=_init_worker, generator=gen, pin_memory=torch.cuda.is_available(),
                          persistent_workers=workers > 0, drop_last=drop_last)

    def record(self, subject: str | Subject) -> PreprocessRecord:
        """The :class:`PreprocessRecord` of a subject seen by :meth:`dataset`/:meth:`warm` (or given)."""
        if isinstance(subject, Subject):
            self._register([subject])
            subject = subject.id
        if subject not in self._subjects:
            raise KeyError(f"subject {subject!r} was not passed to this DataHandler")
        return self.cache.get(self._subjects[subject])[1]


def aggregate_patches(subject_ids: Sequence[str], patch_probs: np.ndarray | torch.Tensor
                      ) -> tuple[list[str], np.ndarray]:
    """Subject-level predictions from patch predictions: the mean per subject.

    Args:
        subject_ids: subject of each patch (length N).
        patch_probs: ``(N, K)`` (or ``(N,)``) probabilities.

    Returns:
        Unique subject IDs in order of first appearance, and their mean probabilities ``(S, K)`` / ``(S,)``.
    """
    probs = patch_probs.detach().cpu().numpy() if isinstance(patch_probs, torch.Tensor) else np.asarray(patch_probs)
    probs = probs.astype(np.float64)
    ids = [str(s) for s in subject_ids]
    if len(ids) != len(probs):
        raise ValueError(f"{len(ids)} subject IDs for {len(probs)} predictions")
    order: dict[str, int] = {}
    inv = np.array([order.setdefault(s, len(order)) for s in ids], dtype=np.int64)
    sums = np.zeros((len(order), *probs.shape[1:]))
    np.add.at(sums, inv, probs)
    counts = np.bincount(inv, minlength=len(order)).reshape(-1, *([1] * (probs.ndim - 1)))
    return list(order), sums / counts
