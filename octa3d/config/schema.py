"""The configuration schema: one dataclass per flag group, whose fields *are* the CLI flags (help text and choices
in each field's ``metadata``), and :class:`Config` holding them all plus the derived values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from octa3d.errors import ConfigError

MODES = ("synth", "prepare", "ae_pretrain", "train", "test", "explain", "predict", "export", "compress", "study",
         "demo")


def opt(default: Any, help: str, *, choices: tuple | None = None, factory: bool = False) -> Any:
    """Declare a config field that is also a command-line flag.

    Args:
        default: default value (a list/tuple default is copied per instance).
        help: the ``--help`` text.
        choices: allowed values, checked by argparse and by :func:`validate`.
        factory: use ``default`` as a factory value (for mutable defaults).
    """
    meta = {"help": help, "choices": choices}
    if factory or isinstance(default, list):
        return field(default_factory=lambda d=default: list(d) if isinstance(d, list) else d, metadata=meta)
    return field(default=default, metadata=meta)


#: The named looks of ``--synth-look``: the keys of :data:`octa3d.data.synthetic.PRESETS`, spelt out here so that
#: the CLI starts without importing the generator (numpy, scipy); a test keeps the two equal.
SYNTH_LOOKS = ("stock", "faint", "small", "dropout-only", "microaneurysms-only", "noisy", "drift", "sparse-vessels",
               "artefacts")

#: The evidence-map methods of ``--cam`` (:mod:`octa3d.cam.backends` implements each).
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "hirescam", "occlusion", "medcam")


@dataclass
class RunConfig:
    """Where the experiment lives and how it runs."""

    mode: str = opt("prepare", "Pipeline stage to run.", choices=MODES)
    exp: str | None = opt(None, "Experiment name, a plain folder name (no '/', '..'): <runs-dir>/<exp>/ "
                                "(default: <dim>-<model>-<task>).")
    runs_dir: str = opt("runs", "Folder holding experiment folders.")
    seed: int = opt(42, "Seed for splits, Python, NumPy, torch and DataLoader workers.")
    device: str = opt("auto", "Torch device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps; "
                              "asking for one this machine lacks is an error, not a CPU run.")
    num_workers: int = opt(0, "DataLoader worker processes (0 = load in the main process).")
    overwrite: bool = opt(False, "Replace a finished stage folder instead of refusing (the earlier results are "
                                 "kept until the new run has finished).")
    log_level: str = opt("INFO", "Console log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class DataConfig:
    """Where the scans are, how subjects are labelled and split."""

    data_root: str = opt("./data", "Dataset folder (OCTA-500 layout, manifest CSV, vendor exports such as "
                                   "Heidelberg .vol / Duke / RETOUCH, or 2D class folders) or a manifest .csv file.")
    source: str = opt("auto", "Dataset layout; auto detects it from --data-root.",
                      choices=("auto", "octa500", "manifest", "vendor", "folders"))
    labels: str | None = opt(None, "Label file (.xlsx/.csv with ID and Disease columns). "
                                   "Default for OCTA-500: '<data-root>/Text labels.xlsx'.")
    modality: str = opt("OCTA", "Volume(s) to read (OCTA-500 folders, vendor exports: a .vol is OCT, its "
                                "...Angio.vol OCTA); OCT+OCTA stacks both as two channels.",
                        choices=("OCTA", "OCT", "OCT+OCTA"))
    fov: str = opt("all", "OCTA-500 field of view subset.", choices=("6mm", "3mm", "all"))
    projection: str = opt("compute", "2D en-face source: 'compute' (projection of the volume over the retinal "
                                     "slab) or an OCTA-500 'Projection Maps' folder name, e.g. 'OCTA(FULL)'.")
    group_regex: str = opt(r"^[A-Za-z]+-(\d+)-", "Regex whose first group is the patient ID in 2D file names "
                                                 "(default matches Kermany 'CNV-13823-1.jpeg').")
    skip_unlabeled: bool = opt(False, "Skip images without labels, labels without images and labelled subjects "
                                      "whose needed files (for --dim/--modality/--projection) are missing, all "
                                      "listed, instead of stopping.")
    task: str = opt("binary", "binary: --negative vs everything else; multi: one class per disease.",
                    choices=("binary", "multi"))
    classes: list[str] | None = opt(None, "Comma-separated classes to keep for --task multi (default: all present).")
    negative: str = opt("NORMAL", "Negative class name for --task binary.")
    positive: list[str] | None = opt(None, "Comma-separated diseases that count as positive for --task binary "
                                           "(default: all but --negative).")
    test_fraction: float = opt(0.3, "Hold-out test fraction of subjects (subject-level, stratified).")
    val_fraction: float = opt(0.2, "Validation fraction of the non-test subjects (ignored when --folds > 1).")
    folds: int = opt(1, "Cross-validation folds inside the non-test subjects (1 = single train/val split).")
    max_voxels: int = opt(1_000_000_000, "Largest scan or image read, in voxels/pixels as its header declares "
                                          "(also bounds label sheets); larger files are refused before any memory "
                                          "is allocated. Raise it for genuinely huge scans.")


@dataclass
class PreprocessConfig:
    """How a scan becomes a network input (the deterministic part is cached on disk)."""

    input_size: list[int] | None = opt(None, "Network input size, one number (isotropic) or D,H,W / H,W. "
                                             "Default 128 (3d) or 224 (2d).")
    depth_axis: int = opt(1, "Array axis along the A-scan (depth) of a volume as read (OCTA-500 B-scan stacks: "
                             "1 = BMP rows).")
    slab_depth: float = opt(0.5, "Depth of the retinal slab cropped around the retina: <=1 is a fraction of the "
                                 "scan depth, >1 a number of voxels.")
    clip_percentiles: list[float] = opt([0.5, 99.5], "Intensity percentiles clipped before scaling to 0..1.")
    patch_size: int = opt(0, "2D: side of square patches cut from each image (0 = whole image).")
    patch_stride: int = opt(0, "2D: stride between patches (0 = --patch-size, no overlap).")
    aspect: str = opt("pad", "2D whole images: keep the aspect ratio by zero padding to the input's (pad) or "
                             "stretch them to it (stretch).", choices=("pad", "stretch"))
    normalize: str = opt("none", "Intensity normalisation after scaling to 0..1: none, or imagenet (mean/std of "
                                 "ImageNet, averaged over RGB for 1-2 channel inputs; RETFound-style checkpoints "
                                 "expect it). Recorded in the checkpoint, so test/predict apply it.",
                         choices=("none", "imagenet"))
    augment: bool = opt(True, "Random flips, small affine and intensity changes on training samples.")
    cache_dir: str | None = opt(None, "Persistent cache of preprocessed samples (default: <runs-dir>/.cache).")


@dataclass
class ModelConfig:
    """Which network."""

    dim: str = opt("3d", "2d (en-face/B-scan/fundus images) or 3d (volumes).", choices=("2d", "3d"))
    model: str = opt("resnet18", "Registered model name (see --list-models).")
    shortcut_type: str = opt("B", "ResNet shortcut where the channel count changes: B = 1x1 convolution (MONAI "
                                  "default), A = zero-padded identity (MedicalNet resnet18/34 checkpoints).",
                             choices=("A", "B"))
    drop_path: float = opt(0.0, "Stochastic depth (drop-path) rate of transformer blocks, linearly increasing "
                                "with depth (ViT fine-tuning recipes use 0.1-0.2).")


@dataclass
class TrainConfig:
    """Optimisation for --mode ae_pretrain and --mode train."""

    epochs: int = opt(60, "Training epochs (early stopping may end sooner). 60: four classes from ~70 training "
                          "eyes were still under-fitted after 30 (README 'Multi-class').")
    batch_size: int = opt(4, "Samples per optimisation step (per process under torchrun).")
    lr: float = opt(1e-3, "Peak learning rate (AdamW), reached after --warmup-epochs, then cosine decay. 1e-3: "
                          "3e-4 fit the training eyes of fainter/smaller/noisier cohort looks but stopped at hold-out "
                          "balanced accuracy 0.54-0.88 where 1e-3 reached 0.71-1.00 (README 'Training recipe'). "
                          "Fine-tuning pretrained encoders and ViTs want less (their docs give rates).")
    weight_decay: float = opt(1e-4, "AdamW weight decay.")
    warmup_epochs: int = opt(1, "Linear learning-rate warm-up epochs before the cosine schedule.")
    patience: int = opt(10, "Early stopping: epochs without improvement of the monitored metric or of the "
                            "validation loss (0 = off); counted only once the training loss is below 0.9 x the "
                            "chance loss, so a run never stops at chance; a tie with a lower validation loss "
                            "counts as an improvement of the metric.")
    monitor: str = opt("balanced_accuracy", "Validation metric that picks best.pt and drives early stopping "
                                            "(--mode train; ae_pretrain always monitors val_loss).",
                       choices=("balanced_accuracy", "auc", "f1_macro", "accuracy", "val_loss"))
    init: str = opt("auto", "Classifier start: 'ae' = encoder from this experiment's ae_pretrain/best.pt, "
                            "'random', or 'auto' (ae when that checkpoint exists).", choices=("auto", "ae", "random"))
    init_from: str | None = opt(None, "Local weight file (.pt/.pth, e.g. MedicalNet) loaded into the model "
                                      "before training; tensors with matching names and shapes are copied.")
    init_format: str = opt("auto", "Layout of the --init-from file: auto (detected from its tensor names), octa3d "
                                   "(an octa3d/MONAI checkpoint), retfound (timm-style 2D ViT, e.g. RETFound), "
                                   "octcube (3D ViT with spatial + temporal position embeddings), medicalnet "
                                   "(3D ResNet).", choices=("auto", "octa3d", "retfound", "octcube", "medicalnet"))
    init_strict: bool = opt(False, "Make any encoder tensor missing from the --init-from file an error (loading "
                                   "none of the encoder is always an error).")
    layer_decay: float = opt(1.0, "Layer-wise learning-rate decay: a block at depth d below the head trains at "
                                  "lr x decay^d (0.65-0.75 for pretrained ViTs; 1 = off).")
    mask_ratio: float = opt(0.75, "ae_pretrain of a ViT (masked autoencoding): fraction of patches hidden from "
                                  "the encoder.")
    freeze_encoder_stages: int = opt(0, "Keep the first N encoder stages frozen during --mode train.")
    freeze_epochs: int = opt(0, "Linear probe first: only the head trains for K epochs, then the whole network.")
    freeze_encoder: bool = opt(False, "Train the head only, for all epochs (encoder frozen).")
    loss: str = opt("weighted-ce", "Classification loss: cross-entropy with inverse-frequency class weights from the "
                                   "training split, plain cross-entropy, or focal loss (gamma 2, class-weighted).",
                    choices=("weighted-ce", "ce", "focal"))
    label_smoothing: float = opt(0.0, "Label smoothing for the cross-entropy losses (e.g. 0.1).")
    optimizer: str = opt("adamw", "Optimiser (sgd: momentum 0.9, nesterov).", choices=("adamw", "sgd"))
    accum_steps: int = opt(1, "Gradient accumulation: optimiser step every N batches (effective batch N x "
                              "--batch-size).")
    clip_grad: float = opt(0.0, "Clip the gradient norm to this value (0 = off).")
    resume: bool = opt(False, "Continue --mode ae_pretrain/train from its [fold-k/]checkpoints/last.pt (model, "
                              "optimiser, schedule, AMP scaler, epoch, RNG and early-stopping state); --mode study: "
                              "continue the study (finished cells are kept, interrupted ones resumed).")
    max_steps: int = opt(0, "Stop each fold's training after this many optimiser steps (0 = no limit), as an "
                            "interruption would: last.pt keeps the last finished epoch and --resume continues.")
    channels_last: bool = opt(False, "channels-last memory format (faster convolutions on recent GPUs).")
    compile: bool = opt(False, "torch.compile the model (first epoch pays the compilation).")
    ae_loss: str = opt("mse", "Autoencoder reconstruction loss.", choices=("mse", "l1"))
    ae_extra_data: str | None = opt(None, "Extra unlabeled scans for ae_pretrain (a folder or manifest in any "
                                          "supported layout); refused if it holds a test subject.")
    amp: bool = opt(True, "Mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler); "
                          "ignored on CPU.")
    deterministic: bool = opt(False, "Deterministic kernels (bit-exact reruns on CPU; slower on GPU).")


@dataclass
class EvalConfig:
    """Hold-out testing and Grad-CAM export (--mode test / explain)."""

    checkpoint: str | None = opt(None, "Model to test/explain (default: the experiment's train/checkpoints/best.pt; "
                                       "with --folds K all folds, ensembled by averaging probabilities).")
    input: str | None = opt(None, "--mode explain: one scan (any supported format, a vendor export such as a "
                                  "Heidelberg .vol, or an OCTA-500 subject folder); --mode predict: a scan, an "
                                  "OCTA-500-layout folder, a manifest CSV, a vendor layout or a folder of "
                                  "images/volumes (labels optional).")
    external: str | None = opt(None, "--mode test: a labelled external cohort (any supported layout) scored as "
                                     "test data, every labelled subject, into test-external/<name>/; refused when "
                                     "a subject or patient overlaps the experiment's train/val/AE subjects.")
    cam: str = opt("layercam", "Evidence-map method (gradcam, gradcam++, layercam, hirescam, occlusion = MONAI "
                               "occlusion sensitivity, medcam); 'none' switches maps off. Default chosen by "
                               "benchmarks/cam_quality.py (README 'Evidence maps').",
                   choices=(*CAM_METHODS, "none"))
    cam_layer: str | None = opt(None, "Module(s) whose activations the map uses; a comma list fuses several "
                                      "(default: adapted to the input size, no map coarser than 1/8 of the input "
                                      "per axis).")
    faithfulness_subjects: int = opt(8, "Subjects whose maps get deletion/insertion AUCs (forward passes: 51 per "
                                        "subject; 0 = off).")
    cam_class: str | None = opt(None, "Class the CAM explains (name or index; default: the predicted class).")
    cam_subjects: list[str] | None = opt(None, "Comma-separated subject IDs that get CAM exports (default: all "
                                               "test/predict subjects).")
    bootstrap: int = opt(1000, "Bootstrap resamples for the 95 % confidence intervals (0 = none).")
    calibrate: bool = opt(True, "Use the temperature-scaled probabilities (temperature fitted on each fold's "
                                "validation split at the end of training) for predictions and metrics; "
                                "--no-calibrate reports the raw softmax (both are in metrics.json either way).")
    tta: int = opt(0, "Test-time augmentation passes per model (flips and the small affine of training, seeded "
                      "from --seed) that give the per-eye spread p_sd of P(positive); 0 = off.")
    mc_dropout: int = opt(0, "MC-dropout passes per model (dropout sampling, BatchNorm in eval) that give the "
                             "per-eye spread p_sd; needs a model with dropout layers; 0 = off.")
    ood_false_alarm: float = opt(0.05, "Out-of-distribution flag (--mode predict, test, the API): share of "
                                       "in-distribution eyes allowed to be flagged; the thresholds come from the "
                                       "checkpoint's validation and cross-fitted training subjects.")


@dataclass
class SynthConfig:
    """Synthetic OCTA-500-layout generator (--mode synth)."""

    n_subjects: int = opt(60, "Number of synthetic eyes.")
    shape: list[int] = opt([32, 64, 32], "Volume shape as B-scans,depth,width (OCTA-500 full size: 400,640,400).")
    layout: str = opt("octa500", "What to write: OCTA-500 BMP stacks, NIfTI + manifest.csv, or both.",
                      choices=("octa500", "nifti", "both"))
    synth_look: str = opt("stock", "Cohort variant: how the same diseases look (lesion contrast/size/count, DR as "
                                   "dropout or microaneurysms only, noise, drift between eyes, vessel density, "
                                   "OCTA artefacts); judge a recipe on looks it was not tuned on "
                                   "(docs/how-to/external-validation.md).", choices=SYNTH_LOOKS)


@dataclass
class CompressConfig:
    """Edge deployment (--mode compress): pruning, quantization-aware training to int8, TorchScript/ONNX export."""

    prune_amount: float = opt(0.5, "Final sparsity of the magnitude pruning: fraction of conv/linear weights "
                                   "(unstructured) or of conv output channels (structured) set to zero.")
    prune_rounds: int = opt(1, "Iterative pruning rounds; each removes the same fraction of the remaining weights, "
                               "followed by --finetune-epochs of fine-tuning on the training split.")
    prune_mode: str = opt("unstructured", "unstructured: global L1 magnitude pruning over all conv/linear weights; "
                                          "structured: L2 pruning of whole conv output channels per layer; "
                                          "none: no pruning (quantization only).",
                          choices=("unstructured", "structured", "none"))
    qbackend: str = opt("x86", "int8 target: x86 (fbgemm/oneDNN kernels, servers and PCs) or qnnpack (ARM; "
                               "3D max pooling stays float because qnnpack has no int8 max_pool3d).",
                        choices=("x86", "qnnpack"))
    qat_epochs: int = opt(2, "Quantization-aware training epochs on the training split (0 = calibration only).")
    finetune_epochs: int = opt(1, "Fine-tuning epochs after each pruning round (at 0.1 x the training --lr).")


@dataclass
class StudyConfig:
    """A study: arms x folds of ordinary runs, paired statistics and a paper kit (--mode study)."""

    study: str | None = opt(None, "--mode study: the study file (YAML: data, folds, arms; docs/how-to/studies.md).")
    ray_address: str = opt("local", "Where the cells of a study run: local (an embedded Ray on this machine, every "
                                    "CPU and GPU, nothing to start), auto (the running Ray cluster this machine "
                                    "belongs to), ray://HOST:PORT (Ray Client) or HOST:PORT.")
    executor: str = opt("ray", "ray: cells as Ray tasks (in parallel, retried when a worker dies); sequential: one "
                               "after another in this process, without Ray.", choices=("ray", "sequential"))
    cell_cpus: int = opt(0, "CPUs (and torch threads) per cell; 0 = the CPUs per GPU where there are GPUs, else "
                            "the CPUs divided among the cells (1 to 8).")
    cell_gpus: float = opt(1.0, "GPUs per cell where the cluster has GPUs (0.5 = two cells share one).")
    cell_retries: int = opt(2, "Retries of a cell whose worker died or that stopped on an unexpected error (octa3d "
                               "errors, e.g. a bad setting or a missing file, are reported, not retried).")


@dataclass
class Config:
    """The whole configuration of one octa3d invocation."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self) -> None:
        # Not dataclass fields (so not flags, not in config.yaml): set by the CLI parser.
        #: Field names given explicitly (command line or --config YAML); stages read this instead of argv.
        self.explicit: frozenset[str] = frozenset()
        #: The arguments as typed, recorded in command.txt (None: this process's sys.argv).
        self.argv: tuple[str, ...] | None = None

    def is_explicit(self, name: str) -> bool:
        """True when field ``name`` (e.g. ``"data_root"``) was set on the command line or in ``--config``."""
        return name in self.explicit

    # ------------------------------------------------------------------ derived values
    @property
    def exp_name(self) -> str:
        """Experiment name, stable across modes so ae_pretrain/train/test share one folder."""
        return self.run.exp or f"{self.model.dim}-{self.model.model}-{self.data.task}"

    @property
    def run_dir(self) -> Path:
        """``<runs-dir>/<exp>``."""
        return Path(self.run.runs_dir) / self.exp_name

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return 2 if self.model.dim == "2d" else 3

    @property
    def in_channels(self) -> int:
        """Input channels implied by --modality (OCT+OCTA = 2)."""
        return 2 if self.data.modality == "OCT+OCTA" else 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Spatial input size expanded to ``spatial_dims`` numbers."""
        size = self.preprocess.input_size or [128 if self.spatial_dims == 3 else 224]
        if len(size) == 1:
            return tuple(size) * self.spatial_dims
        if len(size) != self.spatial_dims:
            raise ConfigError(f"--input-size {','.join(map(str, size))} has {len(size)} numbers; "
                              f"--dim {self.model.dim} needs 1 or {self.spatial_dims}")
        return tuple(size)

    @property
    def cache_dir(self) -> Path:
        """Persistent preprocessing cache folder."""
        return Path(self.preprocess.cache_dir or Path(self.run.runs_dir) / ".cache")


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(Config))


def section_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """All (section, field, resolved type) triples, in declaration order."""
    out = []
    for sec in fields(Config):
        cls = sec.default_factory  # type: ignore[misc]
        hints = get_type_hints(cls)
        for f in fields(cls):
            out.append((sec.name, f, hints[f.name]))
    return out
