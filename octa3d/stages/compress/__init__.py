"""``--mode compress`` (edge deployment): magnitude pruning, int8 quantization-aware training, TorchScript/ONNX
export and a report comparing fp32, pruned and int8 models on the hold-out test set.

Modules:
    stage      ``run(cfg)``: prune → fine-tune → QAT → convert → export → evaluate → report
    pruning    iterative global-unstructured / structured magnitude pruning, masks, sparsity
    quantize   PyTorch FX QAT (x86 / qnnpack), int8 conversion, which layers got quantized (convolutional nets)
    linear_quant  torchao QAT of nn.Linear layers + dynamic int8 conversion (Linear-dominated nets: ViT)
    export     TorchScript int8, ONNX fp32 / int8 (onnxruntime QDQ) writers
    measure    hold-out metrics, interleaved CPU latency, serialized sizes
    report     report.json / report.md / confusion_matrices.png

Other stages read the files back with :func:`octa3d.checkpoint.models.load_any_model` (model card:
:mod:`octa3d.checkpoint.exports`).
"""

from octa3d.stages.compress.stage import STAGE, run

__all__ = ["STAGE", "run"]
