"""Synthetic OCTA-500 generator (``--mode synth``): plausible OCT/OCTA eyes with known, localized lesions.

Every eye is a layered retina with a foveal pit, a vessel tree, capillary plexuses, choriocapillaris, OCT speckle
and OCTA decorrelation noise (:mod:`.anatomy`, :mod:`.render`). Classes are assigned round-robin and each adds one
signature, recorded in a ground-truth mask (:mod:`.lesions`); :func:`generate` writes the dataset in the
OCTA-500 layout and/or as NIfTI volumes (:mod:`.writers`, which lists the files). A :class:`Look` (:mod:`.look`,
named ones in :data:`PRESETS`) varies how the cohort looks: lesion conspicuity, DR kind, noise, vessel density,
between-eye drift, artefacts; ``Look()`` is the stock generator.

Arrays follow :mod:`octa3d.data.subject`: ``(S, D, W)`` = (B-scan, depth row, column), SimpleITK spacing
``(fov/W, 2/D, fov/S)`` mm. Output is a pure function of the arguments (per-eye seeds derived from ``seed`` and
the eye's index; no clock in any file), so two runs give byte-identical files. Volumes are rendered a few
B-scans at a time in float32, so the OCTA-500 size 400x640x400 fits in a few hundred MB.
"""

from octa3d.data.synthetic.anatomy import spacing_of
from octa3d.data.synthetic.lesions import CLASSES
from octa3d.data.synthetic.look import DR_KINDS, PRESETS, Look, look_from_name
from octa3d.data.synthetic.render import make_volume
from octa3d.data.synthetic.writers import FIRST_ID, LAYOUTS, MARKER, PROJECTIONS, generate

__all__ = ["CLASSES", "DR_KINDS", "FIRST_ID", "LAYOUTS", "MARKER", "PRESETS", "PROJECTIONS", "Look", "generate",
           "look_from_name", "make_volume", "spacing_of"]
