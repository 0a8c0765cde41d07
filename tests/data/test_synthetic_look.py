"""Tests of the synthetic cohort variants (:mod:`octa3d.data.synthetic.look`): tiny volumes, a few seconds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from octa3d.config.schema import SYNTH_LOOKS
from octa3d.data import synthetic as syn
from octa3d.data.synthetic.render import plan_eye
from octa3d.errors import ConfigError

# Digests of today's generator, computed on the code before looks existed: the stock look must keep every voxel,
# mask and table byte of the datasets generated so far (a run folder prepared from one stays reproducible).
STOCK_VOLUMES_SHA256 = "7c18b4d78b342c378912012bc8bf3ce834945fe832784768499ec118125fd30f"
STOCK_DATASET_SHA256 = "6e05da7beee965ad450b47018dc0c0cf61669a76b97fd41764359cc3005fd948"
SHAPE = (16, 32, 16)  # S B-scans, D depth rows, W columns
SEEDS = (0, 1, 2)
# The lesion signatures a preset must keep visible: (class, mask label, modality).
SIGNATURES = [("DR", 1, "octa"), ("DR", 2, "octa"), ("CNV", 1, "octa"), ("CNV", 1, "oct"), ("AMD", 1, "oct"),
              ("CSC", 1, "oct"), ("RVO", 1, "octa")]
NOT_SHOWN = {"dropout-only": {("DR", 2)}, "microaneurysms-only": {("DR", 1)}}  # what a preset removes on purpose
LESION_ONLY = {"faint", "small"}  # presets that change the lesions, not the healthy eye


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


def test_stock_look_is_byte_identical_to_before(tmp_path: Path) -> None:
    assert syn.PRESETS["stock"] == syn.Look()
    assert volumes_digest(look=syn.Look()) == STOCK_VOLUMES_SHA256
    assert dataset_digest(tmp_path / "d", look=syn.look_from_name("stock")) == STOCK_DATASET_SHA256


def test_schema_lists_the_presets() -> None:
    assert SYNTH_LOOKS == tuple(syn.PRESETS)


def test_look_from_name_lists_the_presets() -> None:
    assert syn.look_from_name("faint") is syn.PRESETS["faint"]
    with pytest.raises(ValueError, match="unknown synthetic look 'glossy'") as err:
        syn.look_from_name("glossy")
    assert all(name in str(err.value) for name in syn.PRESETS)


@pytest.mark.parametrize("kw,match", [({"contrast": 0}, "contrast"), ({"dr_kind": "exudates"}, "dr_kind"),
                                      ({"ma_depth": (0.8, 0.2)}, "ma_depth"), ({"artefacts": 2}, "artefacts")])
def test_look_rejects_bad_knobs(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        syn.Look(**kw)


def twins(disease: str, look: syn.Look, seed: int, index: int = 2) -> tuple[dict, dict]:
    """A diseased eye and its healthy twin (same anatomy, noise and drift), both in ``look``."""
    return (syn.make_volume(SHAPE, disease, seed=seed, index=index, look=look),
            syn.make_volume(SHAPE, "NORMAL", seed=seed, index=index, look=look))


@pytest.mark.parametrize("name", list(syn.PRESETS))
def test_preset_keeps_every_disease_visible(name: str) -> None:
    look = syn.PRESETS[name]
    for disease, label, modality in SIGNATURES:
        for seed in SEEDS:
            sick, twin = twins(disease, look, seed)
            inside = sick["mask"] == label
            if (disease, label) in NOT_SHOWN.get(name, ()):
                assert not inside.any(), f"{name}: {disease} still has mask label {label}"
                continue
            assert inside.sum() >= 3, f"{name}: {disease} mask label {label} is (almost) empty (seed {seed})"
            change = np.abs(sick[modality][inside].astype(np.int16) - twin[modality][inside]).mean()
            assert change > 10, f"{name}: {disease} {modality} changes by {change:.1f} inside its mask (seed {seed})"


def dataset_volumes(root: Path) -> dict[str, np.ndarray]:
    """The written NIfTI volumes and masks of a dataset, by file name."""
    import SimpleITK as sitk

    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted((root / "volumes").iterdir())}


@pytest.fixture(scope="module")
def stock_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("stock") / "d"
    syn.generate(root, 6, SHAPE, seed=4, layout="nifti")
    return dataset_volumes(root)


@pytest.mark.parametrize("name", [n for n in syn.PRESETS if n != "stock"])
def test_preset_generates_a_dataset_unlike_stock(name: str, tmp_path: Path,
                                                 stock_dataset: dict[str, np.ndarray]) -> None:
    root = tmp_path / "d"
    recs = syn.generate(root, 6, SHAPE, seed=4, layout="nifti", look=syn.look_from_name(name))
    assert [r["disease"] for r in recs] == list(syn.CLASSES)
    marker = json.loads((root / syn.MARKER).read_text())
    assert marker["complete"] and marker["look"] == {"name": name, **json.loads(json.dumps(
        dataclasses.asdict(syn.PRESETS[name])))}
    vols = dataset_volumes(root)
    assert vols.keys() == stock_dataset.keys()
    changed = {k.split("_")[0] for k in vols if not np.array_equal(vols[k], stock_dataset[k])}
    ids = {r["disease"]: r["id"] for r in recs}
    if name in NOT_SHOWN:  # only DR changes: every other eye is the stock one
        assert changed == {ids["DR"]}
    elif name in LESION_ONLY:  # the healthy eye stays the stock one
        assert changed == set(ids.values()) - {ids["NORMAL"]}
    else:
        assert changed == set(ids.values())


def test_custom_look_is_recorded_without_a_name(tmp_path: Path) -> None:
    syn.generate(tmp_path / "d", 1, SHAPE, look=syn.Look(contrast=0.7, ma_depth=(0.1, 0.3)))
    look = json.loads((tmp_path / "d" / syn.MARKER).read_text())["look"]
    assert look["name"] is None and look["contrast"] == 0.7 and look["ma_depth"] == [0.1, 0.3]


def test_deterministic() -> None:
    look = syn.Look(contrast=0.6, size=0.8, speckle=1.5, gain_spread=0.2, offset_spread=0.05, tilt_deg=3,
                    artefacts=0.5, capillaries=0.7)
    a, b = (syn.make_volume(SHAPE, "DR", seed=9, index=3, look=look) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in ("oct", "octa", "mask"))


def dr_flow(look: syn.Look, seed: int) -> tuple[float, float]:
    """Mean OCTA in the capillary layers (ILM to OPL, microaneurysms left out) inside a DR eye's non-perfused
    patch and in a 2-pixel ring around it."""
    vol, plan = syn.make_volume(SHAPE, "DR", seed=seed, index=3, look=look), plan_eye(SHAPE, "DR", seed, 3, "6mm", look)
    patch = (vol["mask"] == 1).any(1)
    ring = binary_dilation(patch, iterations=2) & ~patch
    d = np.arange(SHAPE[1])[None, :, None] + 0.5
    slab = (d >= plan.ilm[:, None, :]) & (d < plan.opl[:, None, :]) & (vol["mask"] != 2)
    octa = vol["octa"].astype(np.float32)
    return float(octa[slab & patch[:, None, :]].mean()), float(octa[slab & ring[:, None, :]].mean())


@pytest.mark.parametrize("name", ["stock", "dropout-only", "faint", "sparse-vessels"])
def test_dr_dropout_is_an_absence_of_flow(name: str) -> None:
    for seed in SEEDS:
        inside, around = dr_flow(syn.PRESETS[name], seed)
        assert inside < around - 5, f"{name}: OCTA {inside:.0f} inside the non-perfused patch, {around:.0f} around"


def test_dropout_only_mask_covers_the_non_perfused_area() -> None:
    look = syn.PRESETS["dropout-only"]
    for seed in SEEDS:
        mask = syn.make_volume(SHAPE, "DR", seed=seed, index=3, look=look)["mask"]
        assert set(np.unique(mask)) == {0, 1}
        sick, twin = (plan_eye(SHAPE, d, seed, 3, "6mm", look) for d in ("DR", "NORMAL"))
        foot, perfused = (mask == 1).any(1), twin.cap1 > 0  # (outside the foveal avascular zone)
        d = np.arange(SHAPE[1])[None, :, None] + 0.5  # columns whose inner retina holds a voxel (not the pit's)
        inner = ((d >= sick.ilm[:, None, :]) & (d < sick.opl[:, None, :])).any(1)
        for cap, healthy in ((sick.cap1, twin.cap1), (sick.cap2, twin.cap2)):
            gone = (cap < 0.5 * healthy) & perfused & inner
            assert gone.any() and foot[gone].all()  # more than half the capillaries removed: in the mask
            assert (cap[foot & perfused] < healthy[foot & perfused]).all()  # and the mask holds no healthy part


def test_microaneurysms_only_has_no_dropout() -> None:
    look = syn.PRESETS["microaneurysms-only"]
    for seed in SEEDS:
        sick, twin = twins("DR", look, seed, index=3)
        assert set(np.unique(sick["mask"])) == {0, 2}
        outside = sick["mask"] == 0  # no capillary was removed: outside the dots, the healthy twin's voxels
        assert np.array_equal(sick["octa"][outside], twin["octa"][outside])
        assert np.array_equal(sick["oct"][outside], twin["oct"][outside])
        stock = syn.make_volume(SHAPE, "DR", seed=seed, index=3)  # the dots of "both", no more, no fewer
        assert np.array_equal(sick["mask"] == 2, stock["mask"] == 2)


def lesion_effect(disease: str, label: int, modality: str, look: syn.Look) -> float:
    """Mean signed change (diseased minus healthy twin) inside the mask label, over a few eyes."""
    out = []
    for seed in SEEDS:
        sick, twin = twins(disease, look, seed)
        inside = sick["mask"] == label
        out.append(sick[modality][inside].astype(np.float32).mean() - twin[modality][inside].mean())
    return float(np.mean(out))


@pytest.mark.parametrize("disease,label,modality", [("DR", 1, "octa"), ("DR", 2, "octa"), ("CNV", 1, "octa"),
                                                     ("CNV", 1, "oct"), ("CSC", 1, "oct"), ("RVO", 1, "octa")])
def test_contrast_scales_the_lesion_effect_monotonically(disease: str, label: int, modality: str) -> None:
    effects = [abs(lesion_effect(disease, label, modality, syn.Look(contrast=c))) for c in (0.25, 0.5, 1.0, 1.5)]
    assert all(a < b for a, b in zip(effects, effects[1:])), effects


def test_contrast_scales_the_drusen_height() -> None:
    volume = [sum((syn.make_volume(SHAPE, "AMD", seed=s, index=1, look=syn.Look(contrast=c))["mask"] == 1).sum()
                  for s in SEEDS) for c in (0.5, 1.0, 1.5)]
    assert volume[0] < volume[1] < volume[2], volume


def test_size_and_count_shrink_the_lesions() -> None:
    shape = (32, 64, 32)  # at 16 columns the 1.5-pixel floor of a lesion radius is about the stock CNV radius
    for disease in ("DR", "CNV", "AMD", "CSC", "RVO"):
        n = [sum(syn.make_volume(shape, disease, seed=s, index=2, look=look)["mask"].astype(bool).sum()
                 for s in SEEDS) for look in (syn.PRESETS["small"], syn.Look())]
        assert n[0] < 0.8 * n[1], (disease, n)
    dots = [sum(len(plan_eye((32, 64, 32), "DR", s, 3, "6mm", syn.Look(count=c)).spheres) for s in SEEDS)
            for c in (0.5, 1.0, 2.0)]
    assert dots[0] < dots[1] < dots[2], dots


def test_ma_depth_moves_the_microaneurysms() -> None:
    shape = (32, 64, 32)
    for seed in SEEDS:
        plans = [plan_eye(shape, "DR", seed, 3, "6mm", syn.Look(ma_depth=r)) for r in ((0.05, 0.2), (0.8, 0.95))]
        rel = [[(cd - p.ilm[int(cs), int(cw)]) / (p.opl[int(cs), int(cw)] - p.ilm[int(cs), int(cw)])
                for cs, cd, cw, *_ in p.spheres] for p in plans]
        assert max(rel[0]) < min(rel[1])


def rpe_slope(vol: dict) -> float:
    """Slope (rows per column) of the brightest OCT row across the B-scan, the median over B-scans."""
    peak = vol["oct"].astype(np.float32).argmax(1)  # (S, W)
    cols = np.arange(peak.shape[1])
    return float(np.median([np.polyfit(cols, row, 1)[0] for row in peak]))


def test_drift_changes_each_eyes_intensity_and_tilt() -> None:
    n = 8
    stock = [syn.make_volume(SHAPE, "NORMAL", seed=0, index=i) for i in range(n)]
    gain = [syn.make_volume(SHAPE, "NORMAL", seed=0, index=i, look=syn.Look(gain_spread=0.3, offset_spread=0.05))
            for i in range(n)]
    ratio = [g["oct"].mean() / s["oct"].mean() for g, s in zip(gain, stock)]
    assert np.std(ratio) > 0.1, ratio  # eyes differ in brightness from each other, not all alike
    assert all(np.array_equal(g["mask"], s["mask"]) for g, s in zip(gain, stock))  # intensities only
    tilted = [syn.make_volume(SHAPE, "NORMAL", seed=0, index=i, look=syn.Look(tilt_deg=5)) for i in range(n)]
    turn = [rpe_slope(t) - rpe_slope(s) for t, s in zip(tilted, stock)]
    assert max(turn) > 0.2 and min(turn) < -0.2, turn  # tilted both ways: geometry, per eye
    sick = syn.make_volume(SHAPE, "CSC", seed=0, index=4, look=syn.Look(tilt_deg=5))
    assert (sick["mask"] == 1).sum() >= 3  # the lesion follows the tilted retina


def test_noise_knobs() -> None:
    def texture(v: dict, key: str) -> float:  # mean absolute difference of neighbouring columns
        return float(np.abs(np.diff(v[key].astype(np.float32), axis=2)).mean())

    stock = syn.make_volume(SHAPE, "NORMAL", seed=1)
    noisy = syn.make_volume(SHAPE, "NORMAL", seed=1, look=syn.PRESETS["noisy"])
    assert texture(noisy, "oct") > 1.3 * texture(stock, "oct")
    assert texture(noisy, "octa") > 1.3 * texture(stock, "octa")


def inner_flow(look: syn.Look, seed: int) -> float:
    """Mean OCTA of the capillary layers (ILM to OPL) of a healthy eye."""
    vol, plan = syn.make_volume(SHAPE, "NORMAL", seed=seed, look=look), plan_eye(SHAPE, "NORMAL", seed, 0, "6mm", look)
    d = np.arange(SHAPE[1])[None, :, None] + 0.5
    return float(vol["octa"][(d >= plan.ilm[:, None, :]) & (d < plan.opl[:, None, :])].mean())


def test_sparse_vessels_lower_the_capillary_flow() -> None:
    for seed in SEEDS:
        assert inner_flow(syn.PRESETS["sparse-vessels"], seed) < 0.9 * inner_flow(syn.Look(), seed)


def test_artefacts_add_projection_tails_and_motion_lines() -> None:
    look = syn.PRESETS["artefacts"]
    for seed in SEEDS:
        stock = syn.make_volume(SHAPE, "NORMAL", seed=seed)
        vol = syn.make_volume(SHAPE, "NORMAL", seed=seed, look=look)
        assert (vol["octa"] >= stock["octa"]).all()  # artefacts only add decorrelation
        brighter = vol["octa"].astype(np.float32).mean((1, 2)) - stock["octa"].mean((1, 2))
        plan = plan_eye(SHAPE, "NORMAL", seed, 0, "6mm", look)
        lines = np.flatnonzero(plan.motion)
        assert len(lines) >= 1 and brighter[lines].min() > 3 * np.delete(brighter, lines).max()
        assert np.delete(brighter, lines).max() > 0  # the projection tails below the large vessels


def test_synth_look_through_the_cli(run_cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    res = run_cli(["--mode", "synth", "--synth-look", "faint", "--data-root", data, "--n-subjects", "6",
                   "--shape", "16,32,16", "--seed", "4"], subprocess=True)
    assert res.rc == 0, res.err
    assert "look faint" in res.out
    assert json.loads((data / syn.MARKER).read_text())["look"]["name"] == "faint"
    with pytest.raises(SystemExit) as exc:  # argparse: the usage line and the presets to choose from
        run_cli(["--mode", "synth", "--synth-look", "glossy", "--data-root", tmp_path / "x"])
    assert exc.value.code == 2 and "sparse-vessels" in capsys.readouterr().err
