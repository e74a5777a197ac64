"""Drawing of the findings on a thorax density map.

Each finding has one drawing function ``draw_<finding>(rng, density, anatomy, plan)``. It adds
(or removes) density in place and returns :class:`~bench.data.synth.case.Lesion` records whose
``mask`` is exactly the set of pixels whose density it changed: every drawing function computes
a change map that is non-zero on the mask and exactly zero off it. The mask is the ground truth
of segmentation and detection tasks, so it must not be approximated from pixel statistics.

Contrast scales with severity and every change is made *before* exposure and film noise
(:func:`bench.data.synth.anatomy.render`), so faint lesions are partly hidden by noise, ribs and
overlapping structures; the learnability check (``learnability.py``) keeps that balance honest.

Placement is decided up front by :func:`plan_finding` (zones, severity, device or object kinds), so
the report writer describes the plan that was drawn, never the pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from bench.data.shapes import mask_bounding_box, rasterize
from bench.data.synth.anatomy import (
    CARINA_Y, DIAPHRAGM_EDGE, HEART_OVER_LUNG, SIDES, Anatomy, diaphragm_level, lowres_noise,
)
from bench.data.synth.case import FINDINGS, Lesion, Shape

SEVERITIES: tuple[str, str, str] = ("mild", "moderate", "severe")
_LEVEL = {"mild": 0, "moderate": 1, "severe": 2}

#: Devices that ``support_devices`` can draw (endotracheal tube, right internal jugular and left
#: subclavian central lines, enteric tube, ECG leads); ``reports.py`` names them.
DEVICE_KINDS: tuple[str, ...] = ("ett", "rij_line", "lsc_line", "ng_tube", "ecg_leads")
#: Object-CXR foreign objects: name -> annotation shape kind.
FOREIGN_OBJECT_KINDS: dict[str, str] = {
    "button": "ellipse", "coin": "ellipse", "ring": "ellipse",
    "clip": "rectangle", "snap": "rectangle",
    "wire": "polygon", "pendant": "polygon",
}


@dataclass(frozen=True)
class FindingPlan:
    """What will be drawn for one finding: the report is written from this, not from pixels."""

    finding: str
    severity: str              # "mild" | "moderate" | "severe"
    zones: tuple[str, ...]     # one entry per lesion (ZONES names, "bilateral", "mediastinum", ...)
    kinds: tuple[str, ...] = ()  # device kinds (support_devices) or object kinds (foreign_object)

    @property
    def sides(self) -> tuple[str, ...]:
        """Patient sides the plan touches, in SIDES order ("right", "left")."""
        if "bilateral" in self.zones:
            return SIDES
        return tuple(s for s in SIDES if any(z.startswith(s) for z in self.zones))


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

#: Relative frequency of lung levels (upper, middle, lower) for localised findings.
_LEVEL_WEIGHTS = {
    "consolidation": (0.2, 0.3, 0.5),
    "atelectasis": (0.05, 0.3, 0.65),
    "nodule": (0.45, 0.35, 0.2),   # upper-lobe predominance of lung cancer
    "mass": (0.55, 0.3, 0.15),
    "infiltration": (0.3, 0.35, 0.35),
    "pleural_thickening": (0.6, 0.2, 0.2),
}


def _zone(rng: np.random.Generator, finding: str) -> str:
    """A random lung zone: either side, level by the finding's typical distribution."""
    side = SIDES[int(rng.integers(2))]
    weights = np.asarray(_LEVEL_WEIGHTS[finding])
    level = ("upper", "middle", "lower")[int(rng.choice(3, p=weights / weights.sum()))]
    return f"{side} {level}"


def plan_finding(rng: np.random.Generator, finding: str, severity: str, count: int = 1) -> FindingPlan:
    """Choose where (and, for devices and objects, what) to draw; ``count`` lesions where the
    finding can be multiple (nodules, consolidations, foreign objects)."""
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}")
    count = max(1, int(count))
    if finding in ("consolidation", "infiltration", "nodule"):
        zones = tuple(dict.fromkeys(_zone(rng, finding) for _ in range(count)))
    elif finding == "atelectasis":  # often bibasilar
        zones = ("right lower", "left lower") if rng.random() < 0.35 else (_zone(rng, finding),)
    elif finding == "mass":
        zones = (_zone(rng, finding),)
    elif finding == "pleural_thickening":
        zones = (_zone(rng, finding),) if rng.random() < 0.7 else ("right upper", "left upper")
    elif finding == "effusion":
        r = rng.random()
        zones = ("right lower", "left lower") if r < 0.3 else (("right lower",) if r < 0.65 else ("left lower",))
    elif finding == "pneumothorax":
        zones = (f"{SIDES[int(rng.integers(2))]} upper",)
    elif finding in ("cardiomegaly", "hernia"):
        zones = ("mediastinum",)
    elif finding in ("edema", "covid", "emphysema", "fibrosis"):
        zones = ("bilateral",)
    elif finding == "support_devices":
        n = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
        kinds = tuple(sorted(rng.choice(len(DEVICE_KINDS), size=n, replace=False,
                                        p=[0.3, 0.2, 0.1, 0.15, 0.25])))
        return FindingPlan(finding, severity, ("chest wall",) * n, tuple(DEVICE_KINDS[k] for k in kinds))
    elif finding == "foreign_object":
        names = list(FOREIGN_OBJECT_KINDS)
        kinds = tuple(names[int(rng.integers(len(names)))] for _ in range(count))
        return FindingPlan(finding, severity, ("chest wall",) * count, kinds)
    else:  # pragma: no cover - FINDINGS and this table are kept in step by the tests
        raise ValueError(finding)
    return FindingPlan(finding, severity, zones)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _lesion(finding: str, zone: str, mask: np.ndarray, shape: Shape | None = None) -> Lesion:
    """A Lesion whose box is derived from its mask (raises on an empty mask)."""
    return Lesion(finding=finding, zone=zone, box=mask_bounding_box(mask), mask=mask, shape=shape)


def _apply(density: np.ndarray, delta: np.ndarray, mask: np.ndarray, window=None) -> np.ndarray:
    """Add ``delta`` on ``mask`` (both local to ``window``); return the full-size mask.

    The change map must be non-zero on the whole mask: that is what makes the mask exact.
    """
    if window is None:
        window = (slice(None), slice(None))
    region = density[window]
    before = region[mask]
    after = before + delta[mask]
    if not np.all(after != before):
        raise AssertionError("a lesion mask contains pixels its drawing leaves unchanged")
    region[mask] = after
    full = np.zeros(density.shape, dtype=bool)
    full[window] = mask
    return full


@dataclass(frozen=True)
class _Window:
    """A rectangular piece of the image, with pixel-centre coordinates, so that small lesions
    cost in proportion to their size rather than to the image."""

    rows: slice
    cols: slice
    x: np.ndarray  # float32 [1, w] pixel x
    y: np.ndarray  # float32 [h, 1] pixel y

    @property
    def index(self) -> tuple[slice, slice]:
        return self.rows, self.cols

    @staticmethod
    def around(anatomy: Anatomy, cx: float, cy: float, rx: float, ry: float) -> _Window:
        y0, y1 = max(0, int(math.floor(cy - ry)) - 1), min(anatomy.height, int(math.ceil(cy + ry)) + 2)
        x0, x1 = max(0, int(math.floor(cx - rx)) - 1), min(anatomy.width, int(math.ceil(cx + rx)) + 2)
        return _Window(slice(y0, y1), slice(x0, x1),
                       np.arange(x0, x1, dtype=np.float32)[None, :],
                       np.arange(y0, y1, dtype=np.float32)[:, None])


def _pick_point(rng: np.random.Generator, mask: np.ndarray, pull: float = 0.35) -> tuple[int, int]:
    """A pixel of ``mask`` (x, y), pulled towards the mask centroid so that a lesion does not sit
    on the very edge of its zone. The returned pixel is always inside the mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot place a lesion in an empty region")
    i = int(rng.integers(len(xs)))
    tx = xs[i] + pull * (xs.mean() - xs[i])
    ty = ys[i] + pull * (ys.mean() - ys[i])
    j = int(np.argmin((xs - tx) ** 2 + (ys - ty) ** 2))
    return int(xs[j]), int(ys[j])


def _zone_mask(anatomy: Anatomy, zone: str) -> np.ndarray:
    mask = anatomy.zones.get(zone)
    if mask is None or not mask.any():  # a tiny or odd canvas: fall back to the whole lung
        mask = anatomy.lungs[zone.split()[0]]
    return mask


def _side_of(zone: str) -> str:
    return zone.split()[0]


def _jitter(rng: np.random.Generator, severity: str, values: tuple[float, float, float], spread: float = 0.15) -> float:
    """The severity's nominal value, varied by +-``spread`` (relative)."""
    return float(values[_LEVEL[severity]] * rng.uniform(1 - spread, 1 + spread))


def _touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels of ``a`` with a 4-neighbour in ``b``."""
    near = np.zeros_like(a)
    near[1:, :] |= b[:-1, :]
    near[:-1, :] |= b[1:, :]
    near[:, 1:] |= b[:, :-1]
    near[:, :-1] |= b[:, 1:]
    return a & near


def _blob_field(rng, win: _Window, cx, cy, radius, n_blobs: int, elongation: float = 1.6) -> np.ndarray:
    """Sum of randomly placed anisotropic gaussians around (cx, cy): a lumpy airspace shape."""
    field = np.zeros((win.y.shape[0], win.x.shape[1]), dtype=np.float32)
    for _ in range(n_blobs):
        bx = cx + rng.normal(0, 0.45) * radius
        by = cy + rng.normal(0, 0.45) * radius
        sx = radius * rng.uniform(0.45, 0.8)
        sy = sx * rng.uniform(1 / elongation, elongation)
        field += np.exp(-(((win.x - bx) / sx) ** 2 + ((win.y - by) / sy) ** 2)).astype(np.float32)
    return field


# ---------------------------------------------------------------------------------------------
# Structural findings (change the anatomy; drawn first)
# ---------------------------------------------------------------------------------------------

def draw_emphysema(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Hyperinflation: flattened, lowered hemidiaphragms (the lungs grow downwards into what was
    abdomen), hyperlucent lungs with attenuated vascular markings. Mask = the enlarged lungs.

    The new lung base continues each column's own lung density (sampled just above the old,
    blurred diaphragm edge), so no trace of the old dome is left.
    """
    sev = plan.severity
    flatten = _jitter(rng, sev, (0.35, 0.55, 0.75))     # fraction of dome height lost
    lower = _jitter(rng, sev, (0.03, 0.05, 0.08))       # thorax units
    lucency = _jitter(rng, sev, (0.035, 0.055, 0.08))
    new = {s: (b + lower, h * (1 - flatten), c, w) for s, (b, h, c, w) in anatomy.diaphragm.items()}
    old_level, new_level = anatomy.diaphragm_level(), diaphragm_level(anatomy.X, new)
    H, W = density.shape
    rows = np.arange(H)[:, None]
    cols = np.arange(W)
    margin = int(math.ceil(2 * anatomy.exposure.blur)) + 1
    soft_base = np.clip((new_level - anatomy.Y) / DIAPHRAGM_EDGE, 0.05, 1)
    solid = anatomy.heart | anatomy.mediastinum | ~anatomy.body
    lungs = {}
    delta = np.zeros(density.shape, dtype=np.float32)
    for side in SIDES:
        lung = anatomy.lungs[side]
        has = lung.any(axis=0)
        bottom = np.where(has, H - 1 - np.argmax(lung[::-1, :], axis=0), 0)
        # only columns whose lung reaches the diaphragm (not those ending on the heart)
        touches = has & (old_level[bottom, cols] - anatomy.Y[bottom, cols] < 0.03)
        ref_row = np.clip(bottom - margin - 1, 0, H - 1)
        reference = density[ref_row, cols][None, :]
        band = touches[None, :] & (rows > (bottom - margin)[None, :]) & (anatomy.Y < new_level) & ~solid
        band &= lung | (rows > bottom[None, :])
        lungs[side] = lung | band
        delta[lung] = -lucency - 0.5 * anatomy.markings[lung]
        fill = ((reference - density) * soft_base - lucency)[band]
        delta[band] = np.where(fill < -1e-4, fill, -lucency)
    full = lungs["right"] | lungs["left"]
    density[full] += delta[full]
    anatomy.diaphragm = new
    anatomy.set_lungs(lungs["right"], lungs["left"])
    anatomy.markings = anatomy.markings * 0.5
    return [_lesion("emphysema", "bilateral", full)]


def draw_cardiomegaly(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Enlarged cardiac silhouette (mostly to the left). Mask = the whole enlarged heart, which is
    drawn denser than before everywhere (by a little where it was already heart)."""
    factor = 1 + _jitter(rng, plan.severity, (0.09, 0.15, 0.22), spread=0.2)
    geometry = anatomy.heart_geometry.scaled(factor, shift=0.02 * (factor - 1))
    r = geometry.radius(anatomy.X, anatomy.Y)
    above_diaphragm = anatomy.Y < anatomy.diaphragm_level()
    mask = (r < 1) & (above_diaphragm | anatomy.heart) & anatomy.body
    edge = np.clip((1 - r) / 0.04, 0.03, 1)  # soft outer border
    # how much aerated lung each pixel shows, with the anatomy's own blur, so the new border
    # meets the old silhouette without a seam
    aerated = ndimage.gaussian_filter(anatomy.lung.astype(np.float32), anatomy.exposure.blur)
    delta = np.maximum(HEART_OVER_LUNG * edge * aerated - anatomy.markings, 0.015).astype(np.float32)
    full = _apply(density, delta, mask)
    anatomy.heart = anatomy.heart | full
    anatomy.heart_geometry = geometry
    anatomy.markings = np.where(full, 0, anatomy.markings).astype(np.float32)
    anatomy.set_lungs(anatomy.lungs["right"] & ~full, anatomy.lungs["left"] & ~full)
    return [_lesion("cardiomegaly", "mediastinum", full)]


# ---------------------------------------------------------------------------------------------
# Pleural findings
# ---------------------------------------------------------------------------------------------

def draw_effusion(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Pleural fluid in the dependent lung: a meniscus rising along the lateral wall, blunting the
    costophrenic angle; hazy at its upper edge, denser towards the base. One lesion per side."""
    lesions = []
    ys = np.arange(anatomy.height, dtype=np.float32)[:, None]
    xs = np.arange(anatomy.width, dtype=np.float32)[None, :]
    for zone in plan.zones:
        side = _side_of(zone)
        lung = anatomy.lungs[side]
        present, medial, lateral = anatomy.row_extent(side)
        rows = np.flatnonzero(present)
        if len(rows) == 0:
            continue
        height = float(rows[-1] - rows[0] + 1)
        y_cp = anatomy.costophrenic[side][1]
        level = _jitter(rng, plan.severity, (0.09, 0.22, 0.40), spread=0.2)
        meniscus = 0.05 + 0.25 * level
        amp = _jitter(rng, plan.severity, (0.16, 0.22, 0.28))
        span = np.where(lateral != medial, lateral - medial, 1).astype(np.float32)[:, None]
        lat = np.clip((xs - medial[:, None]) / span, 0, 1)  # 0 medial .. 1 at the chest wall
        # deepest laterally, in the costophrenic sulcus; the meniscus climbs the chest wall
        fluid_top = y_cp - level * height * (0.35 + 0.65 * lat) - meniscus * height * lat ** 2
        ramp = 0.10 * height + 1
        mask = lung & (ys > fluid_top)
        depth = np.clip((ys - fluid_top) / ramp, 0, 1)
        delta = (amp * np.maximum(depth, 0.03) ** 0.8 - anatomy.markings * depth).astype(np.float32)
        delta = np.where(delta > 0, delta, 0.005)
        if not mask.any():  # tiny canvas: at least the costophrenic angle itself
            mask = np.zeros_like(lung)
            mask[int(y_cp), int(anatomy.costophrenic[side][0])] = True
        lesions.append(_lesion("effusion", zone, _apply(density, delta, mask)))
    return lesions


def draw_pneumothorax(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Collapsed lung pulled towards the hilum: a lucent apical/lateral rim without vascular
    markings, bounded by a thin bright visceral pleural line. Mask = the pneumothorax space
    (whose innermost pixel layer is the pleural line)."""
    zone = plan.zones[0]
    side = _side_of(zone)
    lung = anatomy.lungs[side]
    ys, xs = np.nonzero(lung)
    if len(xs) == 0:
        return []
    keep = _jitter(rng, plan.severity, (0.88, 0.78, 0.64), spread=0.04)
    # anchor at the medial base: the apex and the lateral wall move the most, the mediastinal
    # border and the diaphragm hardly (an upright film's air collects apically and laterally)
    ax = float(np.percentile(xs, 98 if side == "right" else 2))
    ay = float(np.percentile(ys, 98))
    H, W = lung.shape
    src_y = np.clip(np.round(ay + (np.arange(H) - ay) / keep), 0, H - 1).astype(np.intp)
    src_x = np.clip(np.round(ax + (np.arange(W) - ax) / keep), 0, W - 1).astype(np.intp)
    collapsed = lung[src_y[:, None], src_x[None, :]] & lung
    space = lung & ~collapsed
    if not space.any():  # a minimal rim at the apex
        space = np.zeros_like(lung)
        space[ys.min(), xs[ys == ys.min()]] = True
    line = _touching(space, collapsed)
    lucency = _jitter(rng, plan.severity, (0.07, 0.09, 0.11))
    delta = np.where(line, 0.10, -lucency - anatomy.markings).astype(np.float32)
    full = _apply(density, delta, space)
    anatomy.markings = np.where(full, 0, anatomy.markings).astype(np.float32)
    return [_lesion("pneumothorax", zone, full)]


def draw_pleural_thickening(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """A band of soft tissue along the inner chest wall: an apical cap in the upper zone, a
    lateral rind lower down."""
    lesions = []
    for zone in plan.zones:
        side, level = zone.split()
        zmask = _zone_mask(anatomy, zone)
        width = max(1.5, _jitter(rng, plan.severity, (0.014, 0.022, 0.032), spread=0.25) * anatomy.scale)
        amp = _jitter(rng, plan.severity, (0.11, 0.16, 0.21))
        present, medial, lateral = anatomy.row_extent(side)
        xs = np.arange(anatomy.width, dtype=np.float32)[None, :]
        dist = np.abs(xs - lateral[:, None].astype(np.float32))
        if level == "upper":  # apical cap: distance from the top of the lung in each column
            lung = anatomy.lungs[side]
            top = np.where(lung.any(axis=0), np.argmax(lung, axis=0), anatomy.height)
            ys = np.arange(anatomy.height, dtype=np.float32)[:, None]
            dist = np.minimum(dist, np.abs(ys - top[None, :].astype(np.float32)))
        mask = zmask & (dist < width)
        if not mask.any():
            continue
        delta = (amp * (1 - 0.6 * dist / width)).astype(np.float32)
        lesions.append(_lesion("pleural_thickening", zone, _apply(density, delta, mask)))
    return lesions


# ---------------------------------------------------------------------------------------------
# Parenchymal opacities
# ---------------------------------------------------------------------------------------------

def draw_consolidation(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Lobar/segmental airspace opacity confined to its lung, lumpy, with darker branching air
    bronchograms inside. One lesion per zone."""
    lesions = []
    for zone in plan.zones:
        side = _side_of(zone)
        cx, cy = _pick_point(rng, _zone_mask(anatomy, zone))
        radius = _jitter(rng, plan.severity, (0.07, 0.10, 0.14), spread=0.2) * anatomy.scale
        amp = _jitter(rng, plan.severity, (0.12, 0.17, 0.22), spread=0.2)
        win = _Window.around(anatomy, cx, cy, 2.2 * radius, 2.2 * radius)
        field = _blob_field(rng, win, cx, cy, radius, int(rng.integers(3, 6)))
        field *= 1 + 0.3 * lowres_noise(rng, field.shape, 6)
        threshold = 0.25
        mask = (field > threshold) & anatomy.lungs[side][win.index]
        mask[cy - win.rows.start, cx - win.cols.start] = anatomy.lungs[side][cy, cx]
        ramp = np.clip((field - threshold) / 0.6, 0, 1)
        body = np.maximum(ramp * ramp * (3 - 2 * ramp), 0.01)  # smoothstep: ill-defined margins
        hx, hy = anatomy.hilum[side]
        phi = np.arctan2(win.y - hy, win.x - hx)
        fragments = np.clip(lowres_noise(rng, field.shape, 5), 0, 1)
        bronchi = np.clip(np.cos(rng.uniform(14, 24) * phi + rng.uniform(0, 6.3)), 0, 1) ** 60 * fragments
        delta = (amp * body * (1 - 0.5 * bronchi * body)).astype(np.float32)
        if mask.any():
            lesions.append(_lesion("consolidation", zone, _apply(density, delta, mask, win.index)))
    return lesions


def draw_infiltration(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Ill-defined, patchy, faint opacity: several small soft blobs scattered in the zone."""
    lesions = []
    for zone in plan.zones:
        side = _side_of(zone)
        cx, cy = _pick_point(rng, _zone_mask(anatomy, zone))
        spread = _jitter(rng, plan.severity, (0.07, 0.10, 0.13)) * anatomy.scale
        amp = _jitter(rng, plan.severity, (0.07, 0.10, 0.13), spread=0.2)
        win = _Window.around(anatomy, cx, cy, 1.8 * spread, 1.8 * spread)
        field = np.zeros((win.y.shape[0], win.x.shape[1]), dtype=np.float32)
        for _ in range(int(rng.integers(5, 10))):
            bx, by = cx + rng.normal(0, 0.6) * spread, cy + rng.normal(0, 0.6) * spread
            s = spread * rng.uniform(0.18, 0.32)
            field += rng.uniform(0.6, 1.0) * np.exp(-(((win.x - bx) / s) ** 2 + ((win.y - by) / s) ** 2))
        field *= 1 + 0.4 * lowres_noise(rng, field.shape, 8)
        threshold = 0.25
        mask = (field > threshold) & anatomy.lungs[side][win.index]
        delta = (amp * np.clip((field - threshold) / 0.6, 0.05, 1)).astype(np.float32)
        if mask.any():
            lesions.append(_lesion("infiltration", zone, _apply(density, delta, mask, win.index)))
    return lesions


def draw_atelectasis(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Atelectasis by severity: plate-like (discoid) bands when mild; segmental (moderate) or
    lobar (severe) collapse of a lower lobe otherwise: a dense medial wedge from the hilum to the
    diaphragm, partly behind the heart, whose sharp lateral edge is the displaced fissure (the
    "sail" sign). Upper-zone atelectasis is always plate-like. One lesion per zone (bibasilar
    atelectasis has two)."""
    lesions = []
    for zone in plan.zones:
        lesion = None
        if plan.severity != "mild" and not zone.endswith("upper"):
            lesion = _lobar_collapse(rng, density, anatomy, zone, plan.severity)
        if lesion is None:
            lesion = _plate(rng, density, anatomy, zone, plan.severity)
        if lesion is not None:
            lesions.append(lesion)
    return lesions


def _plate(rng, density, anatomy: Anatomy, zone: str, severity: str) -> Lesion | None:
    """A thin, slightly curved, near-horizontal band."""
    side = _side_of(zone)
    cx, cy = _pick_point(rng, _zone_mask(anatomy, zone), pull=0.5)
    length = _jitter(rng, severity, (0.12, 0.17, 0.22), spread=0.2) * anatomy.scale
    thick = max(1.2, _jitter(rng, severity, (0.02, 0.035, 0.05), spread=0.2) * anatomy.scale)
    amp = _jitter(rng, severity, (0.17, 0.21, 0.25))
    angle = math.radians(rng.normal(0, 14) + (8 if side == "right" else -8))
    win = _Window.around(anatomy, cx, cy, length + 2, length + 2)
    c, s = math.cos(angle), math.sin(angle)
    u = (win.x - cx) * c + (win.y - cy) * s
    v = -(win.x - cx) * s + (win.y - cy) * c
    v = v - 0.45 * (u / length) ** 2 * thick * rng.choice([-1, 1])  # slightly curved plate
    r = (u / length) ** 2 + (v / thick) ** 2
    mask = (r < 1) & anatomy.lungs[side][win.index]
    mask[cy - win.rows.start, cx - win.cols.start] = anatomy.lungs[side][cy, cx]
    delta = (amp * np.clip(1 - r, 0.1, 1) ** 0.5).astype(np.float32)
    if not mask.any():
        return None
    return _lesion("atelectasis", zone, _apply(density, delta, mask, win.index))


def _lobar_collapse(rng, density, anatomy: Anatomy, zone: str, severity: str) -> Lesion | None:
    """Lung and retrocardiac region medial to a line from the hilum to the diaphragm."""
    side = _side_of(zone)
    lung = anatomy.lungs[side]
    hx, hy = anatomy.hilum[side]
    present, medial, lateral = anatomy.row_extent(side)
    rows = np.flatnonzero(present)
    if len(rows) < 4:
        return None
    ref = rows[int(0.85 * (len(rows) - 1))]
    # where the fissure meets the diaphragm, medial (0) to lateral (1): further out when lobar
    t = rng.uniform(0.3, 0.55) if severity == "severe" else rng.uniform(0.12, 0.3)
    fx, fy = medial[ref] + t * (lateral[ref] - medial[ref]), float(rows[-1])
    ys = np.arange(anatomy.height, dtype=np.float32)[:, None]
    xs = np.arange(anatomy.width, dtype=np.float32)[None, :]
    nx, ny = fy - hy, -(fx - hx)  # normal of the hilum-diaphragm line
    norm = math.hypot(nx, ny) or 1.0
    dist = ((xs - hx) * nx + (ys - hy) * ny) / norm
    mid_x, mid_y = anatomy.frame.to_pixel(0.0, 0.3)  # a point on the midline, surely medial
    if (float(mid_x) - hx) * nx + (float(mid_y) - hy) * ny < 0:
        dist = -dist  # positive on the medial side
    on_side = (anatomy.X < 0) if side == "right" else (anatomy.X >= 0)
    region = (lung | anatomy.heart) & on_side & (anatomy.Y < anatomy.diaphragm_level())
    mask = region & (ys > hy) & (dist > 0)
    if not mask.any():
        return None
    amp = _jitter(rng, severity, (0.14, 0.17, 0.22))
    edge = max(1.0, 0.01 * anatomy.scale)
    fade = np.where(lung, 1.0, 0.6)  # seen through the heart it adds less contrast
    delta = (amp * fade * np.clip(dist / edge, 0.3, 1) - anatomy.markings).astype(np.float32)
    delta = np.where(delta > 0, delta, 0.01)
    return _lesion("atelectasis", zone, _apply(density, delta, mask))


def _round_opacity(rng, density, anatomy: Anatomy, finding: str, zone: str, radius: float, amp: float,
                   lobulation: float) -> Lesion | None:
    """A round (optionally lobulated) opacity with a spherical density profile."""
    side = _side_of(zone)
    cx, cy = _pick_point(rng, _zone_mask(anatomy, zone), pull=0.4)
    win = _Window.around(anatomy, cx, cy, 1.4 * radius, 1.4 * radius)
    dx, dy = win.x - cx, win.y - cy
    theta = np.arctan2(dy, dx)
    edge = radius * (1 + lobulation * (np.cos(3 * theta + rng.uniform(0, 6.3)) * 0.6
                                       + np.cos(5 * theta + rng.uniform(0, 6.3)) * 0.4))
    rr = np.sqrt(dx * dx + dy * dy) / edge
    mask = (rr < 1) & anatomy.lungs[side][win.index]
    if not mask.any():
        return None
    delta = (amp * np.sqrt(np.clip(1 - rr * rr, 0.02, 1))).astype(np.float32)
    return _lesion(finding, zone, _apply(density, delta, mask, win.index))


def draw_nodule(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Small well-defined round opacity (< 3 cm); several for a multi-zone plan."""
    lesions = []
    for zone in plan.zones:
        radius = max(1.6, _jitter(rng, plan.severity, (0.02, 0.028, 0.036), spread=0.2) * anatomy.scale)
        amp = _jitter(rng, plan.severity, (0.22, 0.28, 0.34), spread=0.15)
        lesion = _round_opacity(rng, density, anatomy, "nodule", zone, radius, amp, 0.05)
        if lesion is not None:
            lesions.append(lesion)
    return lesions


def draw_mass(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Large, lobulated round opacity (> 3 cm)."""
    radius = _jitter(rng, plan.severity, (0.09, 0.12, 0.15), spread=0.2) * anatomy.scale
    amp = _jitter(rng, plan.severity, (0.24, 0.30, 0.36), spread=0.15)
    lesion = _round_opacity(rng, density, anatomy, "mass", plan.zones[0], radius, amp, 0.12)
    return [lesion] if lesion is not None else []


def _peripheral_basal_weight(anatomy: Anatomy, side: str) -> np.ndarray:
    """0..1 per pixel of one lung: 1 at the lateral wall and the base, 0 medially and apically."""
    lung = anatomy.lungs[side]
    present, medial, lateral = anatomy.row_extent(side)
    rows = np.flatnonzero(present)
    if len(rows) == 0:
        return np.zeros(lung.shape, dtype=np.float32)
    xs = np.arange(anatomy.width, dtype=np.float32)[None, :]
    span = np.maximum(np.abs(lateral - medial), 1).astype(np.float32)[:, None]
    periphery = np.clip(1 - np.abs(xs - lateral[:, None]) / span, 0, 1)
    ys = np.arange(anatomy.height, dtype=np.float32)[:, None]
    basal = np.clip((ys - rows[0]) / max(rows[-1] - rows[0], 1), 0, 1)
    return (periphery * basal * lung).astype(np.float32)


def draw_covid(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Bilateral, peripheral, lower-zone predominant ground-glass opacity: faint, patchy, and the
    vessels stay visible through it."""
    amp = _jitter(rng, plan.severity, (0.07, 0.11, 0.15), spread=0.2)
    extent = _jitter(rng, plan.severity, (0.38, 0.26, 0.16), spread=0.1)  # threshold: lower = wider
    patches = lowres_noise(rng, density.shape, 9)
    mask = np.zeros(density.shape, dtype=bool)
    delta = np.zeros(density.shape, dtype=np.float32)
    for side in SIDES:
        weight = _peripheral_basal_weight(anatomy, side) ** 0.7
        field = weight * (0.75 + 0.45 * patches)
        m = anatomy.lungs[side] & (field > extent)
        mask |= m
        delta = np.where(m, amp * np.clip((field - extent) / 0.3, 0.15, 1), delta)
    if not mask.any():
        return []
    return [_lesion("covid", "bilateral", _apply(density, delta.astype(np.float32), mask))]


def draw_edema(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Bilateral perihilar ("bat wing") haze with indistinct vessels; septal (Kerley B) lines at
    the lateral bases when moderate or severe."""
    sev = plan.severity
    amp = _jitter(rng, sev, (0.04, 0.06, 0.085), spread=0.2)
    reach = _jitter(rng, sev, (0.16, 0.20, 0.26), spread=0.15) * anatomy.scale
    xs = np.arange(anatomy.width, dtype=np.float32)[None, :]
    ys = np.arange(anatomy.height, dtype=np.float32)[:, None]
    haze = np.zeros(density.shape, dtype=np.float32)
    for side in SIDES:
        hx, hy = anatomy.hilum[side]
        d2 = ((xs - hx) / (1.3 * reach)) ** 2 + ((ys - hy - 0.1 * reach) / reach) ** 2
        haze = np.maximum(haze, np.exp(-d2) * anatomy.lungs[side])
    haze *= 1 + 0.25 * lowres_noise(rng, density.shape, 10)
    if sev != "mild":
        spacing = max(3.0, 0.03 * anatomy.scale)
        lines = np.cos(np.pi * ys / spacing) ** 16
        for side in SIDES:
            haze += 0.5 * lines * _peripheral_basal_weight(anatomy, side) ** 3
    threshold = 0.12
    mask = anatomy.lung & (haze > threshold)
    delta = (amp * np.clip(haze, threshold, 1.2)).astype(np.float32)
    if not mask.any():
        return []
    return [_lesion("edema", "bilateral", _apply(density, delta, mask))]


def draw_fibrosis(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Reticular (net-like) opacities, peripheral and basal, with a faint background haze."""
    amp = _jitter(rng, plan.severity, (0.07, 0.10, 0.14), spread=0.2)
    period = max(2.5, 0.028 * anatomy.scale)
    xs = np.arange(anatomy.width, dtype=np.float32)[None, :]
    ys = np.arange(anatomy.height, dtype=np.float32)[:, None]
    warp = 2.0 * lowres_noise(rng, density.shape, 14)
    net = np.zeros(density.shape, dtype=np.float32)
    for angle in (rng.uniform(0, np.pi / 3), rng.uniform(np.pi / 3, 2 * np.pi / 3), rng.uniform(2 * np.pi / 3, np.pi)):
        u = xs * math.cos(angle) + ys * math.sin(angle)
        net = np.maximum(net, np.cos(np.pi * u / period + warp) ** 8)
    weight = np.maximum(_peripheral_basal_weight(anatomy, "right"), _peripheral_basal_weight(anatomy, "left"))
    threshold = _jitter(rng, plan.severity, (0.45, 0.35, 0.25), spread=0.1)
    mask = anatomy.lung & (weight > threshold)
    delta = (amp * weight * (0.35 + net)).astype(np.float32)
    if not mask.any():
        return []
    return [_lesion("fibrosis", "bilateral", _apply(density, delta, mask))]


# ---------------------------------------------------------------------------------------------
# Mediastinal
# ---------------------------------------------------------------------------------------------

def draw_hernia(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Hiatal hernia: a round retrocardiac gas collection with an air-fluid level and a thin wall."""
    g = anatomy.heart_geometry
    px, py = anatomy.frame.to_pixel(g.cx - 0.02 + rng.normal(0, 0.02), g.cy - 0.02 + rng.normal(0, 0.02))
    cx, cy = float(px), float(py)
    radius = _jitter(rng, plan.severity, (0.045, 0.06, 0.075), spread=0.2) * anatomy.scale
    win = _Window.around(anatomy, cx, cy, radius + 1, radius + 1)
    r = np.sqrt((win.x - cx) ** 2 + (win.y - cy) ** 2) / radius
    mask = r < 1
    level = cy + radius * rng.uniform(0.0, 0.35)
    gas = _jitter(rng, plan.severity, (0.10, 0.13, 0.16))
    delta = np.where(win.y < level, -gas, 0.03) + np.where(r > 0.85, 0.06, 0.0)
    delta = np.where(delta == 0, 0.03, delta).astype(np.float32)
    delta = np.broadcast_to(delta, mask.shape)
    return [_lesion("hernia", "mediastinum", _apply(density, delta, mask, win.index))]


# ---------------------------------------------------------------------------------------------
# Devices and foreign objects (drawn last, on top of everything)
# ---------------------------------------------------------------------------------------------

def _polyline_pixels(anatomy: Anatomy, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    xs, ys = anatomy.frame.to_pixel([p[0] for p in points], [p[1] for p in points])
    return list(zip(xs.tolist(), ys.tolist()))


def _smooth_path(points: list[tuple[float, float]], n: int = 24) -> list[tuple[float, float]]:
    """A quadratic B-spline guided by the control points (through the first and the last), so
    tubes curve instead of kinking."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 3:
        return [tuple(p) for p in pts]
    # each inner control point bends one quadratic piece running between edge midpoints
    starts = np.concatenate([pts[:1], (pts[1:-2] + pts[2:-1]) / 2])
    ends = np.concatenate([(pts[1:-2] + pts[2:-1]) / 2, pts[-1:]])
    t = np.linspace(0, 1, n)[None, :, None]
    curve = (1 - t) ** 2 * starts[:, None] + 2 * (1 - t) * t * pts[1:-1, None] + t ** 2 * ends[:, None]
    return [tuple(p) for p in curve.reshape(-1, 2)]


def _device_paths(rng, anatomy: Anatomy, kind: str) -> list[tuple[list[tuple[float, float]], float, float]]:
    """Thorax-coordinate paths of one device: (points, width as a fraction of scale, density)."""
    if kind == "ett":  # tip a few centimetres above the carina
        tip = CARINA_Y - rng.uniform(0.06, 0.16)
        return [([(0.01, -1.1), (0.0, -0.7), (rng.normal(0, 0.01), tip)], 0.016, 0.12),
                ([(0.015, -1.1), (0.005, -0.7), (0.005, tip)], 0.005, 0.22)]
    if kind in ("rij_line", "lsc_line"):  # tip in the superior vena cava
        tip = (rng.normal(-0.06, 0.02), rng.uniform(-0.2, 0.0))
        if kind == "rij_line":
            path = [(-0.30, -1.05), (-0.18, -0.80), (-0.08, -0.55), tip]
        else:
            path = [(0.85, -0.55), (0.40, -0.66), (0.08, -0.50), tip]
        return [(path, 0.007, 0.13)]
    if kind == "ng_tube":
        return [([(0.03, -1.1), (0.02, -0.4), (0.05, 0.35), (0.30, rng.uniform(0.60, 0.75))], 0.008, 0.12)]
    raise ValueError(kind)


def _draw_paths(anatomy: Anatomy, paths, canvas: Image.Image) -> None:
    draw = ImageDraw.Draw(canvas)
    for points, width, amp in paths:
        pix = _smooth_path(_polyline_pixels(anatomy, points))
        w = max(1, int(round(width * anatomy.scale)))
        draw.line(pix, fill=int(round(amp * 1000)), width=w, joint="curve")


def _ecg_leads(rng, anatomy: Anatomy, canvas: Image.Image) -> None:
    """Electrode snaps (bright rings) with wires trailing off the film."""
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 6))):
        xt, yt = rng.uniform(-0.8, 0.8), rng.uniform(-0.75, 0.3)
        (px,), (py,) = anatomy.frame.to_pixel([xt], [yt])
        r = max(2.0, 0.018 * anatomy.scale)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=110, outline=300, width=max(1, int(r / 3)))
        end = (xt + rng.normal(0, 0.4), -1.2 if yt < -0.2 else 1.2)
        mid = ((xt + end[0]) / 2 + rng.normal(0, 0.2), (yt + end[1]) / 2)
        pix = _smooth_path(_polyline_pixels(anatomy, [(xt, yt), mid, end]))
        draw.line(pix, fill=70, width=max(1, int(round(0.004 * anatomy.scale))), joint="curve")


def draw_support_devices(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Lines and tubes (endotracheal tube, central venous catheter, enteric tube) and ECG leads,
    drawn as radiopaque lines. One lesion per device, zone "chest wall"."""
    lesions = []
    for kind, zone in zip(plan.kinds, plan.zones):
        canvas = Image.new("I", (anatomy.width, anatomy.height), 0)
        if kind == "ecg_leads":
            _ecg_leads(rng, anatomy, canvas)
        else:
            _draw_paths(anatomy, _device_paths(rng, anatomy, kind), canvas)
        delta = np.asarray(canvas, dtype=np.float32) / 1000.0
        mask = delta > 0
        if mask.any():
            lesions.append(_lesion("support_devices", zone, _apply(density, delta, mask)))
    return lesions


def _object_centre(rng, anatomy: Anatomy, name: str) -> tuple[int, int]:
    """Where objects of this kind are usually found: shirt buttons and snaps down the midline,
    pendants and chains at the neck and upper chest, the rest anywhere over the lungs."""
    if name in ("button", "snap") and rng.random() < 0.85:
        xt, yt = rng.normal(0.0, 0.05), rng.uniform(-0.6, 0.45)
    elif name in ("pendant", "wire") and rng.random() < 0.6:
        xt, yt = rng.normal(0.0, 0.1), rng.uniform(-0.85, -0.45)
    else:
        return _pick_point(rng, anatomy.lung if anatomy.lung.any() else anatomy.body, pull=0.1)
    x, y = anatomy.frame.to_pixel(xt, yt)
    return (int(np.clip(round(float(x)), 0, anatomy.width - 1)), int(np.clip(round(float(y)), 0, anatomy.height - 1)))


def _object_shape(rng, anatomy: Anatomy, name: str) -> Shape:
    """Integer annotation geometry of one foreign object, inside the body and the image."""
    kind = FOREIGN_OBJECT_KINDS[name]
    s = anatomy.scale
    cx, cy = _object_centre(rng, anatomy, name)
    size = {"button": 0.035, "coin": 0.07, "ring": 0.065, "clip": 0.08, "snap": 0.045,
            "wire": 0.2, "pendant": 0.08}[name] * s * rng.uniform(0.75, 1.3)
    size = max(size, 4.0)
    if kind in ("ellipse", "rectangle"):
        aspect = rng.uniform(0.85, 1.15) if name in ("button", "coin", "ring") else rng.uniform(0.25, 0.5)
        hx, hy = size / 2, size * aspect / 2
        if kind == "rectangle" and rng.random() < 0.5:
            hx, hy = hy, hx
        hx, hy = max(hx, 1.5), max(hy, 1.5)
        x1, x2 = int(round(cx - hx)), int(round(cx + hx))
        y1, y2 = int(round(cy - hy)), int(round(cy + hy))
        x1, x2 = np.clip([x1, x2], 0, anatomy.width - 1)
        y1, y2 = np.clip([y1, y2], 0, anatomy.height - 1)
        if x2 - x1 < 2:
            x1, x2 = (x1, x1 + 2) if x1 + 2 < anatomy.width else (x2 - 2, x2)
        if y2 - y1 < 2:
            y1, y2 = (y1, y1 + 2) if y1 + 2 < anatomy.height else (y2 - 2, y2)
        return Shape(kind, np.array([[x1, y1], [x2, y2]], dtype=np.int64))
    if name == "wire":  # a bent strip: a thickened polyline turned into one polygon outline
        n = int(rng.integers(3, 5))
        heading = rng.uniform(0, 2 * np.pi)
        pts = [np.array([cx, cy], dtype=np.float64)]
        for _ in range(n - 1):
            heading += rng.normal(0, 0.7)
            pts.append(pts[-1] + size / (n - 1) * np.array([math.cos(heading), math.sin(heading)]))
        pts = np.array(pts)
        half = max(1.0, 0.006 * s)
        normals = []
        for i in range(n):
            d = pts[min(i + 1, n - 1)] - pts[max(i - 1, 0)]
            d = d / (np.linalg.norm(d) + 1e-9)
            normals.append(np.array([-d[1], d[0]]))
        normals = np.array(normals)
        outline = np.concatenate([pts + half * normals, (pts - half * normals)[::-1]])
    else:  # pendant / irregular metal piece: a star-ish polygon
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = size / 2 * rng.uniform(0.55, 1.0, n)
        outline = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    outline = np.round(outline)
    outline[:, 0] = np.clip(outline[:, 0], 0, anatomy.width - 1)
    outline[:, 1] = np.clip(outline[:, 1], 0, anatomy.height - 1)
    return Shape("polygon", outline.astype(np.int64))


def draw_foreign_object(rng, density, anatomy: Anatomy, plan: FindingPlan) -> list[Lesion]:
    """Object-CXR foreign objects (buttons, coins, rings, clips, snaps, wires, pendants): bright,
    sharp-edged metal. The mask is exactly ``rasterize(shape)``, the geometry the annotation
    stores, and the drawing changes every pixel of it (rings and buttons keep a fainter centre or
    holes, never an untouched one)."""
    lesions = []
    for name, zone in zip(plan.kinds, plan.zones):
        shape = _object_shape(rng, anatomy, name)
        mask = rasterize(shape.kind, shape.points, anatomy.height, anatomy.width)
        if not mask.any():
            continue
        x1, y1, x2, y2 = mask_bounding_box(mask)
        win = _Window.around(anatomy, (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, (x2 - x1) / 2, (y2 - y1) / 2)
        local = mask[win.index]
        rx, ry = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
        r = np.sqrt(((win.x - (x1 + x2 - 1) / 2) / rx) ** 2 + ((win.y - (y1 + y2 - 1) / 2) / ry) ** 2)
        amp = rng.uniform(0.5, 0.9)
        if name == "ring":
            pattern = np.where(r > 0.65, 1.0, 0.25)
        elif name == "button":
            holes = np.cos(np.pi * (win.x - x1) / max(rx * 0.6, 1)) * np.cos(np.pi * (win.y - y1) / max(ry * 0.6, 1))
            pattern = np.where((holes > 0.8) & (r < 0.6), 0.35, 0.85)
        elif name == "coin":
            pattern = 0.85 + 0.15 * (r > 0.8)
        else:
            pattern = np.full(r.shape, 0.9)
        delta = (amp * np.broadcast_to(pattern, local.shape)).astype(np.float32)
        lesion = _lesion("foreign_object", zone, _apply(density, delta, local, win.index), shape)
        lesion.lung_fraction = float((lesion.mask & anatomy.lung).sum() / max(int(lesion.mask.sum()), 1))
        lesions.append(lesion)
    return lesions


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

Drawer = Callable[[np.random.Generator, np.ndarray, Anatomy, FindingPlan], list[Lesion]]

#: finding -> drawing function.
DRAWERS: dict[str, Drawer] = {
    "consolidation": draw_consolidation,
    "effusion": draw_effusion,
    "pneumothorax": draw_pneumothorax,
    "cardiomegaly": draw_cardiomegaly,
    "edema": draw_edema,
    "atelectasis": draw_atelectasis,
    "nodule": draw_nodule,
    "mass": draw_mass,
    "covid": draw_covid,
    "infiltration": draw_infiltration,
    "emphysema": draw_emphysema,
    "fibrosis": draw_fibrosis,
    "pleural_thickening": draw_pleural_thickening,
    "hernia": draw_hernia,
    "support_devices": draw_support_devices,
    "foreign_object": draw_foreign_object,
}

#: Drawing order: findings that reshape the anatomy first, diffuse before focal, the pneumothorax
#: after the opacities (it erases vascular markings) and radiopaque devices last, on top.
DRAW_ORDER: tuple[str, ...] = (
    "emphysema", "cardiomegaly", "effusion", "edema", "covid", "fibrosis", "consolidation",
    "infiltration", "atelectasis", "nodule", "mass", "pleural_thickening", "hernia", "pneumothorax",
    "support_devices", "foreign_object",
)

assert set(DRAWERS) == set(FINDINGS) == set(DRAW_ORDER)


def draw_findings(rng: np.random.Generator, density: np.ndarray, anatomy: Anatomy,
                  plans: list[FindingPlan]) -> list[Lesion]:
    """Draw every plan in :data:`DRAW_ORDER`; returns all lesions (possibly several per plan)."""
    by_finding = {p.finding: p for p in plans}
    lesions: list[Lesion] = []
    for finding in DRAW_ORDER:
        if finding in by_finding:
            lesions.extend(DRAWERS[finding](rng, density, anatomy, by_finding[finding]))
    return lesions
