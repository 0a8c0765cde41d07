"""Standalone code copied into exported MONAI bundles as ``scripts/`` by :func:`octa3d.deploy.bundle.write_bundle`.

These modules must not import octa3d (a bundle runs where octa3d is not installed): NumPy, PyTorch, MONAI only.
"""
