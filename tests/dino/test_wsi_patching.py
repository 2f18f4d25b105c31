"""Tissue segmentation and patching on generated pyramidal TIFF slides."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openslide", reason="the wsi extra (openslide-python, openslide-bin) is part of the test install")

from dino.data.wsi.patching import (  # noqa: E402
    PatchingConfig,
    find_slides,
    open_slide,
    patch_grid,
    process_slides,
    read_coords_h5,
    resolve_geometry,
)
from dino.data.wsi.pyramid_tiff import write_pyramidal_tiff  # noqa: E402
from dino.data.wsi.segmentation import BIOPSY_PRESET, SegmentationParams, segment_tissue  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZE = 2048
PATCH = 256


def make_tissue(size=SIZE, seed=0):
    """An H&E-like RGB slide on white: one large tissue ellipse with a big hole, one small
    tissue island, one dust speck (below CLAM's area threshold). Returns (rgb, tissue, hole, speck)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    big = ((xx - 900) / 620.0) ** 2 + ((yy - 850) / 480.0) ** 2 < 1
    hole = (xx - 950) ** 2 + (yy - 850) ** 2 < 330**2  # area ~3.4e5 px > a_h * 512^2
    island = (xx - 1640) ** 2 + (yy - 1640) ** 2 < 330**2  # area ~3.4e5 px > a_t * 512^2
    speck = (xx - 200) ** 2 + (yy - 1800) ** 2 < 25**2
    tissue = (big & ~hole) | island
    rgb = np.full((size, size, 3), 245, np.int16)
    rgb += rng.integers(-6, 7, size=rgb.shape).astype(np.int16)  # grey-white scanner noise
    stain = np.array([190, 110, 175], np.int16) + rng.integers(-25, 26, size=(size, size, 3)).astype(np.int16)
    rgb[tissue | speck] = stain[tissue | speck]
    return np.clip(rgb, 0, 255).astype(np.uint8), tissue, hole, speck


def cell_fraction(mask, x, y, size=PATCH):
    return float(mask[y:y + size, x:x + size].sum()) / (size * size)


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    rgb, tissue, hole, speck = make_tissue()
    write_pyramidal_tiff(root / "case_a.tif", rgb, mpp=0.5, tile=256, n_levels=3)
    (root / "broken.tif").write_bytes(b"this is not a tiff" * 200)
    write_pyramidal_tiff(root / "blank.tif", np.full((1024, 1024, 3), 250, np.uint8), mpp=0.5, n_levels=2)
    return root, rgb, tissue, hole, speck


def test_segmentation_keeps_tissue_and_finds_hole(slide_dir):
    _, rgb, tissue, hole, speck = slide_dir
    low = rgb[::4, ::4]  # segmentation runs on the lowest level (downsample 4 here)
    seg = segment_tissue(low, downsample=4.0, params=BIOPSY_PRESET)
    assert len(seg.contours) == 2, "the ellipse and the island, not the speck"
    assert sum(len(h) for h in seg.holes) == 1
    mask = seg.mask().astype(bool)
    truth = tissue[::4, ::4]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert not mask[hole[::4, ::4]].mean() > 0.05, "the hole is cut out of the tissue mask"
    assert not mask[speck[::4, ::4]].any(), "a speck below a_t is dropped"
    # Otsu finds the same tissue on this bimodal image.
    otsu = segment_tissue(low, 4.0, SegmentationParams(use_otsu=True)).mask().astype(bool)
    assert (otsu & truth).sum() / (otsu | truth).sum() > 0.9
    with pytest.raises(ValueError, match="mthresh"):
        SegmentationParams(mthresh=4)


def test_patch_grid_fraction_and_edges():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:4, 0:2] = 1  # level 0 = 4x the mask: tissue covers x<8, y<16
    coords, frac = patch_grid(mask, (4.0, 4.0), (32, 32), level0_size=16, level0_step=16, min_tissue=0.5)
    assert coords.tolist() == [[0, 0]] and frac.tolist() == [0.5]
    coords, _ = patch_grid(mask, (4.0, 4.0), (32, 32), 16, 16, min_tissue=0.51)
    assert len(coords) == 0
    # Patches running over the slide edge count the outside as background.
    mask[:] = 1
    coords, frac = patch_grid(mask, (4.0, 4.0), (32, 32), level0_size=16, level0_step=12, min_tissue=0.2)
    assert [12, 24] in coords.tolist() and frac[coords.tolist().index([24, 24])] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="min_tissue"):
        patch_grid(mask, (4.0, 4.0), (32, 32), 16, 16, min_tissue=0)


def test_resolve_geometry_levels_and_mpp(slide_dir):
    slide = open_slide(slide_dir[0] / "case_a.tif")
    g = resolve_geometry(slide, patch_size=256)
    assert (g.level, g.read_size, g.level0_size, g.mpp) == (0, 256, 256, 0.5)
    g = resolve_geometry(slide, patch_size=256, target_mpp=1.0)  # exactly level 1
    assert (g.level, g.read_size, g.level0_size, g.target_size) == (1, 256, 512, 256)
    g = resolve_geometry(slide, patch_size=256, target_mpp=0.75)  # between levels: read finer, resize
    assert (g.level, g.read_size, g.level0_size) == (0, 384, 384)
    g = resolve_geometry(slide, patch_size=224, target_mag=10)  # no objective power: 10x = 1 um/px
    assert (g.level, g.read_size, g.level0_size) == (1, 224, 448)
    with pytest.raises(ValueError, match="either"):
        resolve_geometry(slide, target_mpp=1.0, target_mag=10)
    slide.close()


def test_batch_patching_summary_thumbnails_and_rerun(slide_dir, tmp_path):
    root, rgb, tissue, hole, speck = slide_dir
    slides = find_slides(root)
    assert [p.name for p in slides] == ["blank.tif", "broken.tif", "case_a.tif"]
    results = process_slides(slides, tmp_path, PatchingConfig(), workers=2, progress=False)
    by_id = {r.slide_id: r for r in results}
    assert by_id["broken"].status == "failed" and "broken.tif" in by_id["broken"].error
    assert by_id["blank"].status == "no_tissue" and by_id["blank"].n_patches == 0
    assert by_id["case_a"].status == "done"

    coords, attrs = read_coords_h5(tmp_path / "coords" / "case_a.h5")
    assert coords.dtype == np.int64 and coords.shape == (by_id["case_a"].n_patches, 2)
    assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0 and attrs["name"] == "case_a"
    assert attrs["mpp"] == pytest.approx(0.5) and list(attrs["level_dim"]) == [SIZE, SIZE]
    assert list(attrs["downsample"]) == [1.0, 1.0]
    assert not (tmp_path / "coords" / "blank.h5").exists() and not (tmp_path / "coords" / "broken.h5").exists()

    # Kept patches lie on tissue; none on the white margin, the hole, or the speck.
    fracs = np.array([cell_fraction(tissue, x, y) for x, y in coords])
    assert (fracs > 0).mean() > 0.9 and fracs.min() > 0.3
    assert all(cell_fraction(hole, x, y) < 0.7 for x, y in coords)
    assert all(cell_fraction(speck, x, y) == 0 for x, y in coords)
    # ...and the tissue is kept: nearly every mostly-tissue grid cell is a patch.
    grid = [(x, y) for y in range(0, SIZE, PATCH) for x in range(0, SIZE, PATCH) if cell_fraction(tissue, x, y) >= 0.7]
    kept = {tuple(c) for c in coords.tolist()}
    assert sum(c in kept for c in grid) / len(grid) >= 0.9

    thumb = np.asarray(Image.open(tmp_path / "thumbnails" / "case_a.png").convert("RGB"))
    assert ((thumb == [0, 255, 0]).all(-1)).sum() > 50, "tissue contours drawn in green"
    assert ((thumb == [0, 0, 255]).all(-1)).sum() > 10, "holes drawn in blue"
    assert ((thumb == [255, 0, 0]).all(-1)).sum() > 50, "patch grid drawn in red"
    assert (tmp_path / "thumbnails" / "blank.png").exists()

    with open(tmp_path / "summary.csv") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert {k: rows[k]["status"] for k in rows} == {"blank": "no_tissue", "broken": "failed", "case_a": "done"}
    assert int(rows["case_a"]["n_patches"]) == len(coords) and float(rows["case_a"]["seconds"]) >= 0
    assert rows["broken"]["error"]

    # Rerun: finished slides are skipped and their coords file is left untouched.
    mtime = (tmp_path / "coords" / "case_a.h5").stat().st_mtime_ns
    again = {r.slide_id: r for r in process_slides(slides, tmp_path, workers=1, progress=False)}
    assert again["case_a"].status == "skipped_existing" and again["case_a"].n_patches == len(coords)
    assert again["broken"].status == "failed"
    assert (tmp_path / "coords" / "case_a.h5").stat().st_mtime_ns == mtime
    # A truncated coords file (e.g. a crash from an older tool) is redone, not trusted.
    (tmp_path / "coords" / "case_a.h5").write_bytes(b"\x89HDF truncated")
    redo = {r.slide_id: r for r in process_slides(slides[2:], tmp_path, progress=False)}
    assert redo["case_a"].status == "done" and read_coords_h5(tmp_path / "coords" / "case_a.h5")[0].tolist() == coords.tolist()


def test_cli_with_png_export_and_target_mpp(slide_dir, tmp_path):
    root, rgb, *_ = slide_dir
    src = tmp_path / "src"
    src.mkdir()
    (src / "case_a.tif").symlink_to(root / "case_a.tif")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "create_patches.py"), "--source", str(src), "--save-dir", str(out),
           "--target-mpp", "1.0", "--patch-size", "128", "--save-png", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "1 done" in proc.stdout
    coords, attrs = read_coords_h5(out / "coords" / "case_a.h5")
    assert (attrs["patch_level"], attrs["patch_size"], attrs["level0_patch_size"], attrs["target_patch_size"]) == (1, 128, 256, 128)
    pngs = sorted((out / "patches" / "case_a").glob("*.png"))
    assert len(pngs) == len(coords) > 0
    x, y = coords[0]
    img = np.asarray(Image.open(out / "patches" / "case_a" / f"case_a_x{x}_y{y}.png"))
    expected = rgb[y:y + 256, x:x + 256].astype(np.float64).reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert img.shape == (128, 128, 3) and np.abs(img - expected).max() <= 1.0


def test_patching_a_synthetic_he_slide(tmp_path):
    """The project's synthetic H&E slide (tissue fragments on glass, 0.5 um/px) as a pyramidal TIFF."""
    from scripts.synthetic_cohort import SyntheticCohort

    slide = SyntheticCohort(seed=0, image_size=128).slide_image(1024, index=0)
    path = write_pyramidal_tiff(tmp_path / "slides" / "synthetic_0.tif", slide.image, mpp=slide.mpp, tile=128, n_levels=3)
    # A 0.5 mm slide: CLAM's reference patch (512 px) would make every fragment "too small".
    cfg = PatchingConfig(patch_size=128, seg=SegmentationParams(ref_patch_size=128))
    result = process_slides([path], tmp_path / "out", cfg, progress=False)[0]
    assert result.status == "done", result.error
    coords, attrs = read_coords_h5(tmp_path / "out" / "coords" / "synthetic_0.h5")
    assert attrs["mpp"] == pytest.approx(slide.mpp)
    fracs = np.array([cell_fraction(slide.tissue_mask, x, y, 128) for x, y in coords])
    assert (fracs > 0).mean() > 0.9, "kept patches overlap tissue"
    assert fracs.min() > 0, "no patch lies entirely on the glass"
    cells = [(x, y) for y in range(0, 1024, 128) for x in range(0, 1024, 128)
             if cell_fraction(slide.tissue_mask, x, y, 128) >= 0.8]
    kept = {tuple(c) for c in coords.tolist()}
    assert len(cells) > 5 and sum(c in kept for c in cells) / len(cells) >= 0.8, "the tissue is kept"
