"""Edge deployment (``--mode compress``): magnitude pruning, int8 quantization-aware training, TorchScript/ONNX
export and a report comparing fp32, pruned and int8 models on the hold-out test set.

Modules:
    stage      ``run(cfg, argv)``: prune → fine-tune → QAT → convert → export → evaluate → report
    pruning    iterative global-unstructured / structured magnitude pruning, masks, sparsity
    quantize   PyTorch FX QAT (x86 / qnnpack), int8 conversion, which layers got quantized
    export     TorchScript int8, ONNX fp32 / int8 (onnxruntime QDQ), model card, :func:`load_any_model`
    measure    hold-out metrics, interleaved CPU latency, serialized sizes
    report     report.json / report.md / confusion_matrices.png

Other stages load a compressed model with :func:`load_any_model` (``(model, record, is_quantized)``) and refuse
Grad-CAM on it with :func:`check_cam_capable`.
"""

from octa3d.compress.export import OnnxModule, check_cam_capable, load_any_model
from octa3d.compress.stage import STAGE, run

__all__ = ["STAGE", "OnnxModule", "check_cam_capable", "load_any_model", "run"]
