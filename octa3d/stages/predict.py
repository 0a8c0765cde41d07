"""``--mode predict --input PATH``: the experiment's model over a cohort of new scans, one subject at a time.

``PATH`` is one scan, an OCTA-500 folder, a manifest CSV, class folders of 2D images or a plain folder of scans
(:func:`octa3d.data.sources.discover_input`; labels are optional and reported when the input has them). Each
subject is read, preprocessed as in training, predicted (calibrated probabilities by default, the experiment's
fold ensemble when it has folds: :class:`octa3d.deploy.api.Predictor`), explained (``--cam``; ``none`` switches maps
off) and written while only the next one is read ahead (on a second thread, hiding the reading behind the
forward pass), so memory stays flat for any number of scans.

Outputs in ``runs/<exp>/predict/<name>/`` (:func:`output_name`: ``<input stem>_<cam>_<hash8>``, the hash over the
resolved input path, the checkpoint file(s), the map settings, ``--no-calibrate``, ``--tta``, ``--mc-dropout``; the
same command again uses the same folder, another input or other settings another one):

* ``predictions.csv``: subject, label (when known), ``p_<class>`` (calibrated), ``p_raw_<class>``, prediction,
  entropy, uncertain (entropy above the validation threshold, or out of distribution), ood_score, ood, ood_reason
  (the out-of-distribution check, :mod:`octa3d.evaluation.ood_check`; empty for a model that predates it), p_sd
  (binary: ``--tta``/``--mc-dropout``/fold ensemble), correct (when labelled), cam_status, training_overlap (why
  the scan is not new to the model);
* ``skipped.csv``: subjects whose scan could not be read, with the reason (the run goes on without them);
* ``cams/`` (as in ``--mode test``), ``summary.json``, ``review/index.html``;
* ``subjects/<stem>.json``: one per finished subject, written last (atomically) once its map files exist (with
  the scan record of a vendor export: format, device, laterality, orientation, scan pattern, spacing).

**Resuming.** The run works in its final folder; ``.complete`` is written at the end. A run stopped in any way
(kill -9 included) is continued by the same command: subjects with a ``subjects/<stem>.json`` are skipped, the
others (also earlier skipped scans) are done again. A finished folder is reported as such; ``--overwrite`` deletes
it and starts over.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from octa3d.cam import CamItem
from octa3d.config import Config, to_yaml
from octa3d.data.imagefiles import natural_key, strip_ext
from octa3d.data.leakage import seen_checker
from octa3d.data.sources import discover_input
from octa3d.data.subject import Subject
from octa3d.deploy.api import Predictor
from octa3d.errors import ConfigError, DataError
from octa3d.evaluation.ood_check import FALSE_ALARM, summary_block, summary_line
from octa3d.review import write_predict_review
from octa3d.utils.io import atomic_write_csv, atomic_write_json, atomic_write_text, safe_name, unique_names
from octa3d.utils.runs import MARKER, command_line, init_run, releases_locks
from octa3d.utils.tracking import progress_enabled

log = logging.getLogger("octa3d.predict")

STAGE = "predict"
#: Seconds between progress log lines when stderr is no terminal (no progress bar).
LOG_EVERY_S = 30.0


def output_name(ecfg: Config, input_path: str | Path, checkpoints: list[Path]) -> tuple[str, dict[str, Any]]:
    """The folder name under ``predict/`` for this input and these settings, and the settings it stands for.

    Returns:
        ``(name, settings)``: ``<input stem>_<cam or no-cam>_<hash8>`` (e.g. ``new_scans_layercam_3f9a1c0e``) and
        the dictionary hashed (recorded in summary.json).
    """
    cam = ecfg.eval.cam
    settings: dict[str, Any] = {
        "input": str(Path(input_path).resolve()),
        "checkpoints": sorted(str(Path(p).resolve()) for p in checkpoints),
        "cam": cam, "cam_layer": (ecfg.eval.cam_layer or "default") if cam != "none" else None,
        "cam_class": (ecfg.eval.cam_class or "predicted") if cam != "none" else None,
        "cam_subjects": sorted(ecfg.eval.cam_subjects or []) if cam != "none" else None,
        "calibrate": bool(ecfg.eval.calibrate), "tta": ecfg.eval.tta, "mc_dropout": ecfg.eval.mc_dropout}
    if ecfg.eval.ood_false_alarm != FALSE_ALARM:  # only when changed: folders of earlier runs keep their names
        settings["ood_false_alarm"] = ecfg.eval.ood_false_alarm
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    stem = strip_ext(Path(input_path).resolve().name) or "input"
    return safe_name(f"{stem}_{cam if cam != 'none' else 'no-cam'}_{digest}"), dict(settings, hash=digest)


class _Progress:
    """Progress with an ETA: a tqdm bar on a terminal, else a log line after the first subject, then every
    :data:`LOG_EVERY_S` seconds and at the end."""

    def __init__(self, total: int, done: int) -> None:
        from tqdm.auto import tqdm

        self.total, self.done, self.start, self.last = total, done, time.monotonic(), time.monotonic()
        self.new = 0
        self.bar = tqdm(total=total, initial=done, desc="predict", unit="subject", dynamic_ncols=True,
                        disable=not progress_enabled())

    def step(self, sid: str) -> None:
        self.done, self.new = self.done + 1, self.new + 1
        self.bar.update(1)
        now = time.monotonic()
        if self.bar.disable and (self.new == 1 or now - self.last >= LOG_EVERY_S or self.done == self.total):
            self.last = now
            rate = (now - self.start) / self.new
            log.info("predict: %d/%d subjects (last %s), %.2f s per subject, ETA %s", self.done, self.total, sid,
                     rate, _dt.timedelta(seconds=round(rate * (self.total - self.done))))

    def close(self) -> None:
        self.bar.close()


def _done(folder: Path) -> dict[str, dict[str, Any]]:
    """The finished subjects of an earlier attempt: subject ID → its record (``subjects/*.json``)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            out[str(doc["row"]["subject"])] = doc
        except (OSError, ValueError, KeyError, TypeError) as exc:  # written atomically: only by hand
            log.warning("%s is unreadable (%s); that subject is predicted again", f, exc)
    return out


def _prepare(predictor: Predictor, s: Subject) -> Any:
    """Read and preprocess one subject (on the prefetch thread); a DataError is returned, not raised."""
    if s.meta.get("unreadable"):  # found by discovery (an OCTA-500 eye whose slice folder has gaps ...)
        return DataError(str(s.meta["unreadable"]))
    try:
        return predictor.prepare(s)
    except DataError as exc:
        return exc


def _prefetched(predictor: Predictor, subjects: list[Subject]) -> Iterator[tuple[Subject, Any]]:
    """``(subject, Prepared or DataError)`` in order, the next subject read and preprocessed on a second thread
    while this one is predicted and explained: at most two subjects in memory, the reading hidden behind the
    forward pass (torch and the readers release the GIL)."""
    if not subjects:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="octa3d-prefetch") as pool:
        nxt = pool.submit(_prepare, predictor, subjects[0])
        for i, s in enumerate(subjects):
            got = nxt.result()
            if i + 1 < len(subjects):
                nxt = pool.submit(_prepare, predictor, subjects[i + 1])
            yield s, got
            del got


def _predict_one(predictor: Predictor, s: Subject, exporter: Any, cam_ids: set[str] | None, stem: str,
                 prep: Any) -> dict[str, Any]:
    """Predict and explain one preprocessed subject; its record for ``subjects/<stem>.json``."""
    pred = predictor.predict_prepared(prep)
    row = pred.row(predictor.classes)
    doc: dict[str, Any] = {"row": row, "input": s.meta.get("input") or next(iter(s.paths.values()), "")}
    if prep.record.meta.get("scan"):  # a vendor export: format, device, laterality, what was done to it
        doc["scan"] = prep.record.meta["scan"]
    if exporter is None:
        row["cam_status"] = "none"
    elif cam_ids is not None and s.id not in cam_ids:
        row["cam_status"] = "not computed"
    else:
        exporter.stems[s.id] = stem
        true = predictor.classes.index(pred.label) if pred.label in predictor.classes else None
        item = CamItem(s, prep.record, lambda: prep.samples, pred.probs, true)
        for _, _, maps, statuses, seconds in exporter.batches([item]):
            doc["cam"] = exporter.export_one(item, maps[0], statuses[0])
            doc["cam"]["seconds"] = seconds
        row["cam_status"] = doc["cam"]["status"]
    return doc


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Predict every subject of ``--input`` into ``runs/<exp>/predict/<name>/`` (see the module docstring).

    Returns:
        The run's summary (also ``summary.json``): counts, model, settings and where the files are.

    Raises:
        ConfigError: no ``--input``; DataError: an input with no recognisable scans; CheckpointError: no model.
    """
    if not cfg.eval.input:
        raise ConfigError("--mode predict needs --input PATH: a scan, an OCTA-500 folder, a manifest CSV "
                          "(subject,path[,label]), class folders of 2D images or a folder of scans")
    predictor = Predictor.from_config(cfg)
    ecfg = predictor.cfg
    kind, subjects = discover_input(cfg.eval.input, ecfg.data, ecfg.model.dim)
    name, settings = output_name(ecfg, cfg.eval.input, [m.path for m in predictor.models])
    final = ecfg.run_dir / STAGE / name
    init_run(ecfg)  # the experiment's lock: no second run writes this folder
    if (final / MARKER).is_file() and not cfg.run.overwrite:
        summary = json.loads((final / "summary.json").read_text(encoding="utf-8"))
        print(f"Already complete: {final} ({summary['n_predicted']} subjects predicted, {summary['n_skipped']} "
              "skipped); pass --overwrite to predict again")
        return summary
    if cfg.run.overwrite and final.exists():
        log.warning("--overwrite: deleting %s and starting over", final)
        shutil.rmtree(final)
    (final / "subjects").mkdir(parents=True, exist_ok=True)
    atomic_write_text(final / "config.yaml", to_yaml(ecfg))
    atomic_write_text(final / "command.txt", command_line(ecfg) + "\n")
    done = _done(final / "subjects")
    stems = unique_names(s.id for s in subjects)
    todo = [s for s in subjects if s.id not in done]
    if done:
        log.info("resuming %s: %d of %d subjects already done", final, len(subjects) - len(todo), len(subjects))
    log.info("predict: %d subject(s) from %s (%s), model %s (%s), classes %s, maps %s", len(subjects),
             cfg.eval.input, kind, predictor.ref["model_name"], ", ".join(predictor.checkpoints),
             predictor.classes, ecfg.eval.cam)
    seen = seen_checker(ecfg)
    exporter = predictor.cam_exporter(final / "cams") if ecfg.eval.cam != "none" else None
    cam_ids = set(ecfg.eval.cam_subjects) if ecfg.eval.cam_subjects else None
    skipped: list[dict[str, str]] = []
    bar = _Progress(len(subjects), len(subjects) - len(todo))
    t0 = time.perf_counter()
    try:
        for s, prep in _prefetched(predictor, todo):
            reason = seen(s)
            if reason:
                log.warning("%s of experiment '%s': its prediction is optimistic", reason, ecfg.exp_name)
            if isinstance(prep, DataError):
                log.warning("subject %s skipped: %s", s.id, prep)
                skipped.append({"subject": s.id, "input": s.meta.get("input") or "; ".join(s.paths.values()),
                                "reason": str(prep)})
                bar.step(s.id)
                continue
            doc = _predict_one(predictor, s, exporter, cam_ids, stems[s.id], prep)
            doc["row"]["training_overlap"] = reason or ""
            atomic_write_json(final / "subjects" / f"{stems[s.id]}.json", doc)  # last: the subject is complete
            done[s.id] = doc
            bar.step(s.id)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return _finish(cfg, ecfg, predictor, final, kind, subjects, done, skipped, settings, seconds, len(todo))


def _finish(cfg: Config, ecfg: Config, predictor: Predictor, final: Path, kind: str, subjects: list[Subject],
            done: dict[str, dict[str, Any]], skipped: list[dict[str, str]], settings: dict[str, Any],
            seconds: float, n_new: int) -> dict[str, Any]:
    """predictions.csv, skipped.csv, cams/names.csv, summary.json, the review page and ``.complete``."""
    import pandas as pd

    order = [s.id for s in subjects if s.id in done]
    rows = [done[i]["row"] for i in order]
    columns = ["subject", "label", *(f"p_{c}" for c in predictor.classes), "prediction", "uncertain", "ood_score",
               "ood", "ood_reason", "cam_status", "training_overlap"]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
    atomic_write_csv(final / "predictions.csv", frame)
    atomic_write_csv(final / "skipped.csv", pd.DataFrame(skipped, columns=["subject", "input", "reason"]))
    cams = {i: done[i]["cam"] for i in order if "cam" in done[i]}
    if cams:
        atomic_write_csv(final / "cams" / "names.csv", pd.DataFrame(
            {"subject": list(cams), "file_stem": [v["file_stem"] for v in cams.values()]}))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["prediction"]] = counts.get(r["prediction"], 0) + 1
    status: dict[str, int] = {}
    for r in rows:
        status[r["cam_status"]] = status.get(r["cam_status"], 0) + 1
    flagged = [r for r in rows if r.get("uncertain") is True]
    summary: dict[str, Any] = {
        "input": str(cfg.eval.input), "kind": kind, "folder": str(final), "n_subjects": len(subjects),
        "n_predicted": len(rows), "n_skipped": len(skipped), "n_new": n_new, "predicted": counts,
        "n_uncertain": len(flagged) if predictor.threshold is not None else None,
        "n_seen_in_training": sum(bool(r.get("training_overlap")) for r in rows),
        "class_names": predictor.classes, "model": predictor.ref["model_name"],
        "checkpoints": predictor.checkpoints, "calibrated": predictor.calibrated,
        "temperature": predictor.temperatures, "uncertainty_threshold": predictor.threshold,
        "ood": {**summary_block(predictor.ood, [r.get("ood") for r in rows], [r.get("ood_reason", "") for r in rows]),
                "seconds": round(predictor.ood_seconds, 4)},
        "seconds": round(seconds, 2), "seconds_per_subject": round(seconds / max(1, n_new), 4),
        "settings": settings,
        "cam": ({"backend": ecfg.eval.cam, "layer": ecfg.eval.cam_layer or "default",
                 "target": ecfg.eval.cam_class or "predicted class", "n_subjects": len(cams),
                 "status_counts": status, "folder": str(final / "cams")} if ecfg.eval.cam != "none" else None)}
    # only subjects new to the model: an accuracy over training eyes would be optimistic (use test --external for
    # a scored external validation)
    labelled = [r for r in rows if r.get("correct") in (True, False) and not r.get("training_overlap")]
    if labelled:
        summary["accuracy_where_labelled"] = {"n": len(labelled), "subjects": "labelled, not seen in training",
                                              "accuracy": sum(r["correct"] is True for r in labelled) / len(labelled)}
    atomic_write_json(final / "summary.json", summary)
    page = write_predict_review(final, {"experiment": ecfg.exp_name, "stage": STAGE, "data": str(cfg.eval.input)},
                                summary)
    atomic_write_json(final / MARKER, {"finished": _dt.datetime.now().isoformat(timespec="seconds"),
                                       "mode": cfg.run.mode, "command": command_line(cfg)})
    _print_summary(summary, final, page is not None, skipped)
    return summary


def _print_summary(summary: dict[str, Any], final: Path, page: bool, skipped: list[dict[str, str]]) -> None:
    """The CLI's closing lines: counts, skipped scans and where the files are."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["predicted"].items(), key=lambda kv: natural_key(kv[0])))
    lines = [f"Predicted {summary['n_predicted']} of {summary['n_subjects']} subject(s) from {summary['input']} "
             f"({summary['kind']}) with {summary['model']} [{', '.join(summary['checkpoints'])}]: {counts or '-'}"
             + ("; calibrated probabilities" if summary["calibrated"] else "; raw probabilities")]
    if summary["n_uncertain"] is not None:
        lines.append(f"  uncertain (entropy > {summary['uncertainty_threshold']:.3f} or out of distribution): "
                     f"{summary['n_uncertain']}")
    ood_line = summary_line(summary["ood"])
    if ood_line:
        lines.append(ood_line)
    if summary["n_seen_in_training"]:
        lines.append(f"  WARNING: {summary['n_seen_in_training']} subject(s) trained/validated the model "
                     "(column training_overlap): their predictions are optimistic")
    if skipped:
        lines.append(f"  skipped {len(skipped)} unreadable scan(s): {', '.join(d['subject'] for d in skipped[:5])}"
                     + (" …" if len(skipped) > 5 else "") + " (reasons in skipped.csv)")
    if "accuracy_where_labelled" in summary:
        a = summary["accuracy_where_labelled"]
        lines.append(f"  accuracy on the {a['n']} labelled subject(s) new to the model: {a['accuracy']:.3f} "
                     "(no CIs: --mode test --external scores a labelled cohort)")
    lines.append(f"Files in {final}/: predictions.csv, skipped.csv, summary.json"
                 + (", cams/" if summary["cam"] else "") + (", review/index.html" if page else ""))
    print("\n".join(lines), file=sys.stdout)
