"""Evaluation: forward passes over a labelled set (:mod:`~octa3d.evaluation.forward`), scoring it
(:mod:`~octa3d.evaluation.evaluate`), metrics with confidence intervals (:mod:`~octa3d.evaluation.metrics`),
calibration and selective prediction (:mod:`~octa3d.evaluation.calibration`), figures
(:mod:`~octa3d.evaluation.figures`) and the files of a test folder (:mod:`~octa3d.evaluation.outputs`)."""
