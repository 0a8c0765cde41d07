"""A real-size OCTA-500 volume: 400 palette BMP B-scans of 640 x 400, read as distributed."""

from __future__ import annotations

import numpy as np

from octa3d.config import DataConfig
from octa3d.data.bmp import encode_bmp8
from octa3d.data.readers import load_subject
from octa3d.data.sources import discover


def test_reads_a_400_bscan_6mm_volume(tmp_path):
    sid, n, rows, cols = "10001", 400, 640, 400
    folder = tmp_path / "OCTA_6mm" / "OCTA" / sid
    folder.mkdir(parents=True)
    base = (np.arange(rows, dtype=np.uint16)[:, None] // 3 + np.arange(cols)[None, :] // 5).astype(np.uint8)
    for k in range(1, n + 1):
        img = base.copy()
        img[0, :3] = (k % 256, k // 256, 7)  # B-scan number encoded in the first pixels
        (folder / f"{k}.bmp").write_bytes(encode_bmp8(img))
    import pandas as pd

    pd.DataFrame({"ID": [int(sid)], "Disease": ["NORMAL"]}).to_excel(tmp_path / "Text labels.xlsx", index=False)
    (subject,) = discover(DataConfig(data_root=str(tmp_path)))
    vol, geom = load_subject(subject, "OCTA")
    assert vol.shape == (1, n, rows, cols) and vol.dtype == np.uint8
    # numeric order (10.bmp after 9.bmp, 100.bmp after 99.bmp ...)
    assert [int(vol[0, k, 0, 0]) + 256 * int(vol[0, k, 0, 1]) for k in range(n)] == list(range(1, n + 1))
    assert np.array_equal(vol[0, 5, 1:], base[1:])
    # 6 mm x 2 mm x 6 mm field of view -> physical spacing (SimpleITK order x=columns, y=rows, z=B-scans)
    assert np.allclose(geom.spacing, (6 / cols, 2 / rows, 6 / n))
