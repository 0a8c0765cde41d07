"""Tests of the synthetic cohort variants (:mod:`octa3d.data.synthetic.look`): tiny volumes, a few seconds."""

from __future__ import annotations

import hashlib
from pathlib import Path

from octa3d.data import synthetic as syn

# Digests of today's generator, computed on the code before looks existed: the stock look must keep every voxel,
# mask and table byte of the datasets generated so far (a run folder prepared from one stays reproducible).
STOCK_VOLUMES_SHA256 = "7c18b4d78b342c378912012bc8bf3ce834945fe832784768499ec118125fd30f"
STOCK_DATASET_SHA256 = "6e05da7beee965ad450b47018dc0c0cf61669a76b97fd41764359cc3005fd948"


def volumes_digest(**kw: object) -> str:
    """SHA-256 of the OCT, OCTA and mask of one eye per class, 6 mm and 3 mm."""
    h = hashlib.sha256()
    for fov in ("6mm", "3mm"):
        for i, disease in enumerate(syn.CLASSES):
            vol = syn.make_volume((16, 32, 16), disease, seed=5, index=i, fov=fov, **kw)
            for key in ("oct", "octa", "mask"):
                h.update(vol[key].tobytes())
    return h.hexdigest()


def dataset_digest(root: Path, **kw: object) -> str:
    """SHA-256 of every file (name and bytes) of a generated dataset but ``synthetic.json``, which names the look."""
    syn.generate(root, 6, (10, 24, 12), seed=3, layout="both", **kw)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != syn.MARKER:
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_generator_is_byte_identical_to_before(tmp_path: Path) -> None:
    assert volumes_digest() == STOCK_VOLUMES_SHA256
    assert dataset_digest(tmp_path / "d") == STOCK_DATASET_SHA256
