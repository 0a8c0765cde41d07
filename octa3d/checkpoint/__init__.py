"""Model files: the checkpoint format (:mod:`~octa3d.checkpoint.io`), TorchScript / ONNX exports with their model
card (:mod:`~octa3d.checkpoint.exports`), rebuilding and loading models from any of them
(:mod:`~octa3d.checkpoint.models`), and the settings a checkpoint is evaluated or resumed under
(:mod:`~octa3d.checkpoint.settings`). Nothing here imports a stage or :mod:`octa3d.deploy`."""
