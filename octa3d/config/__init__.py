"""Typed configuration: dataclasses whose fields *are* the CLI flags.

Each field carries its help text in ``metadata``; :mod:`octa3d.cli` builds the argparse groups from them, so a
flag, its YAML key and its dataclass field can never drift apart. Precedence: field default < ``--config`` YAML
< explicit command-line flag. YAML keys are the flag names (``input-size`` or ``input_size``), either flat or
nested under a section name (``data:``, ``train:`` …); unknown keys are errors.

Modules: :mod:`~octa3d.config.schema` (the sections and :class:`Config`), :mod:`~octa3d.config.merge` (YAML and
flag values, validation, to/from the run folder's ``config.yaml``).
"""

from octa3d.config.merge import (apply_overrides, coerce, flatten_yaml, from_dict, get_value, load_yaml, to_argv,
                                 to_dict, to_yaml, validate)
from octa3d.config.schema import (MODES, SECTIONS, CompressConfig, Config, DataConfig, EvalConfig, ModelConfig,
                                  PreprocessConfig, RunConfig, StudyConfig, SynthConfig, TrainConfig, opt,
                                  section_fields)

__all__ = ["MODES", "SECTIONS", "CompressConfig", "Config", "DataConfig", "EvalConfig", "ModelConfig",
           "PreprocessConfig", "RunConfig", "StudyConfig", "SynthConfig", "TrainConfig", "apply_overrides", "coerce", "flatten_yaml",
           "from_dict", "get_value", "load_yaml", "opt", "section_fields", "to_argv", "to_dict", "to_yaml",
           "validate"]
