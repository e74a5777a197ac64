"""Procedural normal thorax: the canvas every synthetic finding is drawn on.

The image is built in two stages so that findings share the fate of the anatomy:

1. :func:`draw_anatomy` returns a *density map* (float32, roughly 0..1, denser = brighter) and an
   :class:`Anatomy` record. Findings (``findings.py``) add or remove density on that map.
2. :func:`render` applies the exposure (brightness, contrast, gamma) and the film noise to the
   finished density map. Because lesions are drawn before exposure and noise, their contrast is
   modulated and partly hidden exactly like the anatomy's, which keeps the tasks non-trivial.

Geometry lives in *thorax coordinates*: ``X`` runs from -1 (image left, the patient's right in a
PA/AP view) to +1, ``Y`` from -1 (top) to +1 (bottom), after a per-case shift, zoom and small
rotation. Shapes are therefore stretched with the image aspect ratio, which is what a detector
resizing a non-square radiograph sees anyway. Everything is vectorised numpy/scipy; there is no
per-pixel Python loop, so a 256x256 thorax takes a few milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

#: Patient sides. In a frontal (PA/AP) view the patient's right lung is on the image left.
SIDES: tuple[str, str] = ("right", "left")
#: Sign of the thorax X coordinate of each side.
SIDE_SIGN: dict[str, float] = {"right": -1.0, "left": 1.0}
LEVELS: tuple[str, str, str] = ("upper", "middle", "lower")

# Density levels (before exposure). Chosen so that after the default exposure the lungs are dark
# grey, soft tissue mid grey and the mediastinum, bone and abdomen bright, as on a real film.
_BACKGROUND = 0.03        # air outside the patient
_SOFT_TISSUE = 0.30       # thin chest wall
_SOFT_TISSUE_BULK = 0.26  # extra for the thick centre of the body
_ABDOMEN = 0.32           # liver / abdomen below the diaphragm
_MEDIASTINUM = 0.24
_SPINE = 0.06
_RIB = 0.065
_CLAVICLE = 0.17
_HILUM = 0.07
_MARKINGS = 0.07          # vascular markings: these vanish inside a pneumothorax
_TRACHEA = 0.10
#: Density removed by aerated lung.
LUNG_AIR = 0.36
#: Density of the cardiac silhouette (it replaces the mediastinum's where they overlap).
HEART = 0.26
#: Density a lung pixel gains when the heart covers it (cardiomegaly): its air goes, heart comes.
HEART_OVER_LUNG = LUNG_AIR + HEART
#: Width (thorax units) of the soft transition from lung to abdomen at the diaphragm.
DIAPHRAGM_EDGE = 0.04
#: Thorax Y of the carina, where the trachea divides (endotracheal tube tips sit above it).
CARINA_Y = -0.30


@dataclass(frozen=True)
class Exposure:
    """Per-film acquisition settings applied by :func:`render`."""

    brightness: float   # added after contrast
    contrast: float     # slope around mid grey
    gamma: float        # display gamma (>1 darkens mid tones)
    noise: float        # std of the fine, quantum-like noise
    mottle: float       # std of the low-frequency mottle
    blur: float         # gaussian sigma (pixels) of the imaging system, applied to the anatomy


@dataclass(frozen=True)
class Frame:
    """Maps pixel indices to thorax coordinates and back (shift, zoom, rotation)."""

    height: int
    width: int
    shift_x: float   # thorax centre, in normalised image units
    shift_y: float
    zoom: float      # thorax units per normalised image unit (AP films are magnified)
    angle: float     # radians, patient rotation in the image plane

    def grids(self, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Thorax coordinates ``(X, Y)`` of every pixel centre, float32 [H, W]; with ``step`` > 1,
        of the coarser lattice of every ``step``-th pixel block ([ceil(H/step), ceil(W/step)],
        block centres), which :func:`upsample_by` brings back to full resolution."""
        offset = (step - 1) / 2 + 0.5
        xs = (np.arange(math.ceil(self.width / step), dtype=np.float32) * step + offset) / (self.width / 2)
        ys = (np.arange(math.ceil(self.height / step), dtype=np.float32) * step + offset) / (self.height / 2)
        xs, ys = xs - 1 - self.shift_x, ys - 1 - self.shift_y
        c, s = math.cos(self.angle), math.sin(self.angle)
        X = (xs[None, :] * c + ys[:, None] * s) / self.zoom
        Y = (-xs[None, :] * s + ys[:, None] * c) / self.zoom
        return X.astype(np.float32), Y.astype(np.float32)

    def to_pixel(self, xt, yt) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (x, y; continuous) of thorax points."""
        xt, yt = np.asarray(xt, dtype=np.float64), np.asarray(yt, dtype=np.float64)
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx = self.zoom * (xt * c - yt * s)
        dy = self.zoom * (xt * s + yt * c)
        x = (dx + self.shift_x + 1) * (self.width / 2) - 0.5
        y = (dy + self.shift_y + 1) * (self.height / 2) - 0.5
        return x, y

    @property
    def pixels_per_unit(self) -> tuple[float, float]:
        """Pixels per thorax unit along x and y."""
        return self.zoom * self.width / 2, self.zoom * self.height / 2


@dataclass(frozen=True)
class Habitus:
    """Sampled body build and acquisition geometry of one patient."""

    view: str
    lung_scale: float        # lateral size of the lungs
    inspiration: float       # -1 (poor) .. +1 (deep): moves the diaphragm
    heart_width: float       # transverse cardiac diameter (thorax units; the thorax is ~1.7 wide)
    heart_ry: float          # vertical half axis of the cardiac silhouette
    heart_shift: float       # extra shift of the heart to the patient's left
    mediastinum_width: float
    body_width: float
    rib_spacing: float
    right_dome_raise: float  # right hemidiaphragm is usually a little higher
    stomach_bubble: bool
    breasts: bool


@dataclass
class Anatomy:
    """Where the normal structures of one drawn thorax are; findings are placed with it.

    Masks are bool [H, W]. ``lungs`` and ``zones`` are keyed by patient side ("right", "left")
    and by the names of :data:`bench.data.synth.case.ZONES`. Points are pixel (x, y) tuples.
    Findings that change the anatomy (cardiomegaly, emphysema) update this record so that
    later findings are placed on the changed anatomy. On a lateral film both ``lungs`` entries
    are the one superimposed lung field and there are no zones (no lesions are drawn on it).
    """

    height: int
    width: int
    view: str
    frame: Frame
    habitus: Habitus
    exposure: Exposure
    X: np.ndarray                  # thorax coordinates of every pixel
    Y: np.ndarray
    body: np.ndarray
    lungs: dict[str, np.ndarray]
    zones: dict[str, np.ndarray]
    heart: np.ndarray
    mediastinum: np.ndarray
    markings: np.ndarray           # float32 density of vascular markings (inside the lungs)
    heart_geometry: HeartGeometry
    diaphragm: dict[str, tuple[float, float, float, float]]   # side -> base, dome height, centre |X|, width
    costophrenic: dict[str, tuple[float, float]] = field(default_factory=dict)
    hilum: dict[str, tuple[float, float]] = field(default_factory=dict)
    apex: dict[str, tuple[float, float]] = field(default_factory=dict)
    carina: tuple[float, float] = (0.0, 0.0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def scale(self) -> float:
        """Isotropic size unit in pixels (the shorter image side); lesion sizes are fractions of it."""
        return float(min(self.height, self.width))

    @property
    def lung(self) -> np.ndarray:
        """Both lungs."""
        return self.lungs["right"] | self.lungs["left"]

    def diaphragm_level(self) -> np.ndarray:
        """Thorax Y of the diaphragm below every pixel column position (float32 [H, W])."""
        return diaphragm_level(self.X, self.diaphragm)

    def row_extent(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image row: whether the lung of ``side`` is present, its medial and lateral column.

        Medial/lateral are relative to the patient: the lateral edge of the right lung is its
        leftmost column in the image.
        """
        mask = self.lungs[side]
        present = mask.any(axis=1)
        first = np.argmax(mask, axis=1)
        last = self.width - 1 - np.argmax(mask[:, ::-1], axis=1)
        if side == "right":
            return present, last, first
        return present, first, last

    def set_lungs(self, right: np.ndarray, left: np.ndarray) -> None:
        """Replace the lung masks (emphysema, say) and recompute the zones."""
        self.lungs = {"right": right, "left": left}
        self.zones = lung_zones(self.lungs)
        self.costophrenic = {s: _lowest_lateral_point(self.lungs[s], s) for s in SIDES}
        self.apex = {s: _apex_point(self.lungs[s]) for s in SIDES}


def _dome(ax: np.ndarray, base: float, height: float, centre: float, width: float) -> np.ndarray:
    """Hemidiaphragm: a gaussian dome rising ``height`` above ``base`` at |X| = ``centre``.

    Far laterally the curve falls back to ``base``, so it meets the nearly vertical lateral lung
    wall at an acute angle: the costophrenic angle that effusions blunt.
    """
    return base - height * np.exp(-(((ax - centre) / width) ** 2))


def diaphragm_level(X: np.ndarray, diaphragm: dict[str, tuple[float, float, float, float]]) -> np.ndarray:
    """Thorax Y of the hemidiaphragms (right dome for X < 0, left dome otherwise)."""
    ax = np.abs(X)
    return np.where(X < 0, _dome(ax, *diaphragm["right"]), _dome(ax, *diaphragm["left"]))


def lung_zones(lungs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split each lung into upper, middle and lower thirds of its own height."""
    zones = {}
    for side in SIDES:
        mask = lungs[side]
        rows = np.flatnonzero(mask.any(axis=1))
        top, bottom = (rows[0], rows[-1] + 1) if len(rows) else (0, 0)
        cuts = np.linspace(top, bottom, 4).round().astype(int)
        row_index = np.arange(mask.shape[0])[:, None]
        for i, level in enumerate(LEVELS):
            band = (row_index >= cuts[i]) & (row_index < cuts[i + 1])
            zones[f"{side} {level}"] = mask & band
    return zones


def _lowest_lateral_point(mask: np.ndarray, side: str) -> tuple[float, float]:
    """The costophrenic angle: the most lateral pixel of the lowest lung row."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return (0.0, 0.0)
    cols = np.flatnonzero(mask[rows[-1]])
    return float(cols[0] if side == "right" else cols[-1]), float(rows[-1])


def _apex_point(mask: np.ndarray) -> tuple[float, float]:
    """Top of the lung: the middle of its highest row."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return (0.0, 0.0)
    return float(np.flatnonzero(mask[rows[0]]).mean()), float(rows[0])


def sample_exposure(rng: np.random.Generator, view: str, scale: float) -> Exposure:
    """Film-to-film variation. Portable AP films are noisier and flatter."""
    portable = view == "AP"
    return Exposure(
        brightness=float(rng.normal(0.0, 0.035)),
        contrast=float(rng.uniform(0.82, 1.12) * (0.94 if portable else 1.0)),
        gamma=float(np.exp(rng.normal(0.0, 0.12))),
        noise=float(rng.uniform(0.018, 0.040) * (1.15 if portable else 1.0)),
        mottle=float(rng.uniform(0.010, 0.025)),
        blur=float(rng.uniform(0.5, 1.1) * scale / 256.0),
    )


def sample_habitus(rng: np.random.Generator, view: str, sex: str) -> Habitus:
    """Anatomical variation: lung and heart size, inspiration, mediastinal width."""
    ap = view == "AP"
    return Habitus(
        view=view,
        lung_scale=float(rng.uniform(0.93, 1.05)),
        inspiration=float(np.clip(rng.normal(-0.25 if ap else 0.15, 0.45), -1, 1)),
        # Normal cardiothoracic ratio ~0.40-0.50; AP projection magnifies the heart ~10%.
        heart_width=float(rng.uniform(0.66, 0.82) * (1.08 if ap else 1.0)),
        heart_ry=float(rng.uniform(0.33, 0.38)),
        heart_shift=float(rng.normal(0.0, 0.025)),
        mediastinum_width=float(rng.uniform(0.12, 0.15) * (1.08 if ap else 1.0)),
        body_width=float(rng.uniform(0.90, 1.0)),
        rib_spacing=float(rng.uniform(0.95, 1.08)),
        right_dome_raise=float(rng.uniform(0.0, 0.07)),
        stomach_bubble=bool(rng.random() < 0.6),
        breasts=sex == "F",
    )


def sample_frame(rng: np.random.Generator, height: int, width: int, view: str) -> Frame:
    """Patient positioning: small shift, tilt and a zoom (AP films are magnified)."""
    zoom = rng.uniform(0.97, 1.05) * (1.04 if view == "AP" else 1.0)
    return Frame(
        height=height, width=width,
        shift_x=float(rng.normal(0.0, 0.02)),
        shift_y=float(rng.normal(0.02, 0.025)),
        zoom=float(zoom),
        angle=float(math.radians(rng.normal(0.0, 2.0))),
    )


# ---------------------------------------------------------------------------------------------
# Frontal (PA / AP) thorax
# ---------------------------------------------------------------------------------------------

def draw_anatomy(rng: np.random.Generator, height: int, width: int, view: str = "PA",
                 sex: str = "M") -> tuple[np.ndarray, Anatomy]:
    """Draw a normal thorax. Returns the density map (float32 [H, W]) and its :class:`Anatomy`.

    ``view`` is "PA", "AP" or "LATERAL" (the lateral gets a simpler anatomy and no zones).
    The anatomy is computed at a working resolution (shorter side <= :data:`WORKING_SIDE`) and
    upsampled: it is blurred by the imaging system anyway, and large canvases stay cheap. Masks
    are upsampled too (bilinear, thresholded at 1/2) and findings are drawn at full resolution.
    """
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise ValueError(f"unsupported canvas {height}x{width}")
    if view not in ("PA", "AP", "LATERAL"):
        raise ValueError(f"unknown view {view!r}")
    lateral = view == "LATERAL"
    frame = sample_frame(rng, height, width, "PA" if lateral else view)
    habitus = sample_habitus(rng, view, sex)
    exposure = sample_exposure(rng, "PA" if lateral else view, float(min(height, width)))
    factor = working_factor(height, width)
    # at least half a working pixel, which also anti-aliases the hard mask edges before upsampling;
    # the record keeps the blur actually applied, so findings can match it
    exposure = replace(exposure, blur=max(exposure.blur, 0.5 * factor))
    Xw, Yw = frame.grids(factor)
    build = _lateral if lateral else _frontal
    density, masks, hila, diaphragm, heart_geometry = build(rng, Xw, Yw, habitus, view)
    density = ndimage.gaussian_filter(density, exposure.blur / factor, mode="nearest")
    lung_w = masks["right"] | masks["left"]
    markings = _markings(rng, Xw, Yw, lung_w, hila)
    if factor == 1:
        X, Y = Xw, Yw
    else:
        X, Y = frame.grids()
        shape = (height, width)
        density = upsample_by(density, factor, shape)
        markings = upsample_by(markings, factor, shape)
        masks = {k: upsample_by(m.astype(np.float32), factor, shape) > 0.5 for k, m in masks.items()}
        solid = masks["heart"] | masks["mediastinum"]
        masks["right"] &= ~solid
        masks["left"] &= ~solid
    lung = masks["right"] | masks["left"]
    markings = np.where(lung, markings, 0).astype(np.float32)
    density += markings

    anatomy = Anatomy(
        height=height, width=width, view=view, frame=frame, habitus=habitus, exposure=exposure,
        X=X, Y=Y, body=masks["body"], lungs={"right": masks["right"], "left": masks["left"]}, zones={},
        heart=masks["heart"], mediastinum=masks["mediastinum"], markings=markings,
        heart_geometry=heart_geometry, diaphragm=diaphragm,
        hilum={s: tuple(float(v) for v in frame.to_pixel(*hila[s])) for s in hila},
        carina=tuple(float(v) for v in frame.to_pixel(0.0, CARINA_Y)),
    )
    if not lateral:  # laterals carry no lesions, hence no zones
        anatomy.set_lungs(masks["right"], masks["left"])
    return density.astype(np.float32, copy=False), anatomy


#: Shorter side of the working resolution at which the anatomy is computed.
WORKING_SIDE = 192


def working_factor(height: int, width: int) -> int:
    """Integer downsampling of the working resolution: the smallest that brings the canvas's
    shorter side to at most :data:`WORKING_SIDE`."""
    return max(1, math.ceil(min(height, width) / WORKING_SIDE))


def _frontal(rng, X, Y, habitus: Habitus, view: str):
    """Density (before blur and vascular markings) and structure masks of a frontal thorax on
    the thorax-coordinate grids ``X``, ``Y``."""
    body, density = _body(X, Y, habitus)
    diaphragm = _diaphragm_params(habitus)
    dia_y = diaphragm_level(X, diaphragm)
    density += _ABDOMEN * np.clip((Y - dia_y) / DIAPHRAGM_EDGE, 0, 1) * body

    heart_geometry = _heart_geometry(habitus, diaphragm)
    heart = heart_geometry.mask(X, Y, dia_y)
    mediastinum, knob = _mediastinum(X, Y, habitus, heart_geometry)
    mediastinum |= knob
    lungs = _lungs(X, Y, habitus, dia_y, mediastinum | heart)
    lung = lungs["right"] | lungs["left"]
    solid = mediastinum | heart

    apical_fade = np.clip((Y + 0.78) / 0.25, 0.55, 1.0)  # shoulders overlap the apices
    density -= LUNG_AIR * lung * apical_fade
    density += _MEDIASTINUM * solid + (HEART - _MEDIASTINUM) * heart
    density += _spine(X, Y, dia_y)
    density -= _TRACHEA * _trachea(X, Y)
    density += _RIB * _ribs(X, Y, habitus, dia_y, body) * (1 - 0.7 * solid)
    density += _CLAVICLE * _clavicles(X, Y, view)
    hila = {s: (SIDE_SIGN[s] * 0.20, -0.10 + 0.02 * (s == "left")) for s in SIDES}
    for hx, hy in hila.values():
        density += _HILUM * np.exp(-(((X - hx) / 0.07) ** 2 + ((Y - hy) / 0.09) ** 2))
    if habitus.stomach_bubble:
        density -= 0.14 * _stomach_bubble(X, Y, diaphragm["left"], rng)
    if habitus.breasts:
        density += 0.07 * _breast_shadows(X, Y)
    if view == "AP":
        density += 0.05 * _scapulae(X, Y)
    masks = {"right": lungs["right"], "left": lungs["left"], "heart": heart, "mediastinum": mediastinum,
             "body": body}
    return density, masks, hila, diaphragm, heart_geometry


def _body(X: np.ndarray, Y: np.ndarray, h: Habitus) -> tuple[np.ndarray, np.ndarray]:
    """Body outline with neck and sloping shoulders; soft tissue thicker in the middle."""
    ax = np.abs(X)
    half_width = 0.93 * h.body_width
    shoulder_top = -0.97 + 0.24 * np.clip((ax - 0.16) / 0.65, 0, 1) ** 0.7
    body = (ax < half_width) & (Y > shoulder_top)
    thickness = np.sqrt(np.clip(1 - (X / half_width) ** 2, 0, 1))
    density = np.where(body, _SOFT_TISSUE + _SOFT_TISSUE_BULK * thickness, _BACKGROUND)
    return body, density.astype(np.float32)


def _diaphragm_params(h: Habitus) -> dict[str, tuple[float, float, float, float]]:
    """Base level, dome height, dome centre |X| and dome width of each hemidiaphragm."""
    base = 0.50 + 0.07 * h.inspiration
    dome = 0.17 - 0.03 * h.inspiration
    return {
        "right": (base - h.right_dome_raise, dome, 0.36, 0.30),
        "left": (base + 0.01, dome * 0.9, 0.40, 0.28),
    }


def _heart_geometry(h: Habitus, diaphragm) -> HeartGeometry:
    """The heart sits on the diaphragm, about a third right and two thirds left of the midline."""
    base_left = diaphragm["left"][0]
    right = 0.36 * h.heart_width
    left = h.heart_width - right
    cx = -0.17 + right + h.heart_shift
    cy = base_left - 0.24 + 0.5 * (h.heart_ry - 0.35)
    return HeartGeometry(cx, cy, right, left, h.heart_ry, math.radians(-12.0))


@dataclass(frozen=True)
class HeartGeometry:
    """Cardiac silhouette: a tilted half-ellipse pair, narrower right of its centre than left.

    Its lower half lies below the diaphragm and is hidden by the abdomen, as on a real film.
    Lengths are thorax units.
    """

    cx: float
    cy: float
    right: float   # extent towards the patient's right (image left)
    left: float    # extent towards the patient's left
    ry: float
    angle: float

    @property
    def width(self) -> float:
        """Transverse cardiac diameter (numerator of the cardiothoracic ratio)."""
        return self.right + self.left

    def radius(self, X, Y) -> np.ndarray:
        """Normalised radius: < 1 inside the silhouette."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (X - self.cx) * c + (Y - self.cy) * s
        v = -(X - self.cx) * s + (Y - self.cy) * c
        rx = np.where(u < 0, self.right, self.left)
        return np.sqrt((u / rx) ** 2 + (v / self.ry) ** 2)

    def mask(self, X, Y, floor) -> np.ndarray:
        """Pixels of the silhouette above ``floor`` (the diaphragm, an array or a level)."""
        return (self.radius(X, Y) < 1.0) & (Y < floor + 0.02)

    def scaled(self, factor: float, shift: float = 0.0) -> HeartGeometry:
        """An enlarged heart: wider (mostly to the left) and a little taller, growing downwards
        so that its top stays under the mediastinum."""
        ry = self.ry * (1 + 0.3 * (factor - 1))
        return HeartGeometry(self.cx + shift, self.cy + (ry - self.ry), self.right * (1 + 0.7 * (factor - 1)),
                             self.left * factor, ry, self.angle)


def _mediastinum(X, Y, h: Habitus, heart_geometry) -> tuple[np.ndarray, np.ndarray]:
    """Superior mediastinum (a band widening downwards) and the aortic knob."""
    top = heart_geometry.cy - heart_geometry.ry
    half = h.mediastinum_width * (0.85 + 0.3 * np.clip((Y + 0.7) / 0.7, 0, 1))
    half = half + 0.10 * np.clip((Y - top + 0.12) / 0.14, 0, 1)  # hila / atria widen it onto the heart
    centre = 0.01 + 0.04 * np.clip((Y - top + 0.12) / 0.14, 0, 1)
    band = (np.abs(X - centre) < half) & (Y < heart_geometry.cy)
    knob = ((X - (h.mediastinum_width + 0.01)) / 0.07) ** 2 + ((Y + 0.38) / 0.065) ** 2 < 1
    return band, knob


def _lungs(X, Y, h: Habitus, dia_y, solid) -> dict[str, np.ndarray]:
    """Each lung: an asymmetric superellipse (rounded apex, near-vertical lateral wall), cut by
    the diaphragm below and by the mediastinum and heart medially."""
    out = {}
    upper = Y < -0.05
    v = np.abs(Y + 0.05) / np.where(upper, 0.66 + 0.02 * h.inspiration, 1.0)
    for side in SIDES:
        cx = SIDE_SIGN[side] * 0.45 * h.lung_scale
        u = np.abs((X - cx) / (0.38 * h.lung_scale))
        # ellipse (p = 2) above, squarer superellipse (p = 3) below: rounded apex, lateral wall
        inside = np.where(upper, u * u + v * v, u * u * u + v * v * v) < 1.0
        on_side = X * SIDE_SIGN[side] > 0
        out[side] = inside & on_side & (Y < dia_y) & ~solid
    return out


def _spine(X, Y, dia_y) -> np.ndarray:
    """Thoracic spine: a vertical band with vertebral bodies and darker disc spaces."""
    band = np.clip(1 - (X / 0.075) ** 2, 0, 1) ** 0.5
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * (Y + 1) / 0.095) ** 2
    return _SPINE * band * vertebrae * (Y > -1.0)


def _trachea(X, Y) -> np.ndarray:
    """Air column of the trachea down to the carina, and the two main bronchi."""
    trachea = np.clip(1 - (X / 0.035) ** 2, 0, 1) * ((Y > -0.95) & (Y < CARINA_Y))
    bronchi = np.zeros_like(X)
    for sign in (-1.0, 1.0):
        along = (Y - CARINA_Y) / 0.18
        centre = sign * 0.12 * along
        bronchi = np.maximum(bronchi, np.clip(1 - ((X - centre) / 0.022) ** 2, 0, 1)
                             * ((along > 0) & (along < 1)))
    return np.maximum(trachea, 0.8 * bronchi)


def _ribs(X, Y, h: Habitus, dia_y, body) -> np.ndarray:
    """Posterior rib arcs (and fainter anterior ribs) as a warped periodic field.

    Every posterior rib follows the same curve ``Y = y_k + g(|X|)`` (rising slightly from the
    spine, then sweeping down along the lateral wall), with rib spacing growing downwards. So
    ``q = Y - g(|X|)`` is solved for a continuous rib index k, and the rib profile is a function
    of frac(k): one pass over the image draws all ribs.
    """
    ax = np.abs(X)
    q = Y - (-0.16 * ax + 0.62 * ax * ax)
    y0, s1, s2 = -0.86, 0.105 * h.rib_spacing, 0.004
    k = (np.sqrt(np.maximum(s1 * s1 + 4 * s2 * (q - y0), 0)) - s1) / (2 * s2)
    # position across the rib (0..1 over the 42% of each period a rib occupies); the profile is a
    # flat-topped bump plus brighter cortical edges, polynomials being much cheaper than sin/exp
    x = np.clip((k - np.floor(k)) / 0.42, 0, 1)
    bump = 4 * x * (1 - x)
    edge = (2 * x - 1) ** 2
    edge = edge * edge * edge * edge
    posterior = (0.8 * np.minimum(2.5 * bump, 1) + 0.35 * edge * (bump > 0)) * ((k > 0) & (k < 11))

    ka = (Y + 0.30 * ax - 0.12 * ax * ax + 0.95) / 0.17
    xa = np.clip((ka - np.floor(ka)) / 0.35, 0, 1)
    anterior = 4 * xa * (1 - xa) * ((ka > 1) & (ka < 7))
    cage = (ax < 0.88 * h.body_width) & (ax > 0.05) & (Y < dia_y + 0.08) & body
    fade_lateral = np.clip((0.90 - ax) / 0.12, 0, 1)
    return ((posterior + 0.35 * anterior) * cage * fade_lateral).astype(np.float32)


def _clavicles(X, Y, view: str) -> np.ndarray:
    """Clavicles: bright bands from the sternal notch out and up to the shoulders (higher on AP)."""
    ax = np.abs(X)
    centre = (-0.62 if view == "PA" else -0.70) - 0.20 * ax + 0.12 * ax ** 2
    half = 0.020 + 0.006 * ax
    along = (ax > 0.07) & (ax < 0.66)
    across = np.clip(1 - ((Y - centre) / half) ** 2, 0, 1)
    return np.sqrt(across) * along


def _stomach_bubble(X, Y, left_dome, rng) -> np.ndarray:
    base, height, centre, _ = left_dome
    cx = centre + rng.uniform(-0.05, 0.05)
    cy = base - height + 0.12
    return np.clip(1 - ((X - cx) / 0.11) ** 2 - ((Y - cy) / 0.06) ** 2, 0, 1) ** 0.5


def _breast_shadows(X, Y) -> np.ndarray:
    """Soft density over both lower lateral lungs, with a curved inferior edge."""
    r = ((np.abs(X) - 0.52) / 0.30) ** 2 + ((Y - 0.32) / 0.25) ** 2
    return np.clip(1 - r, 0, 1) ** 0.6


def _scapulae(X, Y) -> np.ndarray:
    """On AP films the scapulae project over the lateral upper lungs."""
    r = ((np.abs(X) - 0.78) / 0.16) ** 2 + ((Y + 0.35) / 0.38) ** 2
    return np.clip(1 - r, 0, 1) ** 0.4


def _markings(rng: np.random.Generator, X, Y, lung, hila) -> np.ndarray:
    """Vascular markings: streaks radiating from each hilum, fading to the periphery, plus fine
    parenchymal texture. Kept separate so a pneumothorax can remove exactly them."""
    out = np.zeros_like(X)
    for side, (hx, hy) in hila.items():
        sel = lung & ((X < 0) if side == "right" else (X >= 0))
        if not sel.any():
            continue
        dx, dy = X[sel] - hx, Y[sel] - hy
        r = np.sqrt(dx * dx + dy * dy)
        phi = np.arctan2(dy, dx)
        streak = np.zeros_like(r)
        for _ in range(3):
            n = rng.uniform(9, 22)
            streak += np.cos(n * phi + rng.uniform(0, 2 * np.pi) + rng.uniform(4, 10) * r)
        vessels = np.clip(streak / 3 - 0.25, 0, None) / 0.75
        out[sel] = vessels * np.exp(-r / 0.38)
    texture = lowres_noise(rng, X.shape, 24)
    out = _MARKINGS * out * (0.7 + 0.6 * np.clip(texture + 0.5, 0, 1)) + 0.012 * texture * lung
    return out.astype(np.float32)


def lowres_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise (about unit variance): a coarse random grid of about ``cells`` cells along the
    longer side, linearly interpolated to ``shape``."""
    h, w = shape
    k = max(1, math.ceil(max(h, w) / cells))
    coarse = rng.standard_normal((max(2, math.ceil(h / k)), max(2, math.ceil(w / k))), dtype=np.float32)
    return upsample_by(coarse, k, shape)


def upsample_by(image: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Linear interpolation of a coarse lattice (block centres, see :meth:`Frame.grids`) by an
    integer ``factor``, cropped to ``shape``; edges are clamped. Shifted slices instead of
    gathers: this runs on every full-resolution canvas, several times per case."""
    out = _interpolate_axis(np.asarray(image, dtype=np.float32), factor, 0)
    return _interpolate_axis(out, factor, 1)[: shape[0], : shape[1]]


def _interpolate_axis(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Linear interpolation by ``k`` along ``axis`` (0 or 1) of a 2-D array, C-contiguous out."""
    if k == 1:
        return a
    if axis == 0:
        padded = np.concatenate([a[:1], a, a[-1:]], axis=0)
        prev, here, after = padded[:-2], padded[1:-1], padded[2:]
        out = np.empty((a.shape[0], k, a.shape[1]), dtype=np.float32)
        phase = lambda j: out[:, j]  # noqa: E731
    else:
        padded = np.concatenate([a[:, :1], a, a[:, -1:]], axis=1)
        prev, here, after = padded[:, :-2], padded[:, 1:-1], padded[:, 2:]
        out = np.empty((a.shape[0], a.shape[1], k), dtype=np.float32)
        phase = lambda j: out[:, :, j]  # noqa: E731
    for j in range(k):
        d = (j + 0.5) / k - 0.5  # offset of sub-pixel j from its block centre, in blocks
        phase(j)[...] = (1 + d) * here - d * prev if d < 0 else (1 - d) * here + d * after
    return out.reshape((a.shape[0] * k, a.shape[1]) if axis == 0 else (a.shape[0], a.shape[1] * k))


# ---------------------------------------------------------------------------------------------
# Lateral view
# ---------------------------------------------------------------------------------------------

def _lateral(rng, X, Y, habitus: Habitus, view: str):
    """A simpler lateral projection (patient facing image left): one superimposed lung field,
    the heart resting on the anterior diaphragm behind the sternum, vertebral bodies posteriorly,
    the diaphragm sloping down to the deep posterior sulcus. Same return value as
    :func:`_frontal`; both lung entries are the single lung field."""
    body = (np.abs(X + 0.05) < 0.80) & (Y > -0.95 + 0.12 * np.clip(X + 0.2, 0, 1))
    density = np.where(body, _SOFT_TISSUE + 0.30 * np.sqrt(np.clip(1 - ((X + 0.05) / 0.8) ** 2, 0, 1)),
                       _BACKGROUND).astype(np.float32)
    dia = (0.40 + 0.06 * habitus.inspiration + 0.25 * np.clip(X - 0.15, 0, 1) ** 1.5
           - 0.08 * np.exp(-((X + 0.1) / 0.4) ** 2))
    density += _ABDOMEN * np.clip((Y - dia) / DIAPHRAGM_EDGE, 0, 1) * body
    upper = Y < 0
    u = np.abs((X - 0.02) / 0.64)
    v = np.abs((Y + 0.02) / np.where(upper, 0.68, 1.0))
    field_mask = (np.where(upper, u * u + v * v, u * u * u + v * v * v) < 1) & (Y < dia)
    heart_geom = HeartGeometry(-0.30 + habitus.heart_shift, 0.28, 0.30, 0.30, 0.30, math.radians(25))
    heart = heart_geom.mask(X, Y, dia)
    lung = field_mask & ~heart
    density -= 0.8 * LUNG_AIR * field_mask
    density += 0.55 * HEART * (heart & field_mask)  # the heart is superimposed on the lung field
    column = np.clip(1 - ((X - 0.60 - 0.05 * Y) / 0.09) ** 2, 0, 1) ** 0.3
    discs = 0.55 + 0.45 * (np.cos(np.pi * (Y + 1) / 0.095) ** 2 > 0.2)
    density += 0.16 * column * discs * body  # vertebral bodies and disc spaces
    density += 0.10 * (np.abs(X + 0.70 + 0.05 * Y) < 0.025) * (Y > -0.7) * (Y < 0.35)  # sternum
    density -= 0.08 * (np.abs(X - 0.10 + 0.15 * Y) < 0.035) * (Y > -0.95) * (Y < -0.25)  # trachea
    density += 0.05 * (np.cos(np.pi * (Y - 0.5 * X) / 0.11) ** 8) * lung  # superimposed ribs
    density += 0.18 * np.clip(1 - (((X - 0.15) / 0.40) ** 2 + ((Y + 0.85) / 0.22) ** 2), 0, 1)  # arms
    masks = {"right": lung, "left": lung, "heart": heart, "mediastinum": np.zeros_like(body), "body": body}
    return density, masks, {}, {}, heart_geom


# ---------------------------------------------------------------------------------------------
# Exposure and noise
# ---------------------------------------------------------------------------------------------

def render(density: np.ndarray, anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Expose the (anatomy + findings) density map and add film noise: float32 [H, W] in [0, 1].

    The fine noise is signal dependent: bright regions (bone, mediastinum) received fewer photons
    and are noisier than the well-penetrated lungs. A smooth mottle is added on top, so faint
    lesions are partly hidden, as on real radiographs.
    """
    e = anatomy.exposure
    image = density * e.contrast
    image += 0.5 - 0.45 * e.contrast + e.brightness
    np.clip(image, 0.0, 1.0, out=image)
    # display gamma through a lookup table: a float power per pixel costs several times more
    lut = np.linspace(0.0, 1.0, _GAMMA_LUT_SIZE + 1, dtype=np.float32) ** np.float32(e.gamma)
    image = lut[np.rint(image * _GAMMA_LUT_SIZE).astype(np.intp)]
    noise = rng.standard_normal(density.shape, dtype=np.float32)
    noise *= (0.75 * e.noise + 0.5 * e.noise * image)
    image += noise
    image += e.mottle * lowres_noise(rng, density.shape, 16)
    return np.clip(image, 0.0, 1.0, out=image)


_GAMMA_LUT_SIZE = 4096


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] float image to 8 bits (MONOCHROME2: bone bright, lung dark)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
