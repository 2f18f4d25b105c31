"""Tissue patching of whole-slide images into CLAM-format coordinate files.

For each slide: segment tissue at a low-resolution level, lay a regular patch grid over the
tissue, keep the patches whose tissue fraction reaches ``min_tissue``, and write
``coords/{slide_id}.h5`` (dataset ``coords``: (N, 2) int64 level-0 top-left x, y) plus a QC
thumbnail. :func:`process_slides` runs a folder of slides with a process pool, never stops on
a bad slide, skips slides already done, and writes ``summary.csv``.
"""
from __future__ import annotations

import csv
import json
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dino.data.wsi.segmentation import BIOPSY_PRESET, SegmentationParams, TissueSegmentation, segment_tissue
from dino.atomic import atomic_write

try:  # openslide and opencv are part of the optional "wsi" extra
    import openslide
except ImportError:  # pragma: no cover - exercised only without the extra
    openslide = None
try:
    import cv2
except ImportError:  # pragma: no cover
    cv2 = None

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")
SUMMARY_FIELDS = ("slide_id", "status", "n_patches", "seconds", "error", "slide_path")
STATUSES = ("done", "skipped_existing", "no_tissue", "failed")
# Convention used to turn a magnification into a pixel size when the slide does not report
# its objective power: 10x ~ 1.0 um/px, so 20x ~ 0.5 and 40x ~ 0.25.
MPP_AT_10X = 1.0


# --------------------------------------------------------------------------- slide access
def open_slide(path):
    """Open a slide with OpenSlide, with an error that names the file when it is unreadable."""
    if openslide is None:
        raise ImportError("reading slides needs openslide: pip install 'mvhybrid[wsi]'")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"slide not found: {path}")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as err:
        raise ValueError(f"cannot read slide {path}: {type(err).__name__}: {err}") from err


def slide_mpp(slide):
    """Level-0 microns per pixel from ``openslide.mpp-x`` (None when the slide has none)."""
    value = slide.properties.get("openslide.mpp-x")
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if mpp > 0 else None


def level_downsample(slide, level):
    """(x, y) downsample of ``level`` measured from the level dimensions, as CLAM does."""
    w0, h0 = slide.level_dimensions[0]
    w, h = slide.level_dimensions[level]
    return (w0 / w, h0 / h)


def to_rgb(region: Image.Image) -> Image.Image:
    """RGBA from ``read_region`` -> RGB, with transparent pixels (outside the scan) made white."""
    if region.mode != "RGBA":
        return region.convert("RGB")
    alpha = region.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return region.convert("RGB")
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, region).convert("RGB")


def read_patch(slide, xy, level, read_size, out_size=None) -> Image.Image:
    """Read a square patch at level-0 top-left ``xy`` and ``level`` as RGB, resized to ``out_size``."""
    img = to_rgb(slide.read_region((int(xy[0]), int(xy[1])), int(level), (int(read_size), int(read_size))))
    if out_size is not None and img.size != (out_size, out_size):
        img = img.resize((out_size, out_size), Image.BICUBIC)
    return img


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class PatchGeometry:
    """Where and how big one patch is: read ``read_size`` px at ``level``, resize to ``target_size``."""

    level: int
    read_size: int
    target_size: int
    level0_size: int
    level0_step: int
    downsample: tuple  # of ``level``, (x, y)
    mpp: float | None  # level-0 microns per pixel, if the slide reports it
    target_mpp: float | None


def resolve_geometry(slide, patch_size=256, step_size=None, patch_level=0, target_mpp=None, target_mag=None):
    """Choose the read level and sizes for a patch grid.

    By default patches are ``patch_size`` px at ``patch_level`` (CLAM). With ``target_mpp`` (or
    ``target_mag``, converted with the slide's objective power, else 10x = 1 um/px) the output
    patch covers ``patch_size * target_mpp`` microns: it is read at the highest-downsample level
    that is still at least as fine as the target, then resized to ``patch_size``.
    """
    step_size = patch_size if step_size is None else step_size
    if patch_size <= 0 or step_size <= 0:
        raise ValueError(f"patch_size and step_size must be positive, got {patch_size}, {step_size}")
    mpp = slide_mpp(slide)
    if target_mpp is not None and target_mag is not None:
        raise ValueError("give either target_mpp or target_mag, not both")
    if target_mpp is None and target_mag is None:
        if not 0 <= patch_level < slide.level_count:
            raise ValueError(f"patch_level {patch_level} out of range: slide has {slide.level_count} levels")
        ds = level_downsample(slide, patch_level)
        return PatchGeometry(
            level=patch_level, read_size=patch_size, target_size=patch_size,
            level0_size=int(round(patch_size * ds[0])), level0_step=int(round(step_size * ds[0])),
            downsample=ds, mpp=mpp, target_mpp=None if mpp is None else mpp * ds[0],
        )
    if target_mag is not None:
        power = slide.properties.get("openslide.objective-power")
        if power is not None and float(power) > 0:
            target_ds = float(power) / float(target_mag)
        elif mpp is not None:
            target_ds = (MPP_AT_10X * 10.0 / float(target_mag)) / mpp
        else:
            raise ValueError("target magnification needs openslide.objective-power or openslide.mpp-x; the slide has neither")
        target_mpp = None if mpp is None else mpp * target_ds
    else:
        if mpp is None:
            raise ValueError("target_mpp needs the slide's openslide.mpp-x property, which is missing")
        target_ds = float(target_mpp) / mpp
    # Best level: the coarsest one that is not coarser than the target (never upsample).
    level = max(
        (lvl for lvl, d in enumerate(slide.level_downsamples) if d <= target_ds * (1 + 1e-3)), default=0
    )
    ds = level_downsample(slide, level)
    level0_size = int(round(patch_size * target_ds))
    return PatchGeometry(
        level=level, read_size=max(1, int(round(level0_size / ds[0]))), target_size=patch_size,
        level0_size=level0_size, level0_step=max(1, int(round(step_size * target_ds))),
        downsample=ds, mpp=mpp, target_mpp=None if target_mpp is None else float(target_mpp),
    )


def patch_grid(mask: np.ndarray, mask_downsample, level0_dims, level0_size, level0_step, min_tissue=0.5):
    """Top-left level-0 coordinates of grid patches whose tissue fraction is >= ``min_tissue``.

    ``mask`` is a 0/1 tissue mask whose pixels are ``mask_downsample`` (x, y) level-0 px. The
    grid starts at (0, 0) with stride ``level0_step``; a patch may run over the slide edge
    (read as white, counted as background). Returns ((N, 2) int64 coords, (N,) fractions).
    """
    if not 0 < min_tissue <= 1:
        raise ValueError(f"min_tissue must be in (0, 1], got {min_tissue}")
    w0, h0 = level0_dims
    xs = np.arange(0, w0, level0_step, dtype=np.int64)
    ys = np.arange(0, h0, level0_step, dtype=np.int64)
    if mask.sum() == 0 or xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros((0,), np.float64)
    integral = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    mh, mw = mask.shape

    def bounds(starts, ds, limit):
        lo = np.floor(starts / ds + 0.5).astype(np.int64)
        hi = np.maximum(lo + 1, np.floor((starts + level0_size) / ds + 0.5).astype(np.int64))
        return np.clip(lo, 0, limit), np.clip(hi, 0, limit), hi - lo

    x0, x1, wx = bounds(xs, mask_downsample[0], mw)
    y0, y1, wy = bounds(ys, mask_downsample[1], mh)
    # Tissue pixels in every (row, col) cell via the summed-area table, normalised by the
    # full (unclipped) footprint so that off-slide area counts as background.
    inside = (
        integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
    )
    frac = inside / (wy[:, None] * wx[None, :]).astype(np.float64)
    rows, cols = np.nonzero(frac >= min_tissue - 1e-9)
    coords = np.stack([xs[cols], ys[rows]], axis=1)
    return coords.astype(np.int64), frac[rows, cols]


# --------------------------------------------------------------------------- coords files
def write_coords_h5(path, coords: np.ndarray, attrs: dict):
    """Write a CLAM-format coords file atomically (temp file in the same folder, then replace)."""
    import h5py

    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        for key, value in attrs.items():
            if value is not None:
                dset.attrs[key] = value


def read_coords_h5(path):
    """Read a coords file: returns ((N, 2) int64 coords, dict of the ``coords`` attributes)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise KeyError(f"{path} has no 'coords' dataset (keys: {sorted(f.keys())})")
            dset = f["coords"]
            coords = np.asarray(dset[()], dtype=np.int64)
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dset.attrs.items()}
    except OSError as err:
        raise ValueError(f"cannot read coords file {path}: {err}") from err
    if coords.ndim != 2 or coords.shape[1] != 2:
        if coords.size == 0:
            coords = coords.reshape(0, 2)
        else:
            raise ValueError(f"{path}: 'coords' must have shape (N, 2), got {coords.shape}")
    for key in ("patch_size", "patch_level"):
        if key not in attrs:
            raise KeyError(f"{path}: 'coords' is missing the CLAM attribute '{key}'")
    return coords, attrs


def coords_complete(path) -> bool:
    """True if ``path`` is a readable coords file (files are written atomically, so present = complete)."""
    try:
        read_coords_h5(path)
    except (OSError, ValueError, KeyError):
        return False
    return True


# --------------------------------------------------------------------------- thumbnails
def draw_thumbnail(rgb: np.ndarray, seg: TissueSegmentation, coords, level0_size, max_size=2048):
    """QC image: tissue contours in green, holes in blue, kept patches outlined in red."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_size / max(h, w))
    img = np.ascontiguousarray(rgb)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    img = img.copy()
    thick = max(1, int(round(max(img.shape[:2]) / 500)))

    def fit(c):
        return np.round(c.astype(np.float64) * scale).astype(np.int32)

    cv2.drawContours(img, [fit(c) for c in seg.contours], -1, (0, 255, 0), thick)
    cv2.drawContours(img, [fit(h) for hs in seg.holes for h in hs], -1, (0, 0, 255), thick)
    # Coords are level 0; the thumbnail is the segmentation image times `scale`.
    sx, sy = scale / seg.downsample[0], scale / seg.downsample[1]
    for x, y in np.asarray(coords):
        p0 = (int(x * sx), int(y * sy))
        p1 = (int((x + level0_size) * sx), int((y + level0_size) * sy))
        cv2.rectangle(img, p0, p1, (255, 0, 0), 1)
    return img


def _save_png_atomic(img: Image.Image, path: Path):
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


# --------------------------------------------------------------------------- one slide
@dataclass
class PatchingConfig:
    """Everything that decides which patches a slide yields (defaults: CLAM biopsy, 256 px at level 0)."""

    patch_size: int = 256
    step_size: int | None = None  # None: equal to patch_size (no overlap)
    patch_level: int = 0
    target_mpp: float | None = None
    target_mag: float | None = None
    min_tissue: float = 0.5
    seg: SegmentationParams = field(default_factory=lambda: BIOPSY_PRESET)
    save_png: bool = False
    save_thumbnail: bool = True
    thumbnail_size: int = 2048


@dataclass
class SlideResult:
    """One row of ``summary.csv``."""

    slide_id: str
    status: str
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    slide_path: str = ""


def slide_id_of(path) -> str:
    """Slide id = file name without its extension (CLAM convention)."""
    return Path(path).stem


def output_paths(out_dir, slide_id):
    out_dir = Path(out_dir)
    return {
        "coords": out_dir / "coords" / f"{slide_id}.h5",
        "thumbnail": out_dir / "thumbnails" / f"{slide_id}.png",
        "patches": out_dir / "patches" / slide_id,
    }


def _segmentation_view(slide, seg_level):
    level = seg_level if seg_level >= 0 else slide.level_count + seg_level
    if not 0 <= level < slide.level_count:
        raise ValueError(f"seg_level {seg_level} out of range: slide has {slide.level_count} levels")
    region = slide.read_region((0, 0), level, slide.level_dimensions[level])
    return np.asarray(to_rgb(region)), level_downsample(slide, level)


def patch_slide(slide_path, out_dir, cfg: PatchingConfig) -> SlideResult:
    """Segment and patch one slide; writes its coords file, thumbnail and optional PNGs."""
    slide_id = slide_id_of(slide_path)
    paths = output_paths(out_dir, slide_id)
    slide = open_slide(slide_path)
    try:
        geom = resolve_geometry(slide, cfg.patch_size, cfg.step_size, cfg.patch_level, cfg.target_mpp, cfg.target_mag)
        rgb, ds = _segmentation_view(slide, cfg.seg.seg_level)
        seg = segment_tissue(rgb, ds, cfg.seg)
        coords = np.zeros((0, 2), np.int64)
        if not seg.empty:
            coords, _ = patch_grid(seg.mask(), ds, slide.level_dimensions[0], geom.level0_size, geom.level0_step, cfg.min_tissue)
        if cfg.save_thumbnail:
            thumb = draw_thumbnail(rgb, seg, coords, geom.level0_size, cfg.thumbnail_size)
            _save_png_atomic(Image.fromarray(thumb), paths["thumbnail"])
        if len(coords) == 0:
            return SlideResult(slide_id, "no_tissue", 0, slide_path=str(slide_path))
        if cfg.save_png:
            paths["patches"].mkdir(parents=True, exist_ok=True)
            for x, y in coords:
                img = read_patch(slide, (x, y), geom.level, geom.read_size, geom.target_size)
                _save_png_atomic(img, paths["patches"] / f"{slide_id}_x{x}_y{y}.png")
        level_dim = tuple(int(v) for v in slide.level_dimensions[geom.level])
        attrs = {
            # CLAM attributes: read `patch_size` px at `patch_level` from each level-0 coordinate.
            "patch_size": geom.read_size,
            "patch_level": geom.level,
            "downsample": np.asarray(geom.downsample, dtype=np.float64),
            "downsampled_level_dim": np.asarray(level_dim, dtype=np.int64),
            "level_dim": np.asarray(level_dim, dtype=np.int64),
            "name": slide_id,
            # Extras: output size after resizing, footprint at level 0, resolution.
            "target_patch_size": geom.target_size,
            "level0_patch_size": geom.level0_size,
            "level0_step_size": geom.level0_step,
            "min_tissue": float(cfg.min_tissue),
            "mpp": geom.mpp,
            "target_mpp": geom.target_mpp,
        }
        write_coords_h5(paths["coords"], coords, attrs)
        return SlideResult(slide_id, "done", int(len(coords)), slide_path=str(slide_path))
    finally:
        slide.close()


def _patch_slide_safely(slide_path, out_dir, cfg: PatchingConfig, skip_existing: bool) -> SlideResult:
    """Never raises: any error becomes a ``failed`` row with its message."""
    start = time.perf_counter()
    slide_id = slide_id_of(slide_path)
    coords_path = output_paths(out_dir, slide_id)["coords"]
    try:
        if skip_existing and coords_complete(coords_path):
            coords, _ = read_coords_h5(coords_path)
            result = SlideResult(slide_id, "skipped_existing", int(len(coords)), slide_path=str(slide_path))
        else:
            result = patch_slide(slide_path, out_dir, cfg)
    except Exception as err:  # noqa: BLE001 - one bad slide must not stop the batch
        detail = traceback.format_exception_only(type(err), err)[-1].strip()
        result = SlideResult(slide_id, "failed", 0, error=detail, slide_path=str(slide_path))
    result.seconds = round(time.perf_counter() - start, 3)
    return result


# --------------------------------------------------------------------------- batch driver
def find_slides(slide_dir, extensions=SLIDE_EXTENSIONS):
    """Sorted slide files under ``slide_dir`` (recursive); errors on duplicate slide ids."""
    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        raise FileNotFoundError(f"slide folder not found: {slide_dir}")
    exts = {e.lower() for e in extensions}
    found = sorted(p for p in slide_dir.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    by_id = {}
    for p in found:
        by_id.setdefault(slide_id_of(p), []).append(p)
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        listing = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in sorted(dups.items()))
        raise ValueError(f"several slides share an id (file stem), rename them: {listing}")
    return found


def write_summary(path, results):
    """Write ``summary.csv`` atomically, one row per slide, sorted by slide id."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for r in sorted(results, key=lambda r: r.slide_id):
            writer.writerow({k: v for k, v in asdict(r).items() if k in SUMMARY_FIELDS})


def _run_pool(slides, out_dir, cfg, skip_existing, workers, on_result):
    """Process slides in a pool; if a worker dies (e.g. a crash inside a slide decoder), retry
    the unfinished slides one process each so that only the culprit is marked failed."""
    unfinished = list(slides)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_patch_slide_safely, s, out_dir, cfg, skip_existing): s for s in slides}
        try:
            for fut in as_completed(futures):
                on_result(fut.result())
                unfinished.remove(futures[fut])
        except BrokenProcessPool:
            pass
    for s in unfinished:
        with ProcessPoolExecutor(max_workers=1) as pool:
            try:
                result = pool.submit(_patch_slide_safely, s, out_dir, cfg, skip_existing).result()
            except BrokenProcessPool:
                result = SlideResult(slide_id_of(s), "failed", error="worker process crashed while reading the slide", slide_path=str(s))
        on_result(result)


PARAMS_NAME = "patching_params.json"
# Fields that decide the patch grid; output-only switches (PNGs, thumbnails) may change between runs.
_GRID_FIELDS = ("patch_size", "step_size", "patch_level", "target_mpp", "target_mag", "min_tissue", "seg")


def grid_params(cfg: PatchingConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in _GRID_FIELDS}


def check_and_record_params(out_dir, cfg: PatchingConfig, overwrite: bool = False) -> None:
    """Refuse to add slides patched with other grid parameters to ``out_dir`` (their coords would mix
    with the old ones, e.g. 128-px and 64-px patches); record the parameters in ``patching_params.json``.
    With ``overwrite`` every slide is redone, so new parameters are accepted."""
    out_dir = Path(out_dir)
    path = out_dir / PARAMS_NAME
    new = grid_params(cfg)
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
    elif not overwrite:  # an output of a version that did not record parameters: check a coords file
        for h5 in sorted((out_dir / "coords").glob("*.h5"))[:1]:
            try:
                _, attrs = read_coords_h5(h5)
            except (OSError, KeyError, ValueError):
                continue
            size = int(attrs.get("target_patch_size", attrs.get("patch_size", cfg.patch_size)))
            if size != cfg.patch_size:
                old = {"patch_size": size}
    if old is not None and not overwrite:
        diff = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]}
        if diff:
            listed = ", ".join(f"{k}={a!r} there, {b!r} asked" for k, (a, b) in diff.items())
            raise ValueError(f"{out_dir} holds patches made with other parameters ({listed}); "
                             "use another --save-dir, or --overwrite to redo every slide")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(new, f, indent=1, sort_keys=True)


def process_slides(slides, out_dir, cfg: PatchingConfig | None = None, workers=1, skip_existing=True, progress=True):
    """Patch every slide in ``slides`` into ``out_dir``; returns the list of :class:`SlideResult`.

    A slide that cannot be read, or has no tissue, is recorded in ``out_dir/summary.csv`` and
    the batch goes on. With ``skip_existing``, slides with a complete coords file are skipped.
    """
    from tqdm.auto import tqdm

    cfg = cfg or PatchingConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = [Path(s) for s in slides]
    ids = [slide_id_of(s) for s in slides]
    if len(set(ids)) != len(ids):
        raise ValueError("several slides share an id (file stem); slide ids must be unique")
    results = []
    bar = tqdm(total=len(slides), desc="patching slides", unit="slide", disable=not progress)

    def on_result(result):
        results.append(result)
        bar.set_postfix_str(f"{result.slide_id}: {result.status}")
        bar.update(1)

    try:
        if workers <= 1:
            for s in slides:
                on_result(_patch_slide_safely(s, out_dir, cfg, skip_existing))
        else:
            _run_pool(slides, out_dir, cfg, skip_existing, min(workers, len(slides)) or 1, on_result)
    finally:
        bar.close()
        write_summary(out_dir / "summary.csv", results)
    return sorted(results, key=lambda r: r.slide_id)


def summarize(results):
    """Counts per status, for the CLI's closing line."""
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    counts["patches"] = sum(r.n_patches for r in results)
    return counts


__all__ = [
    "PatchGeometry", "PatchingConfig", "SlideResult", "SLIDE_EXTENSIONS", "check_and_record_params", "coords_complete",
    "draw_thumbnail", "grid_params",
    "find_slides", "open_slide", "patch_grid", "patch_slide", "process_slides", "read_coords_h5", "read_patch",
    "resolve_geometry", "slide_mpp", "summarize", "to_rgb", "write_coords_h5", "write_summary",
]
