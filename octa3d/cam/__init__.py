"""Class activation maps: backends, export in the source scan's geometry, localisation scores.

Modules:
    backends      Grad-CAM, Grad-CAM++, LayerCAM, HiResCAM (hooks, multi-layer fusion), MONAI occlusion, medcam
                  behind one :class:`CamComputer` (maps 0..1, high = important, per-sample status)
    sources       :class:`CamItem` (a subject to explain), the source image as read and its lesion mask
    export        :class:`CamExporter`: NIfTI map + input in source geometry, review PNG, TensorBoard slices
    layers        the default layer(s), adapted to the input size
    localization  pointing game (with tolerance) and map mass inside the lesion vs chance, per subject and class
    faithfulness  deletion / insertion AUCs (no truth needed)
"""

from octa3d.cam.backends import (CamComputer, cam_backend, check_cam_options, check_layer, minmax,
                                 resolve_cam_class)
from octa3d.cam.export import CamExporter, score_lines
from octa3d.cam.localization import localization, summarize
from octa3d.cam.sources import CamItem, cam_items_from_cache, read_mask, source_image

__all__ = ["CamComputer", "CamExporter", "CamItem", "cam_backend", "cam_items_from_cache", "check_cam_options",
           "check_layer",
           "localization", "minmax", "read_mask", "resolve_cam_class", "score_lines", "source_image", "summarize"]
