"""Training: how a model runs on its device (:mod:`~octa3d.training.precision`), one epoch
(:mod:`~octa3d.training.epoch`), the fit loop with resume, checkpoints and early stopping
(:mod:`~octa3d.training.fit`), and the optimisation recipe (:mod:`~octa3d.training.optim`)."""
