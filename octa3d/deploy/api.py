"""The Python API: a trained model on new data, for notebooks and for the ``predict`` / ``explain`` stages.

>>> import octa3d
>>> model = octa3d.load("runs/demo")                 # a run folder, a checkpoint .pt, or an export + model card
>>> table = model.predict("new_scans/")              # one scan, a folder, an OCTA-500 root, a manifest CSV ...
>>> table[["subject", "prediction", "p_CNV", "uncertain"]]
>>> model.predict(volume)                            # a NumPy array / torch tensor: (D, H, W) or (C, D, H, W)
>>> ex = model.explain("scan.nii.gz")[0]; ex.cam    # the evidence map in the scan's own geometry

Inputs are made exactly as in training, with the settings stored in the checkpoint
(:func:`octa3d.checkpoint.settings.checkpoint_config` + :func:`octa3d.data.presets.build_preset`), including the
float16 storage of the preprocessing cache, so a subject gets the probabilities ``--mode test`` reports for it.
Probabilities are temperature-scaled per model (each checkpoint's ``temperature``,
:mod:`octa3d.evaluation.calibration`) before a fold ensemble averages them; ``calibrate=False`` reports the raw
softmax. Every prediction also carries the raw probabilities,
the entropy, the ``uncertain`` flag (entropy above the validation threshold, or out of distribution), for binary
models ``p_sd``, and the out-of-distribution check (``ood_score``, ``ood``, ``ood_reason``:
:mod:`octa3d.evaluation.ood_check`; features from the prediction's own forward pass).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d.cam import CamExporter, CamItem, check_cam_options
from octa3d.checkpoint.io import CheckpointError
from octa3d.checkpoint.models import Models, entropy_threshold_of, place_models, temperatures
from octa3d.config import Config
from octa3d.data.augment import tta_augment
from octa3d.data.labels import normalise_label
from octa3d.data.presets import build_preset
from octa3d.data.sources import discover_input
from octa3d.data.subject import Geometry, Subject
from octa3d.deploy.prediction import Explanation, Prediction, Prepared
from octa3d.errors import ConfigError, DataError
from octa3d.evaluation import forward
from octa3d.evaluation.calibration import apply_temperature, entropy
from octa3d.evaluation.evaluate import models_for_evaluation
from octa3d.evaluation.ood_check import PREDATES, checks_of, vote
from octa3d.training.precision import Precision
from octa3d.utils import dist
from octa3d.utils.io import unique_names

log = logging.getLogger("octa3d.deploy.api")

__all__ = ["Explanation", "Prediction", "Predictor", "load"]

#: Patches per forward pass (2D patch grids): bounds memory, not results.
PATCH_BATCH = 32


class Predictor:
    """A loaded model (or fold ensemble) with its preprocessing; see :func:`load`.

    Args:
        models: the :class:`~octa3d.checkpoint.models.LoadedModel` members of
        :func:`~octa3d.checkpoint.models.load_models`.
        ref: the reference record (classes, model name).
        cfg: the checkpoint-derived configuration (:func:`octa3d.checkpoint.settings.checkpoint_config`).
        device: where the models run.
        seed: this invocation's ``--seed`` (``--tta``/``--mc-dropout`` passes; ``cfg.run.seed`` is the split's).
    """

    def __init__(self, models: Models, ref: dict[str, Any], cfg: Config, device: torch.device,
                 seed: int | None = None) -> None:
        self.models, self.ref, self.cfg, self.device = models, ref, cfg, device
        self.seed = cfg.run.seed if seed is None else seed
        self.classes: list[str] = list(ref["class_names"])
        self.temperatures = temperatures(models)
        self.calibrated = bool(cfg.eval.calibrate) and any(t is not None for t in self.temperatures.values())
        self.threshold = entropy_threshold_of(models, self.calibrated)
        self.preset = build_preset(cfg)
        self.precision = Precision.for_device(device, cfg.train.amp)
        #: one out-of-distribution check per model; None: a model without the training reference
        self.ood = checks_of([m.record for m in models], cfg.eval.ood_false_alarm)
        if self.ood is None:
            log.info(PREDATES)
        #: seconds spent scoring the check (the features come from the prediction's pass): its cost
        self.ood_seconds = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> Predictor:
        """The experiment's model(s) (``--checkpoint``, ``train/checkpoints/best.pt`` or the fold ensemble) under
        the checkpoint's settings; CAM options are checked (``cfg.eval.cam`` becomes ``none`` for int8/ONNX)."""
        models, ref, ecfg = models_for_evaluation(cfg)
        device = place_models(models, dist.init_from_env(cfg.run.device))
        return cls(models, ref, ecfg, device, seed=cfg.run.seed)

    # ------------------------------------------------------------------------------------------------ inputs
    @property
    def checkpoints(self) -> dict[str, str]:
        """Model name (``best``, ``fold-k``, ``checkpoint``) → file."""
        return {m.name: str(m.path) for m in self.models}

    def subjects(self, path: str | Path) -> list[Subject]:
        """The subjects of a path input (:func:`octa3d.data.sources.discover_input`), labels where known."""
        return discover_input(path, self.cfg.data, self.cfg.model.dim)[1]

    def _array_subjects(self, x: Any, name: str = "array") -> list[tuple[Subject, np.ndarray]]:
        """``(subject, channel-first array)`` per subject of an array input: ``(*spatial)``, ``(C, *spatial)`` or a
        batch ``(N, C, *spatial)``."""
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        sd = self.cfg.spatial_dims
        if a.ndim == sd:
            a = a[None]
        if a.ndim == sd + 1:
            return [(Subject(id=name, label=None, paths={}), a)]
        if a.ndim == sd + 2:
            return [(Subject(id=f"{name}-{i}", label=None, paths={}), v) for i, v in enumerate(a)]
        raise DataError(f"an array of shape {a.shape}: a {sd}D model takes {sd}D arrays, (C, ...) or (N, C, ...)")

    def prepare(self, subject: Subject, image: np.ndarray | None = None) -> Prepared:
        """Read (unless ``image`` is given) and preprocess one subject as in training.

        The preprocessed array passes through float16, as the training/test cache stores it, so that the network
        sees the same inputs as in ``--mode test``.

        Raises:
            DataError: the scan cannot be read or preprocessed (naming the subject).
        """
        if image is None:
            stored, record = self.preset.preprocess(subject)
        else:
            stored, record = self.preset.preprocess_array(image, Geometry.default(image.shape[1:]), subject.id)
        stored = np.asarray(stored).astype(np.float16)
        patches = range(len(record.patches)) if record.patches else [-1]
        samples = np.stack([self.preset.sample(stored, record, p) for p in patches])
        return Prepared(subject, samples, record)

    # ------------------------------------------------------------------------------------------------ predicting
    @torch.no_grad()
    def forward(self, samples: np.ndarray | torch.Tensor, mc_pass: tuple[int, int] | None = None,
                subject: str = "", patches: list[int] | None = None,
                features: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Raw softmax ``(K,)`` of each model for one subject's samples (mean over its patches).

        Args:
            mc_pass: ``(seed, k)``: MC-dropout pass ``k`` (dropout layers sample, with the masks of
                :func:`octa3d.evaluation.forward.mc_seed` for ``subject`` and each of ``patches``).
            features: filled with model name -> pooled features ``(F,)`` of this pass (mean over the patches;
                models with ``forward_features``, plain passes only).
        """
        out: dict[str, np.ndarray] = {}
        x_all = torch.as_tensor(np.ascontiguousarray(samples, np.float32))
        if patches is None:
            if mc_pass is not None:  # the masks are drawn per (subject, patch): -1 for a whole volume, not 0
                raise ValueError("forward(mc_pass=...) needs the samples' patch indices")
            patches = [-1] * len(x_all)
        for m in self.models:
            parts, feats = [], []
            forward.sample_dropout(m.model, mc_pass is not None)
            try:
                for i in range(0, len(x_all), PATCH_BATCH):
                    x = x_all[i:i + PATCH_BATCH].to(self.device)
                    chunk = patches[i:i + PATCH_BATCH]
                    if features is not None and mc_pass is None:
                        logits, f = forward.logits_and_features(m.model, x, self.precision)
                        if f is not None:
                            feats.append(f.cpu().numpy().astype(np.float64))
                    else:
                        logits = forward.logits(m.model, x, self.precision, mc_pass, [subject] * len(chunk), chunk)
                    parts.append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64))
            finally:
                m.model.eval()
            out[m.name] = np.concatenate(parts).mean(axis=0)
            if feats:
                features[m.name] = np.concatenate(feats).mean(axis=0)
        return out

    def spread(self, prepared: Prepared, per_model: dict[str, np.ndarray]) -> float | None:
        """sd of P(positive) (binary models) over the ``--tta`` / ``--mc-dropout`` passes of every model, each
        calibrated like the reported probabilities, else over a fold ensemble's members. The passes are drawn from
        (``--seed``, pass, subject, patch) by the functions ``--mode test`` uses
        (:func:`~octa3d.data.augment.tta_augment`, :func:`~octa3d.evaluation.forward.mc_seed`), so both give the
        same numbers."""
        if len(self.classes) != 2:
            return None
        n_tta, n_mc, seed = self.cfg.eval.tta, self.cfg.eval.mc_dropout, self.seed
        sid, x = prepared.subject.id, torch.from_numpy(np.ascontiguousarray(prepared.samples, np.float32))
        patches = list(range(len(x))) if prepared.record.patches else [-1]

        def positive(per: dict[str, np.ndarray]) -> list[float]:
            return [float((apply_temperature(p[None], self.temperatures[n])[0] if self.calibrated else p)[1])
                    for n, p in per.items()]

        samples: list[float] = []
        for k in range(n_tta):
            samples += positive(self.forward(tta_augment(self.cfg, seed, k)(x, [sid] * len(x), patches)))
        for k in range(n_mc):
            samples += positive(self.forward(x, (seed, k), sid, patches))
        if samples:
            return float(np.std(samples, ddof=int(len(samples) > 1)))
        if len(self.models) > 1:
            return float(np.std(positive(per_model), ddof=1))
        return None

    def combine(self, subject_id: str, per_model: dict[str, np.ndarray], label: str | None = None) -> Prediction:
        """A :class:`Prediction` from per-model raw probabilities: each member calibrated with its own temperature,
        then averaged (as ``--mode test`` does)."""
        raw = np.mean([per_model[m.name] for m in self.models], axis=0)
        if self.calibrated:
            probs = np.mean([apply_temperature(per_model[m.name][None], self.temperatures[m.name])[0]
                             for m in self.models], axis=0)
        else:
            probs = raw
        e = float(entropy(probs[None])[0])
        return Prediction(subject_id, probs, raw, self.classes[int(np.argmax(probs))], e,
                          None if self.threshold is None else e > self.threshold, self.calibrated, label)

    def predict_prepared(self, prepared: Prepared) -> Prediction:
        """The prediction of one preprocessed subject, with its out-of-distribution check."""
        s = prepared.subject
        feats: dict[str, np.ndarray] = {}
        per_model = self.forward(prepared.samples, features=feats)
        pred = self.combine(s.id, per_model, _label(s, self.classes))
        pred.p_sd = self.spread(prepared, per_model)
        if self.ood is not None:
            t0 = time.perf_counter()
            # an array input has no spacing (unit spacing is assumed): its shape is checked, not its spacing
            res = vote([c.check(prepared.record, feats.get(m.name), spacing_known=bool(s.paths))
                        for c, m in zip(self.ood, self.models)])
            pred.ood_score, pred.ood, pred.ood_reason = res.score, res.flagged, res.reason
            if res.flagged:
                pred.uncertain = True  # nothing is refused: the flag travels with the prediction
            self.ood_seconds += time.perf_counter() - t0
        return pred

    def iter_inputs(self, x: Any) -> Iterator[tuple[Subject, np.ndarray | None]]:
        """``(subject, array or None)`` per subject of any input: path(s), array, tensor (nothing read yet)."""
        if isinstance(x, (np.ndarray, torch.Tensor)):
            yield from self._array_subjects(x)
        elif isinstance(x, (str, Path)):
            for s in self.subjects(x):
                yield s, None
        elif isinstance(x, Iterable):
            for item in x:
                yield from self.iter_inputs(item)
        else:
            raise ConfigError(f"cannot predict a {type(x).__name__}: pass a path, a list of paths, a NumPy array or "
                              "a torch tensor")

    def predict(self, x: Any) -> Any:
        """Probabilities of every subject of ``x``, one subject in memory at a time.

        Args:
            x: a scan file, an OCTA-500 eye/dataset folder, a manifest CSV, a folder of scans or 2D images, a list
                of these, or an array/tensor of raw scan intensities (``(*spatial)``, ``(C, *spatial)`` or
                ``(N, C, *spatial)``; unit spacing).

        Returns:
            A pandas DataFrame, one row per subject (:meth:`Prediction.row` columns).

        Raises:
            DataError: a scan cannot be read (the ``predict`` stage lists such scans and goes on instead).
        """
        import pandas as pd

        rows = [self.predict_prepared(self.prepare(s, a)).row(self.classes) for s, a in self.iter_inputs(x)]
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------------------------------------ maps
    def cam_exporter(self, out_dir: Path, tb: Any = None, method: str | None = None) -> Any:
        """A :class:`octa3d.cam.CamExporter` for these models (``method`` overrides the configured map method)."""
        cfg = self.cfg
        if method is not None and method != cfg.eval.cam:
            cfg = copy.deepcopy(cfg)
            cfg.eval.cam = method
            check_cam_options(cfg.eval, [m.model for m in self.models], self.classes, cfg.model.model)
        if cfg.eval.cam == "none":
            raise ConfigError("evidence maps are off (--cam none, or an int8/ONNX model): choose a map method")
        return CamExporter(cfg, [m.model for m in self.models], self.classes, out_dir, self.preset, tb=tb,
                           device=self.device)

    def explain(self, x: Any, out_dir: str | Path | None = None, method: str | None = None) -> list[Explanation]:
        """Predictions with their evidence maps in the source geometry (undoing crop and resize).

        Args:
            x: as :meth:`predict`.
            out_dir: when given, the maps, inputs and review sheets are written there as NIfTI/PNG
                (:class:`octa3d.cam.CamExporter`; ``Explanation.files``) and ``cam`` stays None (memory); else each
                map is returned as an array (``Explanation.cam``). Array inputs need no ``out_dir``.
            method: map method (default: the configured ``--cam``, LayerCAM unless changed).
        """
        exporter = self.cam_exporter(Path(out_dir or "."), method=method)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        out = []
        for s, a in self.iter_inputs(x):
            prep = self.prepare(s, a)
            pred = self.predict_prepared(prep)
            true = self.classes.index(pred.label) if pred.label in self.classes else None
            item = CamItem(s, prep.record, lambda prep=prep: prep.samples, pred.probs, true)
            for _, _, maps, statuses, _ in exporter.batches([item]):
                if out_dir is not None and a is None:  # files in the source geometry, one subject in memory
                    exporter.stems.setdefault(s.id, unique_names([s.id])[s.id])
                    sub = exporter.export_one(item, maps[0], statuses[0])
                    out.append(Explanation(pred, None, sub["status"], dict(sub["files"]), sub))
                else:
                    out.append(Explanation(pred, exporter.to_source(maps[0], prep.record), statuses[0]))
        return out


def _label(subject: Subject, classes: list[str]) -> str | None:
    """The subject's label as one of the model's class names when it is one (case-insensitive), else as given."""
    if subject.label is None:
        return None
    norm = normalise_label(subject.label)
    return next((c for c in classes if normalise_label(c) == norm), str(subject.label))


def _config_for(path: Path, device: str | None, calibrate: bool, cam: str | None, tta: int, mc_dropout: int,
                seed: int) -> Config:
    """A configuration whose model is ``path``: a run folder (its best.pt or fold ensemble) or a model file."""
    cfg = Config()
    if path.is_dir():
        if not (path / "train").is_dir():
            raise CheckpointError(f"{path}: not a run folder (no train/ inside); pass runs/<exp>, a checkpoint "
                                  ".pt, or an exported model (.ts/.pt/.onnx with its model card)")
        cfg.run.runs_dir, cfg.run.exp = str(path.parent), path.name
    elif path.is_file():
        cfg.eval.checkpoint = str(path)
    else:
        raise CheckpointError(f"{path}: no such run folder or model file")
    cfg.run.device = device or "auto"
    cfg.eval.calibrate = calibrate
    if cam is not None:
        cfg.eval.cam = cam
    cfg.eval.tta, cfg.eval.mc_dropout, cfg.run.seed = int(tta), int(mc_dropout), int(seed)
    return cfg


def load(path: str | Path, device: str | None = None, calibrate: bool = True, cam: str | None = None,
         tta: int = 0, mc_dropout: int = 0, seed: int = 42) -> Predictor:
    """Load a trained model for prediction.

    Args:
        path: a run folder ``runs/<exp>`` (``train/checkpoints/best.pt``, or every fold's ``best.pt``: an ensemble),
            an octa3d checkpoint ``.pt``, or an exported TorchScript/ONNX model with its model card.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (default: a GPU when there is one).
        calibrate: temperature-scaled probabilities (default); False reports the raw softmax as ``probs``.
        cam: evidence-map method for :meth:`Predictor.explain` (default: the checkpoint's ``--cam`` default).
        tta: test-time-augmentation passes giving ``p_sd`` (binary models), drawn from ``seed`` as ``--tta``/
            ``--seed`` in ``--mode test``.
        mc_dropout: MC-dropout passes giving ``p_sd`` (binary models with dropout layers), as ``--mc-dropout``.
        seed: draws the TTA and MC-dropout passes (``--seed``).

    Returns:
        A :class:`Predictor`.

    Raises:
        CheckpointError: no model at ``path``, or a damaged one.
    """
    return Predictor.from_config(_config_for(Path(path), device, calibrate, cam, tta, mc_dropout, seed))
