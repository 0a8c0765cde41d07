"""A trained model for others: the Python API (:mod:`~octa3d.deploy.api`, ``octa3d.load``) and the MONAI bundle
(:mod:`~octa3d.deploy.bundle`, with the standalone scripts it ships in :mod:`~octa3d.deploy.bundle_scripts`)."""
