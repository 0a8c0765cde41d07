"""Networks: the registry, the model families, the autoencoder built from any CNN encoder and ``--init-from``.

Importing the package imports every family module, which registers its models.
"""

from octa3d.model.registry import (ModelSpec, check_input_size, create_model, format_model_table, get_spec, list_models,
                                   model_options, register_model)
from octa3d.model.weights import LoadReport, init_model_kwargs, load_init_weights, read_init_file

# family modules register their models on import; the order is the --list-models order
from octa3d.model import cnn, resnet, densenet, efficientnet, vgg, inception, vit  # noqa: E402,F401  isort:skip
from octa3d.model.autoencoder import (  # noqa: E402
    AutoEncoder,
    TransferReport,
    build_autoencoder,
    encoder_state_dict,
    freeze_encoder_stages,
    set_encoder_trainable,
    transfer_encoder,
)

__all__ = [
    "AutoEncoder", "ModelSpec", "TransferReport", "build_autoencoder", "check_input_size", "create_model",
    "encoder_state_dict", "format_model_table", "freeze_encoder_stages", "get_spec", "list_models",
    "LoadReport", "init_model_kwargs", "load_init_weights", "model_options", "read_init_file", "register_model",
    "set_encoder_trainable", "transfer_encoder",
]
