"""octa3d: retinal disease classification from 3D OCTA/OCT volumes and 2D retinal images."""

__version__ = "0.1.0"
