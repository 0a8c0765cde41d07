"""octa3d: retinal disease classification from 3D OCTA/OCT volumes and 2D retinal images.

``octa3d.load(path)`` (:func:`octa3d.deploy.api.load`) loads a trained model for prediction in Python; it is
imported on first use, so that ``import octa3d`` stays light (no torch/MONAI import).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from octa3d.deploy.api import load

        return load
    raise AttributeError(f"module 'octa3d' has no attribute {name!r}")
