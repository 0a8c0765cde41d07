"""Preprocessing presets: the 3D clip (:class:`Clip3DPreset`) and the 2D patch (:class:`Patch2DPreset`) pipelines.

A preset turns a :class:`~octa3d.data.subject.Subject` into the cacheable network-input array plus its
:class:`~octa3d.data.transforms.PreprocessRecord` (``preprocess``), cuts a stored array into samples (``sample``)
and holds the training augmentation (``augment``). :func:`build_preset` picks the preset for ``--dim``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
from monai.transforms import Compose

from octa3d.config import Config
from octa3d.data.augment import train_augmentation
from octa3d.data.imagefiles import FORMATS_HELP
from octa3d.data.readers import load_subject, read_image_2d
from octa3d.data.subject import Geometry, Subject
from octa3d.data.transforms import (PREPROCESS_VERSION, ClipScaleIntensityd, ClipScaleResized, ImageReader, Loader,
                                    Normalized, PreprocessRecord, ProjectSlabd, ResizeToInputd, RetinalSlabCropd,
                                    apply_transforms, aspect_padding, drop_axis, normalization_stats, normalize,
                                    patch_grid, resize)
from octa3d.errors import ConfigError, DataError

log = logging.getLogger("octa3d.data")


class _Preset:
    """Shared parts of the presets: loading, channel checks, cache settings, per-sample extraction."""

    kind = ""

    def __init__(self, cfg: Config, loader: Loader | None = None, image_reader: ImageReader | None = None) -> None:
        self.cfg = cfg
        self.input_shape = tuple(cfg.input_shape)
        self.channels = cfg.in_channels
        p = cfg.preprocess
        self.depth_axis, self.slab_depth, self.percentiles = p.depth_axis, p.slab_depth, tuple(p.clip_percentiles)
        self._loader, self._reader = loader, image_reader
        #: ``--normalize`` (mean, std) per channel, or None; applied after the cache, to every sample
        self.normalization = normalization_stats(p.normalize, self.channels)
        augment = train_augmentation(cfg.spatial_dims, p.depth_axis) if p.augment else Compose([])
        if self.normalization and p.augment:
            # augmentation is defined on 0..1 values: undo the normalisation around it (one flat Compose, so the
            # random streams of the augmentations are those of the plain pipeline)
            mean, std = self.normalization
            augment = Compose([Normalized("image", mean, std, inverse=True), *augment.transforms,
                               Normalized("image", mean, std)])
        self.augment: Compose = augment

    # loaders are resolved lazily so that the preset pickles cheaply into DataLoader workers
    def load(self, subject: Subject) -> tuple[np.ndarray, Geometry]:
        """Read ``subject`` with the injected loader (default :func:`octa3d.data.readers.load_subject`)."""
        loader = self._loader
        if loader is None:
            loader = functools.partial(load_subject, max_voxels=self.cfg.data.max_voxels)
        try:
            return loader(subject, self.cfg.data.modality)
        except DataError as exc:
            prefix = f"subject {subject.id}: "
            if str(exc).startswith(prefix):  # load_subject names the subject itself: never "subject X: subject X:"
                raise
            raise DataError(prefix + str(exc)) from exc

    @staticmethod
    def _with_scan(subject: Subject, out: tuple[np.ndarray, PreprocessRecord]) -> tuple[np.ndarray, PreprocessRecord]:
        """Keep the subject's scan record (a vendor export's format, laterality and what was done to it, completed
        by the loader) in the preprocessing record, so the cache, test, explain and predict outputs carry it."""
        if subject.meta.get("scan"):
            out[1].meta["scan"] = dict(subject.meta["scan"])
        return out

    def read_2d(self, path: str) -> np.ndarray:
        """Read a 2D image with the injected reader (default :func:`octa3d.data.readers.read_image_2d`)."""
        reader = self._reader
        if reader is None:
            reader = functools.partial(read_image_2d, max_voxels=self.cfg.data.max_voxels)
        return reader(path)

    def source_paths(self, subject: Subject) -> list[str]:
        """Files/folders the preprocessed sample depends on (for the cache key)."""
        wanted = [m for m in self.cfg.data.modality.split("+") if m in subject.paths]
        return sorted(subject.paths[m] for m in wanted) if wanted else sorted(subject.paths.values())

    def cache_settings(self) -> dict[str, Any]:
        """Every setting the deterministic output depends on (part of the cache key)."""
        return {"version": PREPROCESS_VERSION, "kind": self.kind, "modality": self.cfg.data.modality,
                "input_shape": list(self.input_shape), "depth_axis": self.depth_axis,
                "slab_depth": self.slab_depth, "clip_percentiles": list(self.percentiles)}

    def _check_channels(self, image: np.ndarray, subject_id: str) -> np.ndarray:
        c = image.shape[0]
        if c == self.channels:
            return image
        if self.channels == 1 and image.ndim == 3:
            # colour 2D images (fundus photos) → grey; the mean of uint8 channels stays in 0..255
            log.debug("subject %s: averaging %d channels to 1", subject_id, c)
            return image.mean(axis=0, dtype=np.float32)[None]
        raise DataError(f"subject {subject_id}: {c} channel(s), but --modality {self.cfg.data.modality} "
                        f"needs {self.channels}")

    def sample(self, stored: np.ndarray, record: PreprocessRecord, patch: int = -1) -> np.ndarray:
        """One network input ``(C, *input_shape)`` float32 from a stored (possibly memory-mapped) array, normalised
        with ``--normalize``."""
        if not record.patches:
            out = np.array(stored, dtype=np.float32)
        else:
            box = record.patches[patch]
            off = [s for s, _ in record.crop_box]
            region = stored[(slice(None), *(slice(s - o, e - o) for (s, e), o in zip(box, off)))]
            out = resize(np.asarray(region, dtype=np.float32), self.input_shape)
        if self.normalization is not None:
            out = normalize(out, *self.normalization)
        return out


class Clip3DPreset(_Preset):
    """Volumes: retinal slab crop → percentile clip/scale → resize to ``cfg.input_shape`` (3D; last two fused)."""

    kind = "clip3d"

    def __init__(self, cfg: Config, loader: Loader | None = None, image_reader: ImageReader | None = None) -> None:
        super().__init__(cfg, loader, image_reader)
        if len(self.input_shape) != 3:
            raise ConfigError(f"Clip3DPreset needs a 3D input size, got {self.input_shape} (--dim 3d)")
        # clip/scale and resize fused: no full-resolution float copy of the scan (same output as the two steps)
        self.pipeline = [RetinalSlabCropd("image", self.depth_axis, self.slab_depth),
                         ClipScaleResized("image", self.percentiles, self.input_shape)]

    def preprocess(self, subject: Subject) -> tuple[np.ndarray, PreprocessRecord]:
        """Load and preprocess ``subject``: float32 ``(C, *input_shape)`` and its record."""
        image, geometry = self.load(subject)
        if image.ndim == 3:  # (C, H, W): the loader reads 2D images too; name the file, not just the shape
            raise DataError(f"subject {subject.id}: {', '.join(self.source_paths(subject))} is a 2D image of "
                            f"{image.shape[1]}×{image.shape[2]} pixels, not a 3D scan; give a volume "
                            f"({FORMATS_HELP}) or use --dim 2d")
        return self._with_scan(subject, self.preprocess_array(image, geometry, subject.id))

    def preprocess_array(self, image: np.ndarray, geometry: Geometry,
                         subject_id: str = "?") -> tuple[np.ndarray, PreprocessRecord]:
        """Preprocess an already loaded channel-first volume (see :meth:`preprocess`)."""
        if image.ndim != 4:
            raise DataError(f"subject {subject_id}: expected a volume (C, D0, D1, D2), got shape {image.shape}")
        if tuple(geometry.shape) != tuple(image.shape[1:]):
            raise DataError(f"subject {subject_id}: geometry {geometry.shape} != array {image.shape[1:]}")
        image = self._check_channels(image, subject_id)
        d = apply_transforms(self.pipeline, {"image": image})
        box = d["crop_box"]
        record = PreprocessRecord(source=geometry.to_dict(), crop_box=box,
                                  cropped_shape=tuple(e - s for s, e in box), input_shape=self.input_shape,
                                  channels=image.shape[0], kind=self.kind, retina=d["retina"],
                                  intensity=d["intensity"], meta={"depth_axis": self.depth_axis})
        return d["image"], record



class Patch2DPreset(_Preset):
    """2D images: en-face projection (computed or OCTA-500 map) or a 2D image → clip/scale → input size or patches.

    Sources, in order: ``subject.projections[--projection]`` (an OCTA-500 map BMP) when present; otherwise the
    loaded scan: a 2D image is used as is, a volume is projected (mean over the retinal slab along the depth
    axis) when ``--projection compute``. With ``--patch-size 0`` the image is padded with zeros to the input's
    aspect ratio (:func:`aspect_padding`; the record's ``pad``) and resized to the input size; otherwise it is
    stored at source resolution and :meth:`sample` cuts patch ``i`` of the grid (:func:`patch_grid`) and resizes
    it to the input size at load time.
    """

    kind = "patch2d"

    def __init__(self, cfg: Config, loader: Loader | None = None, image_reader: ImageReader | None = None) -> None:
        super().__init__(cfg, loader, image_reader)
        if len(self.input_shape) != 2:
            raise ConfigError(f"Patch2DPreset needs a 2D input size, got {self.input_shape} (--dim 2d)")
        p = cfg.preprocess
        self.projection, self.patch_size, self.patch_stride = cfg.data.projection, p.patch_size, p.patch_stride
        self.slab = [RetinalSlabCropd("image", self.depth_axis, self.slab_depth),
                     ProjectSlabd("image", self.depth_axis)]
        self.clip = ClipScaleIntensityd("image", self.percentiles)
        self.resize = ResizeToInputd("image", self.input_shape)
        self.aspect = p.aspect  # --aspect (validated by the config's choices)

    def _map_path(self, subject: Subject) -> str | None:
        return subject.projections.get(self.projection) if self.projection != "compute" else None

    def source_paths(self, subject: Subject) -> list[str]:
        """The projection map when one is used, else the scan's files."""
        path = self._map_path(subject)
        return [path] if path else super().source_paths(subject)

    def cache_settings(self) -> dict[str, Any]:
        """Adds the projection and patch settings."""
        return super().cache_settings() | {"projection": self.projection, "patch_size": self.patch_size,
                                           "patch_stride": self.patch_stride, "aspect": self.aspect}

    def preprocess(self, subject: Subject) -> tuple[np.ndarray, PreprocessRecord]:
        """Load and preprocess ``subject``: float32 ``(C, *input_shape)`` — or ``(C, H, W)`` at source
        resolution when patches are cut (see :meth:`sample`) — and its record."""
        meta: dict[str, Any] = {}
        path = self._map_path(subject)
        if path:
            if self.channels != 1:
                raise ConfigError(f"--projection {self.projection} is a single map; --modality "
                                  f"{self.cfg.data.modality} needs 2 channels (use --projection compute)")
            try:
                image = np.asarray(self.read_2d(path))
            except DataError as exc:  # as load() does: every reader error of a subject names it
                raise DataError(f"subject {subject.id}: {exc}") from exc
            image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
            geometry = Geometry.default(image.shape[1:])
            meta["projection"] = self.projection
        else:
            image, geometry = self.load(subject)
            if image.ndim == 4:
                if self.projection != "compute":
                    raise DataError(f"subject {subject.id} has no projection map '{self.projection}' (has: "
                                    f"{', '.join(subject.projections) or 'none'}): this model reads OCTA-500 "
                                    f"'{self.projection}' maps, not volumes. Pass the map itself (--input "
                                    f"'<OCTA_xmm>/Projection Maps/{self.projection}/<ID>.bmp') or the OCTA-500 eye "
                                    f"folder next to its Projection Maps, or train a model with --projection "
                                    f"compute to use volumes")
                image = self._check_channels(image, subject.id)
                d = apply_transforms(self.slab, {"image": image})
                meta = {"projection": "compute", "volume": geometry.to_dict(), "depth_axis": self.depth_axis,
                        "slab": list(d["crop_box"][self.depth_axis]), "retina": list(d["retina"])}
                image, geometry = d["image"], drop_axis(geometry, self.depth_axis)
            elif image.ndim != 3:
                raise DataError(f"subject {subject.id}: expected a 2D image or a volume, got shape {image.shape}")
        return self._with_scan(subject, self.preprocess_array(image, geometry, subject.id, meta))

    def preprocess_array(self, image: np.ndarray, geometry: Geometry, subject_id: str = "?",
                         meta: dict[str, Any] | None = None) -> tuple[np.ndarray, PreprocessRecord]:
        """Preprocess a loaded channel-first 2D image ``(C, H, W)`` (see :meth:`preprocess`)."""
        image = self._check_channels(image, subject_id)
        d = self.clip({"image": image})
        shape = tuple(int(n) for n in image.shape[1:])
        patches = patch_grid(shape, self.patch_size, self.patch_stride) if self.patch_size > 0 else []
        pad: list[tuple[int, int]] = []
        if not patches:
            if self.aspect == "pad":
                pad = aspect_padding(shape, self.input_shape)
                if any(a or b for a, b in pad):
                    d["image"] = np.pad(d["image"], [(0, 0), *pad])  # zeros = the clipped low end
                else:
                    pad = []
            d = self.resize(d)
        record = PreprocessRecord(source=geometry.to_dict(), crop_box=[(0, n) for n in shape], cropped_shape=shape,
                                  input_shape=self.input_shape, channels=image.shape[0], kind=self.kind,
                                  retina=tuple(meta["retina"]) if meta and "retina" in meta else None,
                                  intensity=d["intensity"], patches=patches, meta=dict(meta or {}), pad=pad)
        return d["image"], record


def build_preset(cfg: Config, loader: Loader | None = None,
                 image_reader: ImageReader | None = None) -> Clip3DPreset | Patch2DPreset:
    """The preset for ``cfg.model.dim``: :class:`Clip3DPreset` (3d) or :class:`Patch2DPreset` (2d)."""
    cls = Clip3DPreset if cfg.spatial_dims == 3 else Patch2DPreset
    return cls(cfg, loader=loader, image_reader=image_reader)
