"""Cohort variants ("looks") of the synthetic generator, so that a training recipe cannot be tuned to one look.

A model trained and tested on one synthetic look can score well by learning that look (a bright dot of one size
at one depth, one noise level, one gain) rather than the disease. A :class:`Look` changes how the same diseases
appear: lesion conspicuity (``contrast``, ``size``, ``count``, ``ma_depth``), which kind DR shows (``dr_kind``),
noise (``speckle``, ``decorrelation``), vessel density (``capillaries``), between-eye drift (``gain_spread``,
``offset_spread``, ``tilt_deg``) and OCTA artefacts (``artefacts``). :data:`PRESETS` names a few, each differing
clearly from stock while keeping every disease visible inside its mask; ``--synth-look NAME`` picks one.

``Look()`` is the generator as it was before looks existed, byte for byte: every knob is a multiplier (1 = stock)
or a spread (0 = stock), applied where 1 and 0 leave the float32 arithmetic exact, and the new random draws come
from their own per-eye streams (:func:`~.anatomy.eye_rng` streams 4 and 5), so they move no earlier draw.

This module holds no numpy: :mod:`octa3d.config.schema` lists the preset names as a literal tuple and a test
checks that it equals ``tuple(PRESETS)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from octa3d.errors import ConfigError

#: The values of :attr:`Look.dr_kind`.
DR_KINDS: tuple[str, ...] = ("both", "dropout", "microaneurysms")


@dataclass(frozen=True)
class Look:
    """How a synthetic cohort looks; the defaults are the stock generator.

    Attributes:
        contrast: multiplier of every lesion's intensity change: DR capillary dropout depth and microaneurysm
            brightness, CNV tuft reflectivity and flow, drusen height and the flow void beneath them, CSC fluid
            darkness, RVO non-perfusion depth and vein dilation (above 1 exaggerates, clipped at full dropout).
        size: multiplier of every lesion's radius (DR patch and microaneurysms, CNV tuft, drusen and their spread,
            CSC dome, RVO wedge angle).
        count: multiplier of the number of lesion foci (drusen, microaneurysms), rounded, at least one.
        ma_depth: range ``(lo, hi)`` of the microaneurysms' depth as a fraction of the inner retina (0 = ILM,
            1 = OPL); stock ``(0.6, 0.85)`` puts them in the deep capillary plexus.
        dr_kind: what DR shows: ``"both"`` (non-perfused patch + microaneurysms at its edge), ``"dropout"``
            (capillary non-perfusion only: an absence of flow) or ``"microaneurysms"`` (bright dots only).
        speckle: multiplier of the OCT speckle (log-normal) and additive OCT noise.
        decorrelation: multiplier of the OCTA decorrelation noise (flow noise, structural bleed-through, floor).
        capillaries: multiplier of the retinal capillary density (fewer, equally thin capillaries below 1; also
            the branching of the large vessel tree).
        gain_spread: per-eye random gain, log-normal with this sigma, drawn separately for OCT and OCTA.
        offset_spread: per-eye random intensity offset, normal with this sigma as a fraction of the 8-bit range.
        tilt_deg: per-eye random tilt of the retina across the B-scan, uniform in ``+-tilt_deg`` degrees (on top of
            the stock per-eye tilt; beyond ~5 degrees a 6 mm scan can push the retina out of the volume).
        artefacts: strength 0..1 of OCTA artefacts: large-vessel flow projected into the deeper layers (in
            proportion to their reflectivity), and horizontal motion lines (``1 + Poisson(3 artefacts)`` B-scans
            per eye whose whole tissue decorrelates).
    """

    contrast: float = 1.0
    size: float = 1.0
    count: float = 1.0
    ma_depth: tuple[float, float] = (0.6, 0.85)
    dr_kind: str = "both"
    speckle: float = 1.0
    decorrelation: float = 1.0
    capillaries: float = 1.0
    gain_spread: float = 0.0
    offset_spread: float = 0.0
    tilt_deg: float = 0.0
    artefacts: float = 0.0

    def __post_init__(self) -> None:
        # Coerce to plain Python numbers: numpy float64 scalars would promote the float32 arrays they multiply.
        for f in dataclasses.fields(self):
            if f.name not in ("ma_depth", "dr_kind"):
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        object.__setattr__(self, "ma_depth", tuple(float(x) for x in self.ma_depth))
        limits = {"contrast": (0.05, 3.0), "size": (0.2, 3.0), "count": (0.1, 5.0), "speckle": (0.0, 4.0),
                  "decorrelation": (0.0, 4.0), "capillaries": (0.1, 2.0), "gain_spread": (0.0, 1.0),
                  "offset_spread": (0.0, 0.5), "tilt_deg": (0.0, 10.0), "artefacts": (0.0, 1.0)}
        for name, (lo, hi) in limits.items():
            if not lo <= getattr(self, name) <= hi:
                raise ConfigError(f"Look.{name}={getattr(self, name)}: must be in [{lo}, {hi}]")
        if len(self.ma_depth) != 2 or not 0.0 <= self.ma_depth[0] <= self.ma_depth[1] <= 1.0:
            raise ConfigError(f"Look.ma_depth={self.ma_depth}: need (lo, hi) with 0 <= lo <= hi <= 1")
        if self.dr_kind not in DR_KINDS:
            raise ConfigError(f"Look.dr_kind={self.dr_kind!r}: choose one of {', '.join(DR_KINDS)}")


#: Named looks (``--synth-look``). Each changes one aspect of stock, strongly enough to matter and gently
#: enough that every disease keeps a visible change inside its mask.
PRESETS: dict[str, Look] = {
    "stock": Look(),
    "faint": Look(contrast=0.5),
    "small": Look(size=0.6, count=0.5),
    "dropout-only": Look(dr_kind="dropout"),
    "microaneurysms-only": Look(dr_kind="microaneurysms"),
    "noisy": Look(speckle=1.8, decorrelation=2.0),
    "drift": Look(gain_spread=0.25, offset_spread=0.04, tilt_deg=4.0),
    "sparse-vessels": Look(capillaries=0.5),
    "artefacts": Look(artefacts=0.8),
}


def look_from_name(name: str) -> Look:
    """The preset ``name`` of :data:`PRESETS`.

    Raises:
        ValueError: (a :class:`~octa3d.errors.ConfigError`) unknown name; the message lists the presets.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown synthetic look {name!r}; choose one of {', '.join(PRESETS)}") from None


def look_record(look: Look) -> dict[str, Any]:
    """What ``synthetic.json`` records of ``look``: the preset's name (None when it is no preset) and every knob."""
    name = next((n for n, p in PRESETS.items() if p == look), None)
    return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(look).items()}}
