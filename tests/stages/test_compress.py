"""--mode compress: pruning sparsity (global / structured) kept through QAT and int8 conversion, quantized Conv3d
modules, TorchScript / ONNX exports that reproduce the in-process models, the report, and the error for an
experiment without a trained model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from octa3d.cam.backends import check_cam_capable
from octa3d.checkpoint import exports
from octa3d.checkpoint.io import CheckpointError
from octa3d.checkpoint.models import load_any_model
from octa3d.cli import main as cli_main
from octa3d.cli import parse_config
from octa3d.errors import ConfigError, RunExistsError
from octa3d.model import create_model
from octa3d.stages.compress import export, pruning, quantize
from octa3d.stages.compress import report as report_mod


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 3D nets on a shared 2-core machine: a second OpenMP thread only waits (and is ~50x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn", "3d", 1, 2)


def train_steps(model: torch.nn.Module, x: torch.Tensor, steps: int = 2, lr: float = 1e-2) -> None:
    """A few large optimiser steps: enough to regrow pruned weights if their masks were lost."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    y = torch.arange(len(x)) % 2
    model.train()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


# ------------------------------------------------------------------------------------------------ unit level
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_qat_quantizes_conv3d_and_torchscript_matches_in_process(backend, tmp_path):
    x = torch.rand(4, 1, 16, 16, 16)
    prepared = quantize.prepare_qat(tiny_cnn(), backend, x)
    train_steps(prepared, x)
    converted = quantize.convert(prepared, backend)
    summary = quantize.quantized_summary(converted)
    assert summary["quantized_modules"]["torch.ao.nn.intrinsic.quantized.ConvReLU3d"] == 5
    assert summary["quantized_modules"]["torch.ao.nn.quantized.Linear"] == 1
    if backend == "qnnpack":  # no int8 max_pool3d in qnnpack: pools stay float between dequantize/quantize
        assert summary["float_modules"]["octa3d.stages.compress.quantize.FloatMaxPool3d"] == 5
    else:
        assert summary["int8_tensor_modules"]["torch.nn.modules.pooling.MaxPool3d"] == 5
    with quantize.quantized_engine(quantize.packing_engine(backend)), torch.no_grad():
        ref = converted(x)
    assert ref.shape == (4, 2) and torch.isfinite(ref).all()
    card = {"format": exports.CARD_FORMAT, "quantized_engine": backend, "record": {"class_names": ["a", "b"]},
            "artifacts": {"m.pt": {"precision": "int8"}}}
    export.save_torchscript(converted, x[:1], tmp_path / "m.pt", card, backend)
    # without octa3d: the engine named in the card, then torch.jit.load (card embedded in the file)
    with quantize.quantized_engine(backend), torch.no_grad():
        extra = {"model_card.json": ""}
        plain = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
        out = plain(x)
    assert json.loads(extra["model_card.json"])["quantized_engine"] == backend
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)  # same int8 weights; kernels may round differently
    model, record, is_q = load_any_model(tmp_path / "m.pt")  # no model_card.json beside it: embedded card
    assert is_q and record["class_names"] == ["a", "b"] and record["artifact_format"] == "torchscript"


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_pruning_reaches_sparsity_and_keeps_it_through_qat_and_conversion(mode):
    model, x = tiny_cnn(), torch.rand(4, 1, 16, 16, 16)
    for r in (1, 2):  # two rounds, 50 % in total
        got = pruning.prune_step(model, mode, pruning.cumulative_sparsity(0.5, 2, r))
        train_steps(model, x, steps=1)
    masks = pruning.masks_of(model)
    pruning.finalize(model)
    s = pruning.sparsity(model)
    if mode == "unstructured":
        assert abs(s["weights"] - 0.5) < 1e-4 and got["weights"] == pytest.approx(s["weights"])
    else:
        for name, m in pruning.prunable_modules(model, "structured"):
            zero_rows = int((m.weight.flatten(1).abs().sum(1) == 0).sum())
            assert zero_rows == round(0.5 * m.weight.shape[0]), name
        assert s["conv_channels"] == pytest.approx(0.5, abs=0.02)
    prepared = quantize.prepare_qat(model, "x86", x)
    assert pruning.apply_masks(prepared, masks) == len(masks)
    train_steps(prepared, x, steps=3, lr=0.1)
    pruning.finalize(prepared)
    converted = quantize.convert(prepared, "x86")
    q = quantize.int8_sparsity(converted, "x86", masks)
    assert q["mask_violations"] == 0
    assert q["weights"] >= s["weights"] - 1e-6  # int8 zeros: the pruned ones (+ weights that round to 0)
    if mode == "unstructured":
        # control: without re-attached masks, QAT regrows the pruned weights (why apply_masks exists)
        regrown = quantize.prepare_qat(model, "x86", x)
        train_steps(regrown, x, steps=3, lr=0.1)
        assert quantize.int8_sparsity(quantize.convert(regrown, "x86"), "x86", masks)["mask_violations"] > 0


def test_onnx_exports_match_the_float_model(tmp_path):
    model = tiny_cnn().eval()
    x = torch.rand(3, 1, 16, 16, 16)
    export.export_onnx(model, x[:1], tmp_path / "model.onnx")
    onnx_fp32 = exports.OnnxModule(tmp_path / "model.onnx", threads=1)
    with torch.no_grad():
        ref = torch.softmax(model(x), 1)
        torch.testing.assert_close(torch.softmax(onnx_fp32(x), 1), ref, atol=1e-4, rtol=0)  # dynamic batch
    settings = export.quantize_onnx(tmp_path / "model.onnx", tmp_path / "model_int8.onnx",
                                    [torch.rand(1, 1, 16, 16, 16).numpy() for _ in range(4)])
    assert settings["quant_format"] == "QDQ"
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "model_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    q = torch.softmax(exports.OnnxModule(tmp_path / "model_int8.onnx", threads=1)(x), 1)
    assert (q - ref).abs().max() < 0.1


def test_config_rejects_bad_compress_values():
    with pytest.raises(ConfigError, match="--prune-amount"):
        parse_config(["--mode", "compress", "--prune-amount", "1.0"])
    with pytest.raises(ConfigError, match="--prune-rounds"):
        parse_config(["--mode", "compress", "--prune-rounds", "0"])


def test_untrained_experiment_names_missing_checkpoint_and_command(tmp_path, capsys):
    argv = ["--mode", "compress", "--runs-dir", str(tmp_path), "--exp", "nothing"]
    cfg, _ = parse_config(argv)
    from octa3d.stages import compress

    with pytest.raises(CheckpointError) as err:
        compress.run(cfg)
    msg = str(err.value)
    assert str(tmp_path / "nothing" / "train" / "checkpoints" / "best.pt") in msg
    assert "python main.py --mode train --exp nothing" in msg
    assert cli_main(argv) == 2 and "no trained model to compress" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny trained experiment (cnn, 16^3, 1 epoch) compressed with 2 pruning rounds and 1 QAT epoch."""
    from octa3d.data.synthetic import generate
    from octa3d.stages import compress, train

    root = tmp_path_factory.mktemp("compress")
    generate(root / "data", n_subjects=24, shape=(16, 32, 16), seed=0)
    common = ["--runs-dir", str(root / "runs"), "--exp", "tiny"]
    argv = ["--mode", "train", "--data-root", str(root / "data"), *common, "--model", "cnn", "--input-size", "16",
            "--epochs", "1", "--init", "random", "--batch-size", "4"]
    train.run(parse_config(argv)[0])
    argv = ["--mode", "compress", *common, "--prune-rounds", "2", "--qat-epochs", "1", "--finetune-epochs", "1"]
    rep = compress.run(parse_config(argv)[0])
    return root / "runs" / "tiny" / "compress", rep, argv


def test_stage_writes_every_file_and_report_field(compressed):
    out, rep, _ = compressed
    for name in ("model_int8.pt", "model_fp32.pt", "model.onnx", "model_int8.onnx", "pruned.pt", "model_card.json",
                 "report.json",
                 "report.md", "confusion_matrices.png", "history.csv", "config.yaml", "command.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report_mod.TOP_FIELDS) <= set(doc)
    assert list(doc["models"]) == list(report_mod.VARIANTS)
    for name, entry in doc["models"].items():
        assert set(report_mod.MODEL_FIELDS) <= set(entry), name
        assert entry["latency_ms"] > 0 and entry["size_bytes"] > 0 and 0 <= entry["balanced_accuracy"] <= 1
        assert np.asarray(entry["confusion_matrix"]).sum() == doc["test_subjects"]
    assert doc["models"]["int8"]["size_ratio"] > 3  # int8 weights: ~4x smaller than the fp32 TorchScript file
    assert set(doc["targets"]) == {"int8_balanced_accuracy_drop_pp", "int8_speedup", "int8_size_ratio"}
    assert doc["latency"]["runs"] >= 20 and doc["latency"]["batch"] == 1
    p = doc["pruning"]
    assert [r["round"] for r in p["rounds"]] == [1, 2] and p["sparsity_fp32"]["weights"] == pytest.approx(0.5, abs=1e-4)
    assert p["sparsity_int8"]["weights"] >= 0.5 - 1e-4 and p["sparsity_int8"]["mask_violations"] == 0
    q = doc["quantization"]
    assert q["quantized_modules"]["torch.ao.nn.intrinsic.quantized.ConvReLU3d"] == 5
    assert q["torchao"]["applied"] is False and "FX" in q["torchao"]["note"]
    checks = doc["export_checks"]
    assert checks["model_int8.pt"]["max_abs_prob_diff"] < 1e-4  # TorchScript file == in-process int8 model
    assert checks["model.onnx"]["max_abs_prob_diff"] < 1e-4  # ONNX fp32 == in-process pruned model
    assert checks["model_fp32.pt"]["max_abs_logit_diff"] < 1e-4  # fp32 TorchScript == in-process pruned model
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Which layers were quantized" in md and "| int8 |" in md
    assert rep["models"]["int8"]["file"] == "model_int8.pt"


def test_compressed_files_load_without_training_code_and_agree(compressed):
    out, _, _ = compressed
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    assert card["class_names"] == ["NORMAL", "ABNORMAL"] and card["input"]["shape"] == ["N", 1, 16, 16, 16]
    assert card["input"]["modality"] == "OCTA" and "clip_percentiles" in card["preprocess"]
    assert set(card["artifacts"]) == {"model_int8.pt", "model_fp32.pt", "model.onnx", "model_int8.onnx", "pruned.pt"}
    # the source's fitted temperature is in the card and in every loaded record (test/predict apply it)
    source_t = torch.load(out.parent / "train" / "checkpoints" / "best.pt", weights_only=True)["temperature"]
    assert source_t is not None and card["temperature"] == pytest.approx(source_t)
    assert card["record"]["temperature"] == pytest.approx(source_t)
    x = torch.rand(2, 1, 16, 16, 16)
    pruned, rec, is_q = load_any_model(out / "pruned.pt")
    assert not is_q and rec["cam_capable"] and rec["class_names"] == card["class_names"]
    check_cam_capable(out / "pruned.pt", rec, is_q)  # float: Grad-CAM allowed
    onnx_fp32, rec_o, is_q_o = load_any_model(out / "model.onnx")
    assert not is_q_o and rec_o["input_shape"] == [16, 16, 16]
    with torch.no_grad():
        torch.testing.assert_close(onnx_fp32(x), pruned(x), atol=1e-4, rtol=1e-4)
    int8, rec_q, is_q_q = load_any_model(out / "model_int8.pt")
    assert is_q_q and rec_q["config"]["data"]["modality"] == "OCTA"
    assert rec_q["temperature"] == rec["temperature"] == rec_o["temperature"] == card["temperature"]
    # fp32 TorchScript next to the int8 one: not quantized, same logits as the pruned checkpoint, card usable
    ts32, rec_t, is_q_t = load_any_model(out / "model_fp32.pt")
    assert not is_q_t and rec_t["artifact_format"] == "torchscript" and rec_t["temperature"] == card["temperature"]
    assert card["artifacts"]["model_fp32.pt"]["precision"] == "fp32"
    with torch.no_grad():
        torch.testing.assert_close(ts32(x), pruned(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert int8(x).shape == (2, 2)
    with pytest.raises(ConfigError, match="float model"):
        check_cam_capable(out / "model_int8.pt", rec_q, is_q_q)
    _, rec_oq, is_q_oq = load_any_model(out / "model_int8.onnx")
    assert is_q_oq
    with pytest.raises(ConfigError, match="float model"):
        check_cam_capable(out / "model_int8.onnx", rec_oq, is_q_oq)


def test_onnx_without_card_is_refused_and_rerun_needs_overwrite(compressed, tmp_path):
    out, _, argv = compressed
    shutil.copy(out / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match="model_card.json"):
        load_any_model(tmp_path / "model.onnx")
    from octa3d.stages import compress

    with pytest.raises(RunExistsError, match="--overwrite"):
        compress.run(parse_config(argv)[0])


def test_test_and_explain_accept_compressed_models(compressed, caplog):
    """--mode test / explain on model_int8.pt and model.onnx: hold-out metrics equal the report's, no CAMs by
    default (with the reason logged), and an explicit --cam request for an int8 model is refused."""
    out, rep, _ = compressed
    from octa3d.stages import explain
    from octa3d.stages import test as test_stage

    common = ["--runs-dir", str(out.parent.parent), "--exp", "tiny"]
    argv = ["--mode", "test", *common, "--checkpoint", str(out / "model_int8.pt"), "--bootstrap", "50"]
    with caplog.at_level("WARNING", logger="octa3d"):
        m = test_stage.run(parse_config(argv)[0])
    assert "no class activation maps" in caplog.text and "pruned.pt" in caplog.text
    assert m["model_format"] == "int8" and "cam" not in m
    assert not (out.parent / "test" / "cams").exists()
    assert m["balanced_accuracy"] == pytest.approx(rep["models"]["int8"]["balanced_accuracy"])
    with pytest.raises(ConfigError, match="float model"):
        argv_cam = argv + ["--overwrite", "--cam", "gradcam"]
        test_stage.run(parse_config(argv_cam)[0])

    scan = next(p for p in (out.parent.parent.parent / "data").rglob("OCTA") if p.is_dir())
    subject = sorted(d for d in scan.iterdir() if d.is_dir())[0]
    argv = ["--mode", "explain", *common, "--checkpoint", str(out / "model.onnx"), "--input", str(subject)]
    res = explain.run(parse_config(argv)[0])
    assert res["model_format"] == "onnx" and "cam" not in res
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # the fp32 TorchScript: test calibrates it with the temperature its card carries, as the checkpoint
    argv = ["--mode", "test", *common, "--checkpoint", str(out / "model_fp32.pt"), "--bootstrap", "20", "--overwrite",
            "--cam", "none"]
    m = test_stage.run(parse_config(argv)[0])
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    assert m["calibration"]["applied"] and m["calibration"]["temperature"] == pytest.approx(card["temperature"])
    assert m["model_format"] == "torchscript"


# ------------------------------------------------------------------------------------------------ ViT: torchao
def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("vit", "3d", 1, 2, input_size=(16, 16, 16), patch_size=8, hidden_size=48, mlp_dim=96,
                        num_layers=2, num_heads=4)


def test_quantization_path_follows_the_layers():
    from octa3d.stages.compress import linear_quant

    assert linear_quant.quantization_path(tiny_cnn()) == "fx"
    assert linear_quant.quantization_path(tiny_vit()) == "torchao"
    assert linear_quant.linear_share(tiny_vit()) > 0.5


def test_torchao_qat_keeps_pruning_and_the_int8_file_matches(tmp_path):
    """torchao QAT fake-quantizes every nn.Linear of a ViT (FX cannot trace it), pruning masks survive QAT, and the
    dynamic-int8 TorchScript file reproduces the in-process int8 model and stays close to torchao's own int8."""
    from octa3d.stages.compress import linear_quant

    model, x = tiny_vit(), torch.rand(4, 1, 16, 16, 16)
    with pytest.raises(Exception, match="cannot be prepared for FX"):
        quantize.prepare_qat(model, "x86", x)
    pruning.prune_step(model, "unstructured", 0.5)
    masks = pruning.masks_of(model)
    pruning.finalize(model)
    prepared = linear_quant.prepare_qat(model)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert linear_quant.fake_quantized_layers(prepared) == n_linear == 9  # 2 blocks x 4 + head
    assert pruning.apply_masks(prepared, masks) == len(masks)
    train_steps(prepared, x, steps=3, lr=0.1)
    pruning.finalize(prepared)
    qat_float = linear_quant.strip_fake_quant(prepared)
    assert linear_quant.fake_quantized_layers(qat_float) == 0
    assert pruning.sparsity(qat_float)["weights"] == pytest.approx(0.5, abs=1e-4)  # QAT regrew nothing
    converted = linear_quant.convert_dynamic(qat_float, "x86")
    summary = linear_quant.quantized_summary(converted)
    assert summary["quantized_modules"] == {"torch.ao.nn.quantized.dynamic.Linear": 9}
    assert "torch.nn.modules.conv.Conv3d" in summary["float_modules"]  # the patch embedding stays float
    q = quantize.int8_sparsity(converted, "x86", masks)
    assert q["mask_violations"] == 0 and q["total"] > 0
    with torch.no_grad():
        ref, ours = qat_float(x), converted(x)
        theirs = linear_quant.torchao_int8(qat_float)(x)
    assert (ours - ref).abs().max() < 0.1 and (theirs - ref).abs().max() < 0.1
    card = {"format": exports.CARD_FORMAT, "quantized_engine": "x86", "record": {"class_names": ["a", "b"]},
            "artifacts": {"m.pt": {"precision": "int8"}}}
    export.save_torchscript(converted, x[:1], tmp_path / "m.pt", card, "x86")
    loaded, _, is_q = load_any_model(tmp_path / "m.pt")
    with quantize.quantized_engine("x86"), torch.no_grad():
        torch.testing.assert_close(loaded(x), ours, atol=1e-5, rtol=0)
    assert is_q


@pytest.fixture(scope="module")
def compressed_vit(tmp_path_factory):
    """A tiny ViT (registered for this module only) trained for one epoch and compressed: the torchao path."""
    from functools import partial

    from octa3d.data.synthetic import generate
    from octa3d.model.registry import _REGISTRY, register_model
    from octa3d.model.vit import vit
    from octa3d.stages import compress, train

    register_model("vit-test-tiny", cam_layer="cam_grid", min_input=16, ae_supported=False, feature_size=48,
                   stages=(("patch_embedding", "cls_token"), ("blocks", "norm")),
                   head_prefixes=("classification_head",), needs_input_size=True)(
        partial(vit, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4))
    try:
        root = tmp_path_factory.mktemp("compress-vit")
        generate(root / "data", n_subjects=24, shape=(16, 32, 16), seed=0)
        common = ["--runs-dir", str(root / "runs"), "--exp", "vit"]
        train.run(parse_config(["--mode", "train", "--data-root", str(root / "data"), *common, "--model",
                                "vit-test-tiny", "--input-size", "16", "--epochs", "1", "--init", "random",
                                "--batch-size", "4"])[0])
        argv = ["--mode", "compress", *common, "--qat-epochs", "1", "--finetune-epochs", "1"]
        rep = compress.run(parse_config(argv)[0])
        yield root / "runs" / "vit" / "compress", rep
    finally:
        _REGISTRY.pop("vit-test-tiny", None)


def test_vit_compress_takes_the_torchao_path_with_report_rows(compressed_vit):
    out, rep = compressed_vit
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(doc["models"]) == [*report_mod.VARIANTS, "torchao_int8"]
    for name, entry in doc["models"].items():
        assert set(report_mod.MODEL_FIELDS) <= set(entry), name
        assert entry["latency_ms"] > 0 and entry["size_bytes"] > 0 and 0 <= entry["balanced_accuracy"] <= 1
        assert np.asarray(entry["confusion_matrix"]).sum() == doc["test_subjects"]
    q = doc["quantization"]
    assert q["method"] == "torchao" and q["torchao"]["applied"] is True
    assert q["torchao"]["fake_quantized_linear_layers"] == 9
    assert q["quantized_modules"] == {"torch.ao.nn.quantized.dynamic.Linear": 9}
    assert doc["pruning"]["sparsity_int8"]["mask_violations"] == 0
    assert "qat" in {row["phase"] for row in doc["history"]}
    assert doc["export_checks"]["model_int8.pt"]["max_abs_prob_diff"] < 1e-4
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "torchao QAT" in md and "| torchao_int8 |" in md
    # the int8 file is an ordinary compressed model for --mode test
    from octa3d.stages import test as test_stage

    m = test_stage.run(parse_config(["--mode", "test", "--runs-dir", str(out.parent.parent), "--exp", "vit",
                                     "--checkpoint", str(out / "model_int8.pt"), "--bootstrap", "20"])[0])
    assert m["model_format"] == "int8"
    assert m["balanced_accuracy"] == pytest.approx(rep["models"]["int8"]["balanced_accuracy"])
