"""The PNG review sheets of evidence maps, written for every explained subject: the scan, the map over it and
the central sections, composed as pixels (NumPy + Pillow, :func:`review_sheet`) and written with :func:`save_png`
— an order of magnitude faster than a matplotlib figure.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from octa3d.utils.io import atomic_path

#: Colour map of CAM overlays (high = important = hot).
CAM_CMAP = "jet"


def _scaled(img: np.ndarray) -> np.ndarray:
    """Percentile-stretch an image to 0..1 for display."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    return np.clip((img - lo) / max(float(hi - lo), 1e-6), 0, 1)


# ------------------------------------------------------------------------------------------------ CAM review sheets
# Composed as pixels: NumPy blends the grey scan with the colour-mapped CAM and draws the peak marker, mask outline
# and colour bar; Pillow draws the text (matplotlib's DejaVu Sans) and writes the PNG. A matplotlib version (axes,
# two alpha-blended imshow layers, colorbar, tight bounding box) took ~0.4 s per subject, ~85 % of the whole
# per-volume CAM export; this takes a few tens of milliseconds and looks the same.
_PANEL_H = 360  # panel height in pixels
_GAP, _MARGIN, _BAR = 16, 10, 14  # pixels: between panels, outer margin, colour bar width
_LIME, _WHITE = np.array([0, 255, 0], np.uint8), np.array([255, 255, 255], np.uint8)


@functools.lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    """The CAM colour map as a ``(256, 3)`` float32 table in 0..1."""
    return matplotlib.colormaps[CAM_CMAP](np.linspace(0, 1, 256))[:, :3].astype(np.float32)


@functools.lru_cache(maxsize=2)
def _blend_table(alpha: float) -> np.ndarray:
    """``table[cam, grey]``: the RGB uint8 overlay colour for 8-bit CAM and grey levels: the CAM colour blended
    over the grey with opacity ``alpha * clip(1.5 * cam, 0, 1)`` (cold regions show the scan)."""
    c = np.linspace(0, 1, 256, dtype=np.float32)
    a = (alpha * np.clip(c * 1.5, 0, 1))[:, None, None]
    rgb = (1 - a) * c[None, :, None] + a * _lut()[:, None, :]
    return (rgb * 255 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> Any:
    """Matplotlib's DejaVu Sans at ``size`` pixels for Pillow (Pillow's default font where that fails)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default()


def _fit(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resampling of a 2D array to ``(h, w)`` (display only)."""
    rows = np.minimum(((np.arange(h) + 0.5) * arr.shape[0] / h).astype(np.intp), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * arr.shape[1] / w).astype(np.intp), arr.shape[1] - 1)
    return arr[np.ix_(rows, cols)]


def overlay_panel(image: np.ndarray, cam: np.ndarray, h: int, w: int, peak: Sequence[int] | None = None,
                  mask: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """One CAM overlay as an ``(h, w, 3)`` uint8 RGB image.

    Args:
        image: 2D scan slice or projection (any dtype): percentile-stretched grey.
        cam: same shape, 0..1: blended on top in :data:`CAM_CMAP`, opacity growing with the CAM (cold regions
            show the scan).
        h: output height (pixels; nearest-neighbour resampling).
        w: output width.
        peak: ``(row, col)`` in ``image`` pixels, marked with a white ``+``.
        mask: optional lesion mask (same shape), outlined in lime.
        alpha: opacity of the hottest CAM values.
    """
    grey = (_scaled(image) * 255 + 0.5).astype(np.uint16)
    c = (np.clip(np.asarray(cam, np.float32), 0, 1) * 255 + 0.5).astype(np.uint16)
    # one lookup per pixel in the (cam, grey) -> RGB table, on the resampled 16-bit combined index
    out = np.take(_blend_table(float(alpha)).reshape(-1, 3), _fit((c << 8) | grey, h, w), axis=0)
    if mask is not None and np.any(mask):
        m = np.pad(_fit(np.asarray(mask) > 0, h, w), 1)
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        out[m[1:-1, 1:-1] & ~inner] = _LIME
    if peak is not None:
        y = int((peak[0] + 0.5) * h / image.shape[0])
        x = int((peak[1] + 0.5) * w / image.shape[1])
        arm = max(4, h // 40)
        out[max(0, y - arm):y + arm + 1, max(0, x - 1):x + 1] = _WHITE
        out[max(0, y - 1):y + 1, max(0, x - arm):x + arm + 1] = _WHITE
    return out


def _nice_mm(limit: float) -> float:
    """The longest 1/2/5 x 10^k length (mm) not above ``limit``."""
    steps = [k * 10.0 ** e for e in range(-3, 4) for k in (1, 2, 5)]
    return max([v for v in steps if v <= limit] or [steps[0]])


def _mm_text(v: float) -> str:
    return f"{v:g} mm" if v >= 0.1 else f"{v * 1000:g} µm"


def _scale_bars(draw: Any, x0: int, y0: int, h: int, w: int, extent_mm: tuple[float, float]) -> None:
    """Millimetre scale bars in the lower-left corner of the ``h x w`` panel at ``(x0, y0)`` showing ``extent_mm``
    (height, width): a horizontal bar, and a vertical one where depth is stretched (B-scans)."""
    my, mx = extent_mm[0] / h, extent_mm[1] / w  # mm per pixel
    style = {"fill": "white", "font": _font(11), "stroke_width": 2, "stroke_fill": "black"}
    bx, by, lx = x0 + 10, y0 + h - 10, _nice_mm(0.3 * w * mx)
    px = int(round(lx / mx))
    draw.rectangle([bx, by - 3, bx + px, by], fill="white", outline="black")
    draw.text((bx + px + 5, by - 1), _mm_text(lx), anchor="lm", **style)
    if abs(my / mx - 1) > 0.05:
        ly = _nice_mm(0.3 * h * my)
        py = int(round(ly / my))
        draw.rectangle([bx, by - py, bx + 3, by], fill="white", outline="black")
        draw.text((bx + 7, by - py), _mm_text(ly), anchor="lt", **style)


def review_sheet(panels: Sequence[tuple], title: str, wrap: int = 140) -> np.ndarray:
    """RGB ``panels`` side by side under their titles, a 0..1 CAM colour bar and the wrapped ``title`` on top.

    Args:
        panels: ``(name, (h, w, 3) uint8[, (height, width) in mm])``: with the physical extent shown (not None),
            the panel gets millimetre scale bars; a name may have several lines.
        title: sheet title.
        wrap: characters per title line.

    Returns:
        ``(H, W, 3)`` uint8 RGB image (:func:`save_png` writes it).
    """
    import textwrap

    from PIL import Image, ImageDraw

    big, small = _font(12), _font(11)
    lines = [t for part in title.splitlines() for t in textwrap.fill(part, wrap).splitlines()]
    n_sub = max(p[0].count("\n") + 1 for p in panels)
    top = _MARGIN + 15 * len(lines) + 6 + 13 * n_sub + 4
    h = max(p[1].shape[0] for p in panels)
    width = _MARGIN + sum(p[1].shape[1] + _GAP for p in panels) + _BAR + 46
    canvas = np.full((top + h + _MARGIN, width, 3), 255, np.uint8)
    x, heads = _MARGIN, []
    for name, p, *mm in panels:
        canvas[top:top + p.shape[0], x:x + p.shape[1]] = p
        heads.append((x, p.shape, name, mm[0] if mm else None))
        x += p.shape[1] + _GAP
    canvas[top:top + h, x:x + _BAR] = (_lut()[np.linspace(255, 0, h).astype(np.uint8)] * 255).astype(np.uint8)[:, None]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    draw.multiline_text((width / 2, _MARGIN), "\n".join(lines), fill="black", font=big, anchor="ma", align="center",
                        spacing=3)
    for x0, (ph, pw, _), name, mm in heads:
        draw.multiline_text((x0 + pw / 2, top - 4), name, fill="black", font=small, anchor="md", align="center",
                            spacing=2)
        if mm is not None:
            _scale_bars(draw, x0, top, ph, pw, mm)
    for v in (0.0, 0.5, 1.0):
        draw.text((x + _BAR + 4, top + (1 - v) * (h - 1)), f"{v:g}", fill="black", font=small, anchor="lm")
    label = Image.new("RGB", (h, 14), "white")
    ImageDraw.Draw(label).text((h / 2, 7), "CAM (0..1)", fill="black", font=small, anchor="mm")
    img.paste(label.rotate(90, expand=True), (x + _BAR + 28, top))
    return np.asarray(img)


def save_png(rgb: np.ndarray, path: str | Path, compress_level: int = 1) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG atomically (zlib level 1: review sheets are mostly flat colour, so
    higher levels cost much more time than they save bytes)."""
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(tmp, format="png", compress_level=compress_level)
    return Path(path)


def _box_width(rows: float, cols: float, lo: float = 0.5, hi: float = 2.5) -> int:
    """Panel width for an image of physical size ``rows x cols`` at :data:`_PANEL_H` pixels height."""
    return int(round(_PANEL_H * min(max(cols / max(rows, 1e-9), lo), hi)))


def _section_name(kind: str, channel: str | None, axis: int, index: int, n: int, slice_names: Any) -> str:
    """``"OCTA B-scan 82 of 400 (82.bmp)"``: a slice as the user finds it (the file of a slice folder, counted from
    1; else the 0-based array index and its axis)."""
    what = f"{channel} {kind}" if channel else kind
    if slice_names and axis == 0 and len(slice_names) == n:
        return f"{what} {index + 1} of {n} ({slice_names[index]})"
    if slice_names and axis == 2:  # the columns of the slice files (the fast axis)
        return f"{what} at B-scan column {index} (0-based, of {n})"
    return f"{what} at index {index} (0-based, of {n}; axis {axis})"


def review_figure_3d(volume: np.ndarray, cam: np.ndarray, depth_axis: int, title: str,
                     mask: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                     no_map: str | None = None, channel: str | None = None,
                     slice_names: Sequence[str] | None = None) -> np.ndarray:
    """En-face maximum projection with the CAM overlaid, plus the B-scan and the slow-axis section through the
    CAM peak.

    Of the two lateral axes the first is taken as the slow one, the second as the fast one (the project's ``(slow,
    depth, fast)`` order): a B-scan spans depth x fast axis, the slow-axis section depth x slow axis.

    Args:
        volume: ``(D0, D1, D2)`` scan in source space (one channel; any dtype: only the panels become float).
        cam: same shape, 0..1.
        depth_axis: the A-scan (depth) axis; the en-face view projects along it.
        title: sheet title (subject, true/predicted class, probabilities).
        mask: optional lesion mask (same shape): its outline is drawn in lime.
        spacing: voxel size in mm per array axis (NumPy order), None when the source has none: the en-face aspect
            ratio and millimetre scale bars (sections keep a stretched depth axis, with a vertical bar of its own).
        no_map: why there is no evidence map (an empty/constant map): the sheet says so in its title and shows
            the central slices, with no peak marker, instead of slices "through" a meaningless peak.
        channel: the modality ``volume`` shows (``"OCTA"``), named in the panel titles; None: "scan".
        slice_names: the files of a slice-folder scan along axis 0 (``1.bmp`` …): B-scans are then numbered as
            the files are (OCTA-500: array index 81 is ``82.bmp``), else by 0-based array index.

    Returns:
        An RGB uint8 review sheet (:func:`review_sheet`): en-face, B-scan, slow-axis section (depth vertical),
        colour bar.
    """
    lateral = [a for a in range(3) if a != depth_axis]
    if no_map:
        peak = tuple(s // 2 for s in cam.shape)
        title = f"{title}\nNO EVIDENCE MAP: {no_map}"
    else:
        peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    sp = [1.0, 1.0, 1.0] if spacing is None else [float(v) for v in spacing]
    enface = volume.max(axis=depth_axis)
    w = _box_width(enface.shape[0] * sp[lateral[0]], enface.shape[1] * sp[lateral[1]])
    mm = [None if spacing is None else n * v for n, v in zip(cam.shape, sp)]  # extent along each axis
    if depth_axis != 1:
        slice_names = None  # the files' columns are the fast axis only in (slow, depth, fast) order
    has_mask = mask is not None and bool(np.any(mask))
    name = (f"en-face {channel or 'scan'}: max projection over depth\n+ CAM (max over depth)"
            + ("; lime: lesion mask" if has_mask else ""))
    panels: list[tuple] = [(name, overlay_panel(enface, cam.max(axis=depth_axis), _PANEL_H, w,
                                                None if no_map else (peak[lateral[0]], peak[lateral[1]]),
                                                mask.max(axis=depth_axis) if has_mask else None),
                            None if spacing is None else (mm[lateral[0]], mm[lateral[1]]))]
    for fixed, other, kind in ((lateral[0], lateral[1], "B-scan"), (lateral[1], lateral[0], "slow-axis section")):
        idx: list[Any] = [slice(None)] * 3
        idx[fixed] = peak[fixed]
        sl_img, sl_cam = volume[tuple(idx)], cam[tuple(idx)]
        sl_mask = mask[tuple(idx)] if has_mask else None
        rem = [a for a in range(3) if a != fixed]
        if rem[0] != depth_axis:  # remaining axes in increasing order: transpose so that depth is vertical
            sl_img, sl_cam = sl_img.T, sl_cam.T
            sl_mask = None if sl_mask is None else sl_mask.T
        where = "central (no peak)" if no_map else "through the CAM peak"
        label = _section_name(kind, channel, fixed, int(peak[fixed]), cam.shape[fixed], slice_names)
        panels.append((f"{label}\n{where}",
                       overlay_panel(sl_img, sl_cam, _PANEL_H, int(1.2 * _PANEL_H),
                                     None if no_map else (peak[depth_axis], peak[other]), sl_mask),
                       None if spacing is None else (mm[depth_axis], mm[other])))
    return review_sheet(panels, title, 140)


def review_figure_2d(image: np.ndarray, cam: np.ndarray, title: str, mask: np.ndarray | None = None,
                     no_map: str | None = None, spacing: Sequence[float] | None = None,
                     channel: str | None = None) -> np.ndarray:
    """A 2D image beside the same image with its CAM overlaid.

    Args:
        image: ``(H, W)`` source image (or projection).
        cam: same shape, 0..1.
        title: sheet title.
        mask: optional lesion mask (same shape), outlined in lime.
        no_map: why there is no evidence map (then no peak marker and the title says so).
        spacing: physical pixel size in mm (NumPy order), or None: aspect ratio and millimetre scale bars.
        channel: what the image shows (``"OCTA(FULL)"``), named in the panel titles.

    Returns:
        An RGB uint8 review sheet (:func:`review_sheet`).
    """
    peak = None if no_map else np.unravel_index(int(np.argmax(cam)), cam.shape)
    if no_map:
        title = f"{title}\nNO EVIDENCE MAP: {no_map}"
    sp = (1.0, 1.0) if spacing is None else tuple(float(v) for v in spacing)
    w = _box_width(image.shape[0] * sp[0], image.shape[1] * sp[1])
    scale = None if spacing is None else (image.shape[0] * sp[0], image.shape[1] * sp[1])
    what = channel or "input"
    panels = [(what, overlay_panel(image, np.zeros(image.shape, np.float32), _PANEL_H, w), scale),
              (f"{what} + CAM", overlay_panel(image, cam, _PANEL_H, w,
                                              None if peak is None else (int(peak[0]), int(peak[1])), mask), scale)]
    return review_sheet(panels, title, 100)


def central_slices(cam: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """Central slices of a 3D CAM (each axis) or a 2D CAM, side by side as an ``(3, H, W)`` RGB image in 0..1
    for TensorBoard; the grey scan (if given) is blended underneath."""
    cmap = matplotlib.colormaps[CAM_CMAP]

    def rgb(c: np.ndarray, img: np.ndarray | None) -> np.ndarray:
        col = cmap(np.clip(c, 0, 1))[..., :3]
        if img is None:
            return col
        g = _scaled(img)[..., None]
        a = 0.6 * np.clip(c, 0, 1)[..., None]
        return (1 - a) * g + a * col

    if cam.ndim == 2:
        tiles = [rgb(cam, image)]
    else:
        tiles = []
        for ax in range(3):
            idx = [slice(None)] * 3
            idx[ax] = cam.shape[ax] // 2
            tiles.append(rgb(cam[tuple(idx)], None if image is None else image[tuple(idx)]))
    h = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, h - t.shape[0]), (0, 1), (0, 0))) for t in tiles]
    return np.concatenate(padded, axis=1).transpose(2, 0, 1).astype(np.float32)
