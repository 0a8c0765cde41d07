"""``report.json``, ``report.md`` and ``confusion_matrices.png`` of ``--mode compress``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from octa3d.evaluation.figures import confusion_figures, save_figure
from octa3d.stages.compress import linear_quant, measure, pruning, quantize
from octa3d.utils.io import atomic_write_json, atomic_write_text, json_safe

#: Variants compared in the report, in table order, with one-line descriptions.
VARIANTS: dict[str, str] = {
    "fp32": "trained fp32 model (train checkpoint), PyTorch eager",
    "pruned": "pruned + fine-tuned fp32 model (pruned.pt), PyTorch eager",
    "int8": "QAT int8 TorchScript (model_int8.pt)",
    "onnx_fp32": "pruned fp32 ONNX (model.onnx), onnxruntime",
    "onnx_int8": "static QDQ int8 ONNX (model_int8.onnx), onnxruntime",
}
#: The extra variant of the torchao path (Linear-dominated models), after the others.
TORCHAO_VARIANT = ("torchao_int8", "torchao int8 model (the numerics torchao QAT simulated), PyTorch eager, in-process: "
                                   "not exported, size = its torch.save(state_dict)")

#: Fields every variant carries in report.json.
MODEL_FIELDS = ("description", "file", "accuracy", "balanced_accuracy", "auc", "f1_macro", "size_bytes",
                "size_ratio", "size_zlib_bytes", "latency_ms", "latency_p10_ms", "latency_p90_ms", "speedup",
                "sparsity", "agreement_with_fp32", "confusion_matrix")

#: Deployment targets of project issue #6 (int8 vs fp32 on the hold-out set).
TARGETS = {"balanced_accuracy_drop_pp": 1.0, "speedup": 2.5, "size_ratio": 3.5}

TOP_FIELDS = ("experiment", "source_checkpoint", "created", "class_names", "test_subjects", "settings", "models",
              "targets", "pruning", "quantization", "latency", "export_checks", "files", "environment", "history")


def target_checks(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """int8 vs fp32 against :data:`TARGETS` (value, target, met)."""
    fp, q = models["fp32"], models["int8"]
    drop = 100.0 * (fp["balanced_accuracy"] - q["balanced_accuracy"])
    rows = np.asarray(fp["confusion_matrix"]).sum(1)
    # one subject of the smallest class moves balanced accuracy by this much: the resolution of the comparison
    resolution = 100.0 / (len(rows) * max(1, int(rows.min()))) if len(rows) else math.nan
    return {
        "int8_balanced_accuracy_drop_pp": {"value": drop, "target": f"<= {TARGETS['balanced_accuracy_drop_pp']}",
                                           "met": bool(drop <= TARGETS["balanced_accuracy_drop_pp"] + 1e-9),
                                           "resolution_pp": resolution},
        "int8_speedup": {"value": q["speedup"], "target": f">= {TARGETS['speedup']}",
                         "met": bool(q["speedup"] >= TARGETS["speedup"])},
        "int8_size_ratio": {"value": q["size_ratio"], "target": f">= {TARGETS['size_ratio']}",
                            "met": bool(q["size_ratio"] >= TARGETS["size_ratio"])},
    }


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def markdown(rep: dict[str, Any]) -> str:
    """The human-readable report."""
    s, m = rep["settings"], rep["models"]
    lat = rep["latency"]
    lines = [
        f"# Compression report: {rep['experiment']}", "",
        f"Source: `{rep['source_checkpoint']}`; hold-out test set: {rep['test_subjects']} subjects, classes "
        f"{', '.join(rep['class_names'])}.", "",
        f"Pruning: {s['prune_mode']}, amount {s['prune_amount']}, {s['prune_rounds']} round(s) x "
        f"{s['finetune_epochs']} fine-tuning epoch(s); QAT: {s['qat_epochs']} epoch(s), backend {s['qbackend']}; "
        f"fine-tuning lr {s['finetune_lr']:.2g}, batch size {s['batch_size']}.", "",
        "| model | accuracy | bal. accuracy | AUC | size | size ratio | latency (median) | speed-up | sparsity | "
        "agrees with fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in m.items():
        lines.append(f"| {name} | {_f(r['accuracy'])} | {_f(r['balanced_accuracy'])} | {_f(r['auc'])} | "
                     f"{_mb(r['size_bytes'])} | {_f(r['size_ratio'], '.2f')}x | {_f(r['latency_ms'], '.1f')} ms | "
                     f"{_f(r['speedup'], '.2f')}x | {_f(r['sparsity'], '.3f')} | {_f(r['agreement_with_fp32'])} |")
    lines += ["", "Descriptions: " + "; ".join(f"**{k}**: {r['description']}" for k, r in m.items()) + ".", "",
              "## Targets (int8 vs fp32)", "", "| target | value | required | met |", "|---|---|---|---|"]
    for k, t in rep["targets"].items():
        lines.append(f"| {k} | {_f(t['value'], '.2f')} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    res = rep["targets"]["int8_balanced_accuracy_drop_pp"].get("resolution_pp")
    lines += ["", f"One test subject of the smallest class changes balanced accuracy by {_f(res, '.1f')} pp; "
              f"`agrees with fp32` is the fraction of test subjects with the same predicted class. QAT trains for "
              f"--qat-epochs more epochs, so int8 can also score above fp32; `--qat-epochs 0` (calibration only) "
              f"isolates the quantization error."]
    q = rep["quantization"]
    lines += ["", "## Which layers were quantized, by which path", ""]
    lines += _torchao_lines(q) if q.get("method") == "torchao" else _fx_lines(q)
    o = q["onnx_int8"]
    lines.append(f"- **onnxruntime** (`model_int8.onnx`): {o['tool']}, {o['quant_format']}, activations "
                 f"{o['activation_type']}, weights {o['weight_type']} per channel={o['per_channel']}, "
                 f"{o['calibrate_method']} calibration on {o['calibration_samples']} training volumes.")
    p = rep["pruning"]
    lines += ["", "## Pruning", "",
              f"Sparsity of the fp32 weights after pruning: {_f(p['sparsity_fp32']['weights'])} of conv+linear "
              f"weights ({_f(p['sparsity_fp32']['conv_channels'])} of conv output channels all-zero); of the int8 "
              f"weights read back from `model_int8.pt`'s model: {_f(p['sparsity_int8']['weights'])}; pruned "
              f"positions non-zero after QAT + conversion: {p['sparsity_int8']['mask_violations']}.", ""]
    if p["rounds"]:
        lines += ["| round | target | sparsity | val bal. accuracy after fine-tuning |", "|---|---|---|---|"]
        lines += [f"| {r['round']} | {_f(r['target'])} | {_f(r['sparsity'])} | {_f(r.get('val_balanced_accuracy'))} |"
                  for r in p["rounds"]]
    lines += ["", "Unstructured zeros do not speed up int8 (or fp32) kernels; they shrink the file only when it is "
              "compressed (zlib column in report.json). Structured pruning zeroes whole output channels but keeps "
              "the tensor shapes, so it does not speed up inference either until the channels are physically "
              "removed.", "",
              "## Latency", "",
              f"CPU, batch 1, input {lat['input_shape']}, torch.set_num_threads({lat['threads']}) (onnxruntime "
              f"intra-op threads {lat['threads']}); {lat['warmup']} warm-up calls, then {lat['runs']} timed calls "
              f"per model, interleaved across models; median reported. {lat['note']}", "",
              "## Exported files", ""]
    lines += [f"- `{k}`: {_mb(v)}" for k, v in rep["files"].items()]
    lines += ["", "How to load each file without octa3d: `model_card.json` (`artifacts.<file>.usage`).", "",
              "Confusion matrices (fp32 | int8): `confusion_matrices.png`.", ""]
    return "\n".join(lines)


def _fx_lines(q: dict[str, Any]) -> list[str]:
    lines = [f"- **PyTorch FX QAT** (`prepare_qat_fx` → train → `convert_fx`, backend `{q['backend']}`, "
             f"run with the `{q['runtime_engine']}` quantized engine"
             + (" (fastest here: " + ", ".join(f"{k} {v:.1f} ms" for k, v in q["engine_latency_ms"].items()) + ")"
                if q.get("engine_latency_ms") else "")
             + ") quantized, in `model_int8.pt`:"]
    lines += [f"  - `{k}`: {v}" for k, v in q["quantized_modules"].items()]
    if q["quantized_ops"]:
        lines.append("  - functional int8 ops: " + ", ".join(f"`{k}` x{v}" for k, v in q["quantized_ops"].items()))
    if q["int8_tensor_modules"]:
        lines.append("- Weight-less layers running on int8 tensors: "
                     + ", ".join(f"`{k}` x{v}" for k, v in q["int8_tensor_modules"].items()) + ".")
    lines.append("- Running in float: "
                 + (", ".join(f"`{k}` x{v}" for k, v in q["float_modules"].items()) or "no module")
                 + f"; int8→float transitions in the graph: {q['dequantize_nodes']} (the last one before the "
                   f"output logits).")
    if q.get("float_max_pools"):
        lines.append(f"- qnnpack: {q['float_max_pools']} MaxPool3d layer(s) kept in float (qnnpack has no int8 "
                     f"max_pool3d): dequantize → pool → quantize.")
    lines.append(f"- **torchao**: {q['torchao']['note']}")
    return lines


def _torchao_lines(q: dict[str, Any]) -> list[str]:
    t = q["torchao"]
    lines = [f"- **torchao QAT** ({t['linear_weight_share']:.0%} of the conv/linear weights are `nn.Linear`): "
             f"`quantize_(model, QATConfig({t['config'].split(':')[0]}, step=\"prepare\"))` fake-quantized "
             f"{t['fake_quantized_linear_layers']} Linear layers ({t['config'].split(': ', 1)[-1]}) during "
             f"--qat-epochs of fine-tuning; `QATConfig(step=\"convert\")` then returned plain Linear layers with "
             f"the QAT-trained weights.",
             f"- **`model_int8.pt`**: PyTorch dynamic int8 quantization of those Linear layers (per-channel int8 "
             f"weights, activations quantized per tensor at run time), TorchScript, run with the "
             f"`{q['runtime_engine']}` quantized engine"
             + (" (fastest here: " + ", ".join(f"{k} {v:.1f} ms" for k, v in q["engine_latency_ms"].items()) + ")"
                if q.get("engine_latency_ms") else "") + ":"]
    lines += [f"  - `{k}`: {v}" for k, v in q["quantized_modules"].items()]
    lines.append("- Running in float: "
                 + (", ".join(f"`{k}` x{v}" for k, v in q["float_modules"].items()) or "no module")
                 + " (and the attention's matrix products and softmax).")
    lines.append("- **`torchao_int8` row**: torchao's own int8 model of the same weights (the numerics QAT "
                 "simulated), evaluated in-process: torch.jit.trace cannot export its tensor-subclass weights, and "
                 "without torch.compile its CPU kernels are slower than fp32.")
    return lines


def confusion_png(path: Path, class_names: list[str], cms: dict[str, Any]) -> Path:
    """Confusion matrices side by side (rows true, columns predicted), written atomically."""
    return save_figure(confusion_figures(cms, class_names), path)


def write_report(folder: Path, rep: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically."""
    rep = json_safe(rep)
    j = atomic_write_json(folder / "report.json", rep)
    md = atomic_write_text(folder / "report.md", markdown(rep))
    return j, md


# ------------------------------------------------------------------------------------------------ assembling
def _agreement(ev: dict[str, Any], ref: dict[str, Any], what: str) -> dict[str, Any]:
    diff = np.abs(ev["probs"] - ref["probs"])
    return {"reference": what, "max_abs_prob_diff": float(diff.max()) if diff.size else math.nan,
            "same_prediction": float(np.mean(ev["probs"].argmax(1) == ref["probs"].argmax(1)))}


def _variants(job: Any, fp32: Any, model: Any, exported: dict[str, Any], results: dict[str, Any],
              sparsity: dict[str, Any], sparsity_int8: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One report row per variant: hold-out metrics, sizes (fp32 as the TorchScript file it would be shipped as,
    the same container as int8), latency and agreement with fp32."""
    evals, lat, paths = results["evals"], results["latency"], exported["paths"]
    blobs = {"fp32": measure.torchscript_bytes(fp32, job.example), "pruned": measure.torchscript_bytes(model,
                                                                                                         job.example)}
    blobs.update({k: paths[k].read_bytes() for k in ("int8", "onnx_fp32", "onnx_int8")})
    files = {"fp32": None, "pruned": "pruned.pt", "int8": "model_int8.pt", "onnx_fp32": "model.onnx",
             "onnx_int8": "model_int8.onnx"}
    sparsities = {"fp32": pruning.sparsity(fp32)["weights"], "pruned": sparsity["weights"],
                  "int8": sparsity_int8["weights"], "onnx_fp32": sparsity["weights"], "onnx_int8": None}
    if "torchao_int8" in evals:
        blobs["torchao_int8"] = results["torchao_bytes"]
        files["torchao_int8"] = "(in-process, not exported)"
        sparsities["torchao_int8"] = results["torchao_sparsity"]["weights"]
    descriptions = {**VARIANTS, TORCHAO_VARIANT[0]: TORCHAO_VARIANT[1]}
    base = evals["fp32"]
    models = {}
    for k, ev in evals.items():
        mt = ev["metrics"]
        models[k] = {
            "description": descriptions[k], "file": files[k] or str(job.src),
            "accuracy": mt["accuracy"], "balanced_accuracy": mt["balanced_accuracy"], "auc": mt["auc"],
            "f1_macro": mt["f1_macro"], "size_bytes": len(blobs[k]), "size_ratio": len(blobs["fp32"]) / len(blobs[k]),
            "size_zlib_bytes": measure.compressed_size(blobs[k]), "latency_ms": lat[k]["median_ms"],
            "latency_p10_ms": lat[k]["p10_ms"], "latency_p90_ms": lat[k]["p90_ms"],
            "speedup": lat["fp32"]["median_ms"] / lat[k]["median_ms"], "sparsity": sparsities[k],
            "agreement_with_fp32": float(np.mean(ev["probs"].argmax(1) == base["probs"].argmax(1))),
            "confusion_matrix": ev["confusion_matrix"],
        }
    return models


def _export_checks(results: dict[str, Any], runtime_engine: str) -> dict[str, Any]:
    """Each written file against the in-process model it came from."""
    evals, pack = results["evals"], results["pack"]
    return {
        "model_int8.pt": {**_agreement(results["same_kernels"], results["inproc"], f"in-process FX int8 model "
                                       f"(convert_fx output), both run with the {pack} engine"),
                          "runtime_engine": _agreement(evals["int8"], results["inproc"], f"the file run with the "
                                                       f"{runtime_engine} engine vs the in-process model ({pack})")},
        "model.onnx": _agreement(evals["onnx_fp32"], evals["pruned"], "in-process pruned fp32 model"),
        "model_int8.onnx": _agreement(evals["onnx_int8"], evals["pruned"], "in-process pruned fp32 model"),
    }


_PATHS = {"fx": "PyTorch FX QAT: prepare_qat_fx(get_default_qat_qconfig_mapping(backend)) -> train -> eval() -> "
                "convert_fx",
          "torchao": "torchao QAT: quantize_(model, QATConfig(base, step='prepare')) -> train -> QATConfig(step="
                     "'convert') -> torch.ao quantize_dynamic(nn.Linear, per-channel int8) -> TorchScript"}


def build(job: Any, fp32: Any, model: Any, converted: Any, exported: dict[str, Any], results: dict[str, Any],
          rounds: list[dict[str, Any]], sparsity: dict[str, Any], sparsity_int8: dict[str, Any], threads: int,
          finetune_lr: float) -> dict[str, Any]:
    """The report dictionary (:data:`TOP_FIELDS`) of one compress run (``job``: the stage's ``Job``)."""
    import dataclasses
    import datetime as _dt
    import platform

    import torch

    c, ecfg = job.cfg.compress, job.cfg
    models = _variants(job, fp32, model, exported, results, sparsity, sparsity_int8)
    torchao = job.path == "torchao"
    qsummary = (linear_quant.quantized_summary(converted) if torchao else quantize.quantized_summary(converted))
    return {
        "experiment": ecfg.exp_name, "source_checkpoint": str(job.src),
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "class_names": job.names,
        "test_subjects": len(results["evals"]["fp32"]["ids"]),
        "settings": {**dataclasses.asdict(c), "finetune_lr": finetune_lr, "batch_size": ecfg.train.batch_size,
                     "optimizer": ecfg.train.optimizer, "loss": ecfg.train.loss,
                     "train_device": str(job.ctx.device)},
        "models": models, "targets": target_checks(models),
        "pruning": {"mode": c.prune_mode, "amount": c.prune_amount, "rounds": rounds,
                    "sparsity_fp32": sparsity, "sparsity_int8": sparsity_int8,
                    "masks_kept_through_qat": sparsity_int8["mask_violations"] in (0, None)},
        "quantization": {"backend": c.qbackend, "packing_engine": quantize.packing_engine(c.qbackend),
                         "runtime_engine": exported["runtime_engine"], "engine_latency_ms": exported["engine_ms"],
                         "method": job.path, "path": _PATHS[job.path],
                         **qsummary, "float_max_pools": qsummary["float_modules"].get(
                             f"{quantize.FloatMaxPool3d.__module__}.FloatMaxPool3d", 0),
                         "torchao": ({"applied": True, "note": linear_quant.NOTE,
                                      "config": linear_quant.BASE_CONFIG_TEXT,
                                      "fake_quantized_linear_layers": job.fake_quantized,
                                      "linear_weight_share": linear_quant.linear_share(fp32)} if torchao else
                                     {"applied": False, "note": quantize.TORCHAO_NOTE}),
                         "onnx_int8": exported["onnx_q"]},
        "latency": {"threads": threads, "runs": measure.LATENCY_RUNS, "warmup": measure.LATENCY_WARMUP, "batch": 1,
                    "input_shape": list(job.example.shape), "per_model": results["latency"],
                    "note": "The machine may be shared: compare ratios measured in one run, not absolute times."},
        "export_checks": {**_export_checks(results, exported["runtime_engine"]), **exported.get("checks", {})},
        "files": {p.name: p.stat().st_size for p in sorted(job.out.iterdir()) if p.is_file()},
        "environment": {"torch": torch.__version__, "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(),
                        "quantized_engines": list(torch.backends.quantized.supported_engines)},
        "history": job.history,
    }


def print_summary(rep: dict[str, Any], out: Path) -> None:
    """The CLI summary: one line per variant and the deployment targets."""
    m = rep["models"]
    print(f"Compressed '{rep['experiment']}' -> {out}")
    for k, r in m.items():
        auc = r["auc"] if r["auc"] is not None else math.nan
        print(f"  {k:<10} bal.acc {r['balanced_accuracy']:.3f}  auc {auc:.3f}  size {r['size_bytes'] / 1e6:7.2f} MB "
              f"({r['size_ratio']:.2f}x)  latency {r['latency_ms']:7.1f} ms ({r['speedup']:.2f}x)")
    t = rep["targets"]
    print("  targets: " + ", ".join(f"{k} {v['value']:.2f} ({'met' if v['met'] else 'NOT met'})" for k, v in t.items()))
