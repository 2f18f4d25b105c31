"""Deterministic synthetic H&E patches: the renderer behind the ``Synthetic`` training dataset and the demo data.

Everything here is a pure function of ``(seed, index)`` (plus explicit arguments), so datasets built
on it are reproducible and independent of worker order, and no file or network access is needed.

What it models, coarsely but with the structure the evaluations need:

* **Tissue classes** (:data:`CLASS_NAMES`) that differ in nuclear density, size, shape and
  glandular architecture, rendered as haematoxylin / eosin concentration maps.
* **Studies** with their own stain vectors, stain strengths and glass brightness, applied in
  optical-density space (Beer-Lambert), like real inter-site H&E variation.
* **Per-patch ground truth**: label, study and a morphology vector (:data:`MORPHOLOGY_FEATURES`)
  computed from the rendering geometry.

Gene expression, slides with survival and whole-slide images, which only the demo data uses, are
built on this renderer by :class:`scripts.synthetic_cohort.SyntheticCohort`.

Geometry is drawn on a 256-px reference grid at 0.5 um/px and rasterised at ``image_size``, so a
given ``(seed, index)`` shows the same tissue at any resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "CLASS_NAMES",
    "MORPHOLOGY_FEATURES",
    "SyntheticTissue",
    "SyntheticPatch",
    "StainStyle",
    "keyed_rng",
]

CLASS_NAMES: tuple[str, ...] = ("TUMOR", "NORMAL_MUCOSA", "STROMA", "LYMPHOCYTES", "NECROSIS", "ADIPOSE")
TUMOR, NORMAL_MUCOSA, STROMA, LYMPHOCYTES, NECROSIS, ADIPOSE = range(len(CLASS_NAMES))

MORPHOLOGY_FEATURES: tuple[str, ...] = (
    "nuclear_density",      # nuclei per 10^4 um^2
    "nuclear_area",         # mean nuclear area, um^2
    "elongation",           # mean major/minor axis ratio
    "pleomorphism",         # coefficient of variation of nuclear area
    "nuclear_fraction",     # fraction of pixels covered by nuclei
    "lumen_fraction",       # white space: gland lumens, fat vacuoles, clefts
    "epithelium_fraction",  # gland epithelium (cytoplasm) fraction
    "eosin_fraction",       # eosinophilic stroma / cytoplasm without nuclei
    "debris_fraction",      # necrotic debris
)

REF_SIZE = 256          # geometry is drawn on this grid ...
MPP = 0.5               # ... at this many micrometres per pixel
_FIELD_AREA_1E4_UM2 = (REF_SIZE * MPP) ** 2 / 1e4

# Macenko's reference H&E optical-density vectors (RGB), a standard starting stain matrix.
_H_OD = np.array([0.5626, 0.7201, 0.4062])
_E_OD = np.array([0.2159, 0.8012, 0.5581])

# Random-stream tags: every generator is keyed by [seed, stream, a, b, c] (fixed length, so keys
# of different streams can never coincide). Streams 3-7 belong to the demo cohort
# (scripts/synthetic_cohort.py).
_S_PATCH, _S_STUDY = 1, 2


def keyed_rng(*key: int) -> np.random.Generator:
    """The generator of one random stream, a pure function of ``(seed, stream, *indices)``."""
    parts = [int(k) for k in key] + [0] * (6 - len(key))
    if any(k < 0 for k in parts):
        raise ValueError(f"seeds and indices must be non-negative integers, got {tuple(key)}")
    return np.random.default_rng(parts)


# ---------------------------------------------------------------------------------------------
# Public records
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StainStyle:
    """Colour of one study: stain OD vectors, stain strengths and glass brightness."""

    h_od: np.ndarray        # (3,) unit haematoxylin OD vector
    e_od: np.ndarray        # (3,) unit eosin OD vector
    h_scale: float          # multiplies haematoxylin concentration (staining time / dye batch)
    e_scale: float
    background: np.ndarray  # (3,) transmitted light through empty glass, 0-255


@dataclass
class SyntheticPatch:
    """One rendered patch and its ground truth."""

    image: np.ndarray        # (H, W, 3) uint8 RGB
    label: int
    study: int
    morphology: np.ndarray   # (len(MORPHOLOGY_FEATURES),) float64

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]

    def morphology_dict(self) -> dict[str, float]:
        return dict(zip(MORPHOLOGY_FEATURES, map(float, self.morphology)))


# ---------------------------------------------------------------------------------------------
# Rasterisation helpers
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a size x size raster, in reference-grid units."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (REF_SIZE / size)).astype(np.float32)
    c.setflags(write=False)
    return c[:, None], c[None, :]


def _noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth unit-variance-ish noise with ``cells`` features across the field, at ``size`` px."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@dataclass
class _Gland:
    """A closed epithelial ring: a rotated ellipse with a Fourier-perturbed boundary."""

    cx: float
    cy: float
    ax: float
    ay: float
    rot: float
    thickness: float           # epithelium thickness, ref px
    amp: np.ndarray            # boundary harmonic amplitudes, k = 2..
    phase: np.ndarray

    @property
    def inner(self) -> float:  # normalised radius where the lumen starts
        return max(0.15, 1.0 - self.thickness / math.sqrt(self.ax * self.ay))

    def _boundary(self, cos1: np.ndarray, sin1: np.ndarray) -> np.ndarray:
        """Boundary radius factor 1 + sum_k amp_k cos(k theta + phase_k), from cos/sin of theta."""
        out = np.ones_like(cos1)
        ck, sk = cos1, sin1
        for k in range(2, 2 + len(self.amp)):  # angle-addition recurrence: no trig per pixel
            ck, sk = ck * cos1 - sk * sin1, sk * cos1 + ck * sin1
            i = k - 2
            out += self.amp[i] * (ck * math.cos(self.phase[i]) - sk * math.sin(self.phase[i]))
        return out

    def rho(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius: < inner in the lumen, [inner, 1) in epithelium, >= 1 outside."""
        c, s = math.cos(self.rot), math.sin(self.rot)
        dx, dy = x - self.cx, y - self.cy
        un, vn = (dx * c + dy * s) / self.ax, (-dx * s + dy * c) / self.ay
        r = np.maximum(np.sqrt(un * un + vn * vn), 1e-6)
        return r / self._boundary(un / r, vn / r)

    def point(self, theta: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = rho * self._boundary(np.cos(theta), np.sin(theta))
        u, v = r * np.cos(theta) * self.ax, r * np.sin(theta) * self.ay
        c, s = math.cos(self.rot), math.sin(self.rot)
        return self.cx + u * c - v * s, self.cy + u * s + v * c

    @property
    def reach(self) -> float:
        return max(self.ax, self.ay) * (1.0 + float(np.abs(self.amp).sum())) + 2.0


class _Canvas:
    """Stain-concentration layers of one patch, in reference-grid geometry, rasterised at ``size``."""

    def __init__(self, size: int):
        self.size = size
        self.scale = size / REF_SIZE
        shape = (size, size)
        self.eosin = np.zeros(shape, np.float32)
        self.haem = np.zeros(shape, np.float32)     # non-nuclear haematoxylin (cytoplasm, mucin, dust)
        self.white = np.zeros(shape, np.float32)    # 1 = empty (lumen, vacuole, cleft)
        self.epithelium = np.zeros(shape, np.float32)
        self.debris = np.zeros(shape, np.float32)
        self.glands: list[_Gland] = []
        self._nuclei: list[np.ndarray] = []         # rows: x, y, a, b, theta, intensity, rim, counted
        self._vacuoles: list[np.ndarray] = []

    # -- nuclei ---------------------------------------------------------------------------------
    def add_nuclei(self, x, y, a, b, theta, intensity, rim, counted: bool = True, keep_in_lumen=False):
        x, y, a, b, theta, intensity, rim = np.broadcast_arrays(
            *(np.asarray(v, np.float64) for v in (x, y, a, b, theta, intensity, rim)))
        flags = float(counted) + 2.0 * float(keep_in_lumen)
        self._nuclei.append(np.stack([x, y, a, b, theta, intensity, rim, np.full(x.shape, flags)]))

    def _cull_lumen_nuclei(self, nuc: np.ndarray) -> np.ndarray:
        """Drop cells whose centre lies in any gland lumen (debris is flagged to stay)."""
        keep = nuc[7] >= 2.0
        free = ~keep
        for g in self.glands:
            free[free] = g.rho(nuc[0, free], nuc[1, free]) >= g.inner
        nuc = nuc[:, keep | free]
        nuc[7] %= 2.0
        return nuc

    def add_vacuoles(self, x, y, a, b, theta, strength):
        x, y, a, b, theta, strength = np.broadcast_arrays(
            *(np.asarray(v, np.float64) for v in (x, y, a, b, theta, strength)))
        self._vacuoles.append(np.stack([x, y, a, b, theta, strength, np.zeros_like(x), np.zeros_like(x)]))

    def _splat(self, rows: np.ndarray, value_out: np.ndarray | None, alpha_out: np.ndarray):
        """Rasterise ellipses with anti-aliased edges; overlaps keep the darker value."""
        if rows.shape[1] == 0:
            return
        S, f = self.size, self.scale
        x, y, a, b, th, inten, rim = (rows[i].astype(np.float32) for i in range(7))
        a_px, b_px = np.maximum(a * f, np.float32(0.35)), np.maximum(b * f, np.float32(0.35))
        cx, cy = x * f - 0.5, y * f - 0.5           # pixel-index coordinates of the centre
        reach = np.ceil(a_px + 1.0).astype(np.int64)
        for r in np.unique(reach):                  # group by stamp size to stay vectorised
            sel = reach == r
            off = np.arange(-r, r + 1, dtype=np.int32)
            ox, oy = np.meshgrid(off, off)
            px = np.round(cx[sel])[:, None].astype(np.int32) + ox.ravel()[None]
            py = np.round(cy[sel])[:, None].astype(np.int32) + oy.ravel()[None]
            dx, dy = px - cx[sel, None], py - cy[sel, None]
            c, s = np.cos(th[sel])[:, None], np.sin(th[sel])[:, None]
            u, v = (dx * c + dy * s) / a_px[sel, None], (-dx * s + dy * c) / b_px[sel, None]
            d = np.sqrt(u * u + v * v)
            alpha = np.clip((1.0 - d) * b_px[sel, None] + 0.5, 0.0, 1.0, dtype=np.float32)
            inside = (alpha > 0) & (px >= 0) & (px < S) & (py >= 0) & (py < S)
            flat = (py * S + px)[inside]
            np.maximum.at(alpha_out.reshape(-1), flat, alpha[inside].astype(np.float32))
            if value_out is not None:
                # Vesicular nuclei: chromatin on the membrane, paler centre.
                val = inten[sel, None] * (1.0 - rim[sel, None] * (1.0 - np.minimum(d * d, 1.0))) * alpha
                np.maximum.at(value_out.reshape(-1), flat, val[inside].astype(np.float32))

    # -- output ---------------------------------------------------------------------------------
    def render(self, style: StainStyle, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
        S = self.size
        if self._vacuoles:
            vac = np.zeros((S, S), np.float32)
            rows = np.concatenate(self._vacuoles, axis=1)
            tmp = np.zeros((S, S), np.float32)
            self._splat(rows, tmp, vac)
            self.white = np.maximum(self.white, tmp)
        nuc = self._cull_lumen_nuclei(np.concatenate(self._nuclei, axis=1) if self._nuclei else np.zeros((8, 0)))
        n_val = np.zeros((S, S), np.float32)
        n_alpha = np.zeros((S, S), np.float32)
        self._splat(nuc, n_val, n_alpha)

        # Chromatin texture and fine stromal grain: resolution-dependent, so drawn last.
        grain = _noise(rng, max(8, S // 3), S)
        w = 1.0 - self.white
        haem = self.haem * w * (1.0 - n_alpha) + n_val * (1.0 + 0.22 * grain)
        eosin = self.eosin * w * (1.0 - 0.75 * n_alpha) * (1.0 + 0.08 * grain)
        haem = np.maximum(haem, 0.0) * style.h_scale + 0.015
        eosin = np.maximum(eosin, 0.0) * style.e_scale + 0.02
        od = haem[..., None] * style.h_od.astype(np.float32) + eosin[..., None] * style.e_od.astype(np.float32)
        rgb = style.background.astype(np.float32) * np.exp(od * np.float32(-math.log(10)))
        rgb += rng.standard_normal((S, S, 3), dtype=np.float32) * 1.5  # sensor noise
        image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
        return image, self._morphology(nuc, n_alpha)

    def _morphology(self, nuc: np.ndarray, n_alpha: np.ndarray) -> np.ndarray:
        x, y, a, b = nuc[0], nuc[1], nuc[2], nuc[3]
        counted = (nuc[7] > 0) & (x >= 0) & (x < REF_SIZE) & (y >= 0) & (y < REF_SIZE)
        area = math.pi * a[counted] * b[counted] * MPP * MPP
        n = int(counted.sum())
        solid = (self.white < 0.5) & (n_alpha < 0.5)
        return np.array([
            n / _FIELD_AREA_1E4_UM2,
            float(area.mean()) if n else 0.0,
            float((a[counted] / b[counted]).mean()) if n else 1.0,
            float(area.std() / area.mean()) if n > 1 else 0.0,
            float((n_alpha >= 0.5).mean()),
            float((self.white >= 0.5).mean()),
            float(((self.epithelium >= 0.5) & (self.white < 0.5)).mean()),
            float(((self.eosin >= 0.25) & (self.epithelium < 0.5) & (self.debris < 0.5) & solid).mean()),
            float(((self.debris >= 0.5) & (self.white < 0.5)).mean()),
        ])

    # -- glands ---------------------------------------------------------------------------------
    def add_gland(self, g: _Gland, epi_eosin: float, epi_haem: float):
        """Paint the gland's epithelium and lumen; its cells are added by the caller."""
        f, S = self.scale, self.size
        lo_x, hi_x = int(max(0, (g.cx - g.reach) * f)), int(min(S, math.ceil((g.cx + g.reach) * f)))
        lo_y, hi_y = int(max(0, (g.cy - g.reach) * f)), int(min(S, math.ceil((g.cy + g.reach) * f)))
        self.glands.append(g)
        if lo_x >= hi_x or lo_y >= hi_y:
            return
        yy, xx = _grid(S)
        rho = g.rho(xx[:, lo_x:hi_x], yy[lo_y:hi_y])
        r_px = math.sqrt(g.ax * g.ay) * f
        epi = np.clip((1.0 - rho) * r_px + 0.5, 0, 1).astype(np.float32)
        lumen = np.clip((g.inner - rho) * r_px + 0.5, 0, 1).astype(np.float32)
        win = (slice(lo_y, hi_y), slice(lo_x, hi_x))
        self.eosin[win] = self.eosin[win] * (1 - epi) + epi_eosin * epi
        self.haem[win] = self.haem[win] * (1 - epi) + epi_haem * epi
        self.epithelium[win] = np.maximum(self.epithelium[win], epi * (1 - lumen))
        self.white[win] = np.maximum(self.white[win], lumen * 0.97)


# ---------------------------------------------------------------------------------------------
# Tissue recipes: each paints one class on a canvas from a generator and a grade in [0, 1]
# ---------------------------------------------------------------------------------------------
def _fibres(rng: np.random.Generator, size: int, angle: float, period: float, waviness: float) -> np.ndarray:
    """Wavy collagen bundles along ``angle``: 0 between fibres, 1 on them."""
    yy, xx = _grid(size)
    warp = _noise(rng, 5, size) * waviness
    t = xx * math.cos(angle) + yy * math.sin(angle)
    n = -xx * math.sin(angle) + yy * math.cos(angle)
    phase = (n + warp) * (2 * math.pi / period) + 0.3 * np.sin(t * (2 * math.pi / (period * 9)))
    # Bundles fade in and out along their length instead of running as perfect stripes.
    strength = np.clip(0.65 + 0.45 * _noise(rng, 7, size), 0, 1)
    return (0.5 + 0.5 * np.sin(phase)) ** 2 * strength


def _uniform_points(rng, n, lo=-8.0, hi=REF_SIZE + 8.0):
    return rng.uniform(lo, hi, n), rng.uniform(lo, hi, n)


def _scatter_lymphocytes(c: _Canvas, rng, n: int, counted=True):
    x, y = _uniform_points(rng, n)
    r = rng.uniform(4.2, 5.6, n)
    c.add_nuclei(x, y, r, r * rng.uniform(0.85, 1.0, n), rng.uniform(0, math.pi, n),
                 rng.uniform(1.0, 1.25, n), 0.05, counted)


def _place_glands(rng, count: int, r_lo: float, r_hi: float, min_gap: float, tries: int = 60,
                  central_first: bool = False):
    """Rejection-sample gland centres and radii so rings overlap little."""
    placed: list[tuple[float, float, float]] = []
    for t in range(tries):
        if len(placed) == count:
            break
        r = rng.uniform(r_lo, r_hi)
        if central_first and t == 0:  # guarantees the class-defining structure is in the field
            x, y = rng.uniform(0.3 * REF_SIZE, 0.7 * REF_SIZE, 2)
        else:
            x, y = rng.uniform(-0.3 * r, REF_SIZE + 0.3 * r, 2)
        if all(math.hypot(x - px, y - py) > r + pr + min_gap for px, py, pr in placed):
            placed.append((x, y, r))
    return placed


def _paint_stroma(c: _Canvas, rng, grade: float, base: float, nuclei: int):
    angle = rng.uniform(0, math.pi)
    fib = 0.8 * _fibres(rng, c.size, angle, rng.uniform(7, 12), rng.uniform(8, 16))
    fib += 0.2 * _fibres(rng, c.size, angle + rng.normal(0, 0.15), rng.uniform(5, 8), rng.uniform(8, 16))
    c.eosin[:] = base + 0.3 * fib + 0.05 * _noise(rng, 12, c.size)
    c.haem[:] = 0.02
    # Loose areas between bundles open up into thin clefts.
    cleft = _smoothstep((_noise(rng, 6, c.size) - 1.2 + 0.4 * grade) * 3.0) * (1.0 - fib)
    c.white[:] = np.maximum(c.white, 0.9 * cleft)
    x, y = _uniform_points(rng, nuclei)
    a = rng.uniform(7.0, 12.0, nuclei)
    c.add_nuclei(x, y, a, a * rng.uniform(0.2, 0.32, nuclei), angle + rng.normal(0, 0.15, nuclei),
                 rng.uniform(0.7, 0.95, nuclei), 0.1)
    return angle


def _stroma(c: _Canvas, rng, grade: float):
    _paint_stroma(c, rng, grade, base=rng.uniform(0.32, 0.45), nuclei=int(12 + 30 * grade))
    _scatter_lymphocytes(c, rng, int(rng.integers(0, 8)))


def _lymphocytes(c: _Canvas, rng, grade: float):
    c.eosin[:] = 0.22 + 0.06 * _noise(rng, 10, c.size)
    c.haem[:] = 0.06
    _scatter_lymphocytes(c, rng, int(340 + 200 * grade))
    n = int(rng.integers(4, 16))  # tingible-body macrophages / larger blasts: pale, vesicular
    x, y = _uniform_points(rng, n)
    r = rng.uniform(7, 9.5, n)
    c.add_nuclei(x, y, r, r * rng.uniform(0.7, 0.95, n), rng.uniform(0, math.pi, n), 0.6, 0.45)


def _necrosis(c: _Canvas, rng, grade: float):
    blot = _noise(rng, 9, c.size)
    debris = _smoothstep((blot + 0.6 - 0.6 * grade) * 1.5)
    c.debris[:] = debris
    c.eosin[:] = (0.36 + 0.08 * _noise(rng, 20, c.size)) * (1 - 0.45 * debris)
    c.haem[:] = 0.03 + 0.11 * debris * (1 + 0.5 * _noise(rng, 40, c.size))
    c.white[:] = 0.9 * _smoothstep((_noise(rng, 9, c.size) - 1.6) * 3)
    # Karyorrhexis: clouds of dark fragments, denser in the debris.
    n = int(180 + 260 * grade)
    k = int(rng.integers(3, 7))
    centres = rng.uniform(0, REF_SIZE, (k, 2))
    pick = rng.integers(0, k, n)
    x = centres[pick, 0] + rng.normal(0, 28, n)
    y = centres[pick, 1] + rng.normal(0, 28, n)
    r = rng.uniform(1.0, 2.8, n)
    c.add_nuclei(x, y, r, r * rng.uniform(0.6, 1.0, n), rng.uniform(0, math.pi, n), rng.uniform(0.8, 1.3, n), 0.0)
    m = int(rng.integers(10, 30))  # ghost nuclei: faint outlines of dead cells
    x, y = _uniform_points(rng, m)
    r = rng.uniform(5, 8, m)
    c.add_nuclei(x, y, r, r * rng.uniform(0.6, 0.95, m), rng.uniform(0, math.pi, m), 0.22, 0.0)


def _adipose(c: _Canvas, rng, grade: float):
    S = c.size
    d = rng.uniform(70, 120) * (1.1 - 0.2 * grade)
    step = np.arange(-1.5 * d, REF_SIZE + 1.5 * d, d)
    gx, gy = np.meshgrid(step, step)
    seeds = np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.35 * d, 0.35 * d, (gx.size, 2))
    yy, xx = _grid(S)
    d1 = np.full((S, S), np.inf, np.float32)
    d2 = np.full((S, S), np.inf, np.float32)
    for sx, sy in seeds:  # two nearest seeds per pixel -> Voronoi cell walls
        dist = (xx - np.float32(sx)) ** 2 + (yy - np.float32(sy)) ** 2
        d2 = np.minimum(d2, np.maximum(d1, dist))
        d1 = np.minimum(d1, dist)
    wall_dist = np.sqrt(d2) - np.sqrt(d1) + 2.0 * _noise(rng, 8, S)
    thick = rng.uniform(2.2, 3.6)
    wall = np.clip((thick - wall_dist) * c.scale * 0.5 + 0.5, 0, 1)
    c.eosin[:] = 0.5 * wall
    c.haem[:] = 0.02
    c.white[:] = 0.98 * (1 - wall)
    # A few flattened nuclei on the walls, placed on bisectors of neighbouring seeds.
    n = int(rng.integers(1, 7))
    i = rng.integers(0, len(seeds), n)
    dist = np.hypot(*(seeds[:, None, :] - seeds[None, i, :]).transpose(2, 0, 1))
    dist[i, np.arange(n)] = np.inf
    j = dist.argmin(0)
    mid = 0.5 * (seeds[i] + seeds[j])
    normal = np.arctan2(seeds[j, 1] - seeds[i, 1], seeds[j, 0] - seeds[i, 0])
    along = rng.uniform(-0.2, 0.2, n) * d
    x = mid[:, 0] - np.sin(normal) * along
    y = mid[:, 1] + np.cos(normal) * along
    a = rng.uniform(6, 9, n)
    c.add_nuclei(x, y, a, a * 0.3, normal + math.pi / 2, 0.8, 0.1)


def _normal_mucosa(c: _Canvas, rng, grade: float):
    # Lamina propria: loose pink stroma rich in lymphocytes and plasma cells.
    c.eosin[:] = 0.3 + 0.05 * _noise(rng, 10, c.size)
    c.haem[:] = 0.05
    for cx, cy, r in _place_glands(rng, int(rng.integers(4, 9)), 34, 48, min_gap=rng.uniform(6, 16)):
        g = _Gland(cx, cy, r * rng.uniform(0.9, 1.1), r * rng.uniform(0.9, 1.1), rng.uniform(0, math.pi),
                   thickness=rng.uniform(13, 19), amp=rng.normal(0, 0.025, 3), phase=rng.uniform(0, 6.3, 3))
        c.add_gland(g, epi_eosin=0.3, epi_haem=0.08)
        # One columnar cell every ~6 px of basement membrane; nucleus basal and radial.
        n = int(2 * math.pi * r / rng.uniform(5.0, 6.2))
        theta = np.linspace(0, 2 * math.pi, n, endpoint=False) + rng.normal(0, 0.02, n)
        rho = 1 - (1 - g.inner) * rng.uniform(0.18, 0.4, n)
        x, y = g.point(theta, rho)
        radial = np.arctan2(y - g.cy, x - g.cx)
        a = rng.uniform(4.8, 6.3, n)
        c.add_nuclei(x, y, a, a * rng.uniform(0.42, 0.55, n), radial + rng.normal(0, 0.08, n),
                     rng.uniform(0.8, 1.0, n), 0.15)
        # Goblet cells: mucin vacuoles on the luminal side, between every few nuclei.
        m = int(n * rng.uniform(0.2, 0.35))
        theta = rng.uniform(0, 2 * math.pi, m)
        x, y = g.point(theta, 1 - (1 - g.inner) * rng.uniform(0.55, 0.75, m))
        c.add_vacuoles(x, y, rng.uniform(4, 6, m), rng.uniform(3, 4.5, m), np.arctan2(y - g.cy, x - g.cx), 0.85)
    _scatter_lymphocytes(c, rng, int(40 + 40 * grade))
    n = int(rng.integers(8, 20))  # plasma cells: eccentric round nuclei with clock-face chromatin
    x, y = _uniform_points(rng, n)
    r = rng.uniform(4.5, 5.5, n)
    c.add_nuclei(x, y, r, r * 0.9, 0.0, 0.9, 0.35)


def _tumor(c: _Canvas, rng, grade: float):
    # Desmoplastic stroma between crowded, irregular, back-to-back glands.
    _paint_stroma(c, rng, 0.0, base=0.3, nuclei=int(rng.integers(3, 10)))
    for cx, cy, r in _place_glands(rng, int(rng.integers(3, 7)), 40, 75, min_gap=rng.uniform(-12, 4), tries=120,
                                   central_first=True):
        g = _Gland(cx, cy, r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3), rng.uniform(0, math.pi),
                   thickness=rng.uniform(20, 36) * (0.8 + 0.5 * grade),
                   amp=rng.normal(0, 0.05 + 0.07 * grade, 4), phase=rng.uniform(0, 6.3, 4))
        c.add_gland(g, epi_eosin=0.28, epi_haem=0.16)
        # Stratified, crowded, pleomorphic nuclei filling the epithelium.
        band = (1 - g.inner) * math.sqrt(g.ax * g.ay)
        n = int(2 * math.pi * r * band / rng.uniform(95, 130))
        theta = rng.uniform(0, 2 * math.pi, n)
        rho = g.inner + (1 - g.inner) * rng.uniform(0.08, 0.95, n)
        x, y = g.point(theta, rho)
        a = np.clip(rng.uniform(7.5, 10.5, n) * np.exp(rng.normal(0, 0.12 + 0.15 * grade, n)), 5, 17)
        hyper = rng.random(n) < 0.25
        c.add_nuclei(x, y, a, a * rng.uniform(0.5, 0.85, n),
                     np.arctan2(y - g.cy, x - g.cx) + rng.normal(0, 0.6, n),
                     np.where(hyper, rng.uniform(1.0, 1.2, n), rng.uniform(0.6, 0.85, n)),
                     np.where(hyper, 0.1, 0.5))
        if rng.random() < 0.5:  # "dirty necrosis" in the lumen
            m = int(rng.integers(10, 40))
            x, y = g.point(rng.uniform(0, 2 * math.pi, m), rng.uniform(0, 0.7, m) * g.inner)
            r2 = rng.uniform(1.0, 2.5, m)
            c.add_nuclei(x, y, r2, r2, 0.0, 1.0, 0.0, counted=False, keep_in_lumen=True)


_RECIPES = (_tumor, _normal_mucosa, _stroma, _lymphocytes, _necrosis, _adipose)
assert len(_RECIPES) == len(CLASS_NAMES)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------
class SyntheticTissue:
    """Deterministic synthetic H&E generator.

    Args:
        seed: master seed; every output is a pure function of it and the call's arguments.
        n_studies: number of studies (staining sites), each with its own :class:`StainStyle`.
        image_size: side of rendered patches in pixels (the field of view is always 128 um).
        stain_variation: strength of the between-study colour shift (0 = all studies identical).

    Patch ``index`` has class ``index % n_classes`` and study ``(index // n_classes) % n_studies``
    unless overridden, so any contiguous range of indices is balanced over classes and studies.
    """

    def __init__(self, seed: int = 0, n_studies: int = 4, image_size: int = 256, stain_variation: float = 1.0):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if int(n_studies) < 1:
            raise ValueError(f"n_studies must be >= 1, got {n_studies}")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 px, got {image_size}")
        self.seed, self.n_studies, self.image_size = int(seed), int(n_studies), int(image_size)
        self.stain_variation = float(stain_variation)
        self.styles = tuple(self._study_style(s) for s in range(self.n_studies))

    @property
    def n_classes(self) -> int:
        return len(CLASS_NAMES)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(seed={self.seed}, n_studies={self.n_studies}, "
                f"image_size={self.image_size}, stain_variation={self.stain_variation})")

    # -- studies ----------------------------------------------------------------------------------
    def _study_style(self, study: int) -> StainStyle:
        rng = keyed_rng(self.seed, _S_STUDY, study)
        v = self.stain_variation

        def tilt(vec):
            out = np.abs(vec + rng.normal(0, 0.07 * v, 3))
            return out / np.linalg.norm(out)

        return StainStyle(
            h_od=tilt(_H_OD), e_od=tilt(_E_OD),
            h_scale=float(np.exp(rng.normal(0, 0.22 * v))), e_scale=float(np.exp(rng.normal(0, 0.22 * v))),
            background=np.clip(250 - np.abs(rng.normal(0, 8 * v, 3)), 200, 255),
        )

    def _check_study(self, study: int) -> int:
        if not 0 <= int(study) < self.n_studies:
            raise ValueError(f"study must lie in [0, {self.n_studies}), got {study}")
        return int(study)

    # -- patches ----------------------------------------------------------------------------------
    def patch(self, index: int, label: int | str | None = None, study: int | None = None) -> SyntheticPatch:
        """Render patch ``index`` (optionally forcing its class and/or study)."""
        index = int(index)
        if index < 0:
            raise IndexError(f"patch index must be >= 0, got {index}")
        label = index % self.n_classes if label is None else self._check_label(label)
        study = (index // self.n_classes) % self.n_studies if study is None else self._check_study(study)
        # The key omits label and study: forcing a study recolours the same tissue.
        return self._render(keyed_rng(self.seed, _S_PATCH, index), label, study)

    def patches(self, indices: Sequence[int]) -> list[SyntheticPatch]:
        """Render several patches with their default class and study."""
        return [self.patch(i) for i in indices]

    def _check_label(self, label: int | str) -> int:
        if isinstance(label, str):
            if label not in CLASS_NAMES:
                raise ValueError(f"unknown class {label!r}; expected one of {CLASS_NAMES}")
            return CLASS_NAMES.index(label)
        if not 0 <= int(label) < self.n_classes:
            raise ValueError(f"label must lie in [0, {self.n_classes}), got {label}")
        return int(label)

    def _render(self, rng: np.random.Generator, label: int, study: int, size: int | None = None) -> SyntheticPatch:
        base = self.styles[study]
        # Within-study, slide-to-slide jitter: much smaller than the between-study shift.
        jitter = rng.normal(0, 1, 5)
        style = StainStyle(
            h_od=base.h_od, e_od=base.e_od,
            h_scale=base.h_scale * float(np.exp(0.05 * jitter[0])),
            e_scale=base.e_scale * float(np.exp(0.05 * jitter[1])),
            background=np.clip(base.background + 1.5 * jitter[2:], 0, 255),
        )
        canvas = _Canvas(size or self.image_size)
        _RECIPES[label](canvas, rng, float(rng.uniform()))
        image, morphology = canvas.render(style, rng)
        return SyntheticPatch(image, label, study, morphology)
