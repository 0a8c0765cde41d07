"""Write a volume as a Heidelberg HEYEX ``.vol`` file (structural or angiography export) with known contents: for
tests and benchmarks of the vendor reader (:mod:`octa3d.data.vendor`), which reads it back through eyepy.

The bytes are built with eyepy's own ``.vol`` layout (``eyepy.io.he.vol_reader.vol_format``), not written by hand.
eyepy 0.21's ``HeVolWriter`` cannot write a volume its reader returned (it expects ``datetime`` objects where the
reader gives ISO strings, a ``patient`` record the reader does not set, and 17 layer lines per B-scan while it
declares as many as the volume has), and its layout cannot build the examination time (its date adapter yields a
float for an unsigned 64-bit field): this module builds the header with that one field as a plain integer (0,
i.e. 1601-01-01, HEYEX's epoch) and no layer lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from octa3d.utils.io import atomic_write_bytes

#: HEYEX scan pattern 3: a volume scan in ART mode.
VOLUME_ART = 3


def _layout():  # noqa: ANN202 - a construct Struct
    import construct as cs
    from eyepy.io.he.vol_reader import vol_format

    return cs.Struct(*[("exam_time" / cs.Int64ul) if s.name == "exam_time" else s for s in vol_format.subcons])


def heyex_vol_bytes(volume: np.ndarray, spacing: Sequence[float] = (0.0114, 0.0039, 0.12), laterality: str = "OD",
                    angio: bool = False, scan_pattern: int = VOLUME_ART, patient_id: str = "") -> bytes:
    """The bytes of a HEYEX ``.vol`` holding ``volume``.

    Args:
        volume: ``(S, D, W)`` B-scans × depth × A-scans. Structural: uint8 as HEYEX shows it (stored as the
            reflectance eyepy's ``vol`` transform maps back to these values exactly); angiography (``angio``): flow
            values in 0..1, stored as they are.
        spacing: SimpleITK-order ``(A-scan, depth, B-scan distance)`` in mm.
        laterality: ``"OD"`` or ``"OS"``.
        angio: an angiography export (name the file ``…Angio.vol``).
        scan_pattern: the HEYEX scan pattern code (3: volume scan).
        patient_id: the header's patient ID.

    Returns:
        The file's bytes.
    """
    from eyepy.core.utils import to_vol_intensity

    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"a .vol holds B-scans × depth × A-scans; got shape {vol.shape}")
    if angio:
        raw = np.clip(vol.astype(np.float32), 0.0, 1.0)
    elif vol.dtype == np.uint8:
        raw = to_vol_intensity(vol)
    else:
        raise ValueError(f"a structural .vol is written from uint8 B-scans; got {vol.dtype}")
    n, depth, width = vol.shape
    sx, sy, sz = (float(v) for v in spacing)
    bscans = [dict(bscan_hdr_size=256, start_x=0.0, start_y=i * sz, end_x=(width - 1) * sx, end_y=i * sz, num_seg=0,
                   quality=30.0, shift=0, iv_transformation=[0.0] * 6,
                   layer_segmentations=np.zeros((0, width), np.float32), data=np.ascontiguousarray(raw[i]))
              for i in range(n)]
    return _layout().build(dict(
        size_x=width, n_bscans=n, size_y=depth, scale_x=sx, distance=sz, scale_y=sy, size_x_slo=8, size_y_slo=8,
        scale_x_slo=0.01, scale_y_slo=0.01, scan_position=laterality, scan_pattern=int(scan_pattern), exam_time=0,
        bscan_hdr_size=256, id="1", reference_id="", patient_id=patient_id, dob="1950-01-01T00:00:00",
        visit_date="2020-01-01T00:00:00", grid_type=0, grid_offset=0, grid_type1=0, grid_offset1=0, prog_id="",
        localizer=np.zeros((8, 8), np.uint8), bscans=bscans))


def write_heyex_vol(path: str | Path, volume: np.ndarray, spacing: Sequence[float] = (0.0114, 0.0039, 0.12),
                    laterality: str = "OD", angio: bool = False, scan_pattern: int = VOLUME_ART,
                    patient_id: str = "") -> Path:
    """Write ``volume`` as a HEYEX ``.vol`` at ``path``, atomically (arguments as :func:`heyex_vol_bytes`)."""
    return Path(atomic_write_bytes(path, heyex_vol_bytes(volume, spacing, laterality, angio, scan_pattern,
                                                         patient_id)))
