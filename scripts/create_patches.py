#!/usr/bin/env python
"""Segment tissue and write CLAM-format patch coordinates for a folder of whole-slide images.

Example (CLAM biopsy preset, 256 px patches at level 0, 8 slides in parallel)::

    python scripts/create_patches.py --source /data/slides --save-dir /data/patches --workers 8

Writes ``coords/{slide_id}.h5``, ``thumbnails/{slide_id}.png`` (tissue green, holes blue,
patches red), ``summary.csv`` and, with ``--save-png``, ``patches/{slide_id}/*.png``. Rerunning
skips slides whose coords file is already complete. The grid parameters are recorded in
``patching_params.json``; a rerun with another patch size (or grid) into the same folder is refused
unless ``--overwrite`` redoes every slide. ``--verify`` then reads every patch once, as training
would, and lists unreadable ones (corrupt tiles) in ``verify.csv``.

Exit status: 0 even if some slides failed (see summary.csv); 1 when no slide could be processed
at all or the parameters clash with the folder's; 3 when ``--verify`` found unreadable patches.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

# Allow running from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino.data.wsi.patching import (  # noqa: E402
    SLIDE_EXTENSIONS,
    PatchingConfig,
    check_and_record_params,
    find_slides,
    process_slides,
    summarize,
)
from dino.data.wsi.segmentation import BIOPSY_PRESET  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, help="folder of slides (searched recursively)")
    p.add_argument("--save-dir", required=True, help="output folder")
    p.add_argument("--extensions", default=",".join(SLIDE_EXTENSIONS), help="comma-separated slide extensions")
    g = p.add_argument_group("patch grid")
    g.add_argument("--patch-size", type=int, default=256, help="output patch size in px")
    g.add_argument("--step-size", type=int, default=None, help="grid stride in output px (default: patch size)")
    g.add_argument("--patch-level", type=int, default=0, help="pyramid level to read (ignored with --target-mpp/--target-mag)")
    res = g.add_mutually_exclusive_group()
    res.add_argument("--target-mpp", type=float, default=None, help="output resolution in microns per pixel")
    res.add_argument("--target-mag", type=float, default=None, help="output magnification, e.g. 20")
    g.add_argument("--min-tissue", type=float, default=0.5, help="keep a patch if this fraction of it is tissue")
    s = p.add_argument_group("segmentation (defaults: CLAM biopsy preset)")
    s.add_argument("--seg-level", type=int, default=BIOPSY_PRESET.seg_level, help="-1: lowest-resolution level")
    s.add_argument("--sthresh", type=int, default=BIOPSY_PRESET.sthresh)
    s.add_argument("--mthresh", type=int, default=BIOPSY_PRESET.mthresh)
    s.add_argument("--close", type=int, default=BIOPSY_PRESET.close)
    s.add_argument("--use-otsu", action="store_true")
    s.add_argument("--a-t", type=float, default=BIOPSY_PRESET.a_t, help="min tissue area, in reference patches")
    s.add_argument("--a-h", type=float, default=BIOPSY_PRESET.a_h, help="min hole area, in reference patches")
    s.add_argument("--max-n-holes", type=int, default=BIOPSY_PRESET.max_n_holes)
    o = p.add_argument_group("outputs and execution")
    o.add_argument("--save-png", action="store_true", help="also export every patch as PNG")
    o.add_argument("--no-thumbnails", action="store_true")
    o.add_argument("--workers", type=int, default=1, help="slides processed in parallel")
    o.add_argument("--overwrite", action="store_true", help="redo slides that already have a coords file")
    o.add_argument("--verify", action="store_true", help="afterwards read every patch once; list unreadable ones in verify.csv")
    o.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    seg = replace(
        BIOPSY_PRESET, seg_level=args.seg_level, sthresh=args.sthresh, mthresh=args.mthresh, close=args.close,
        use_otsu=args.use_otsu, a_t=args.a_t, a_h=args.a_h, max_n_holes=args.max_n_holes,
    )
    cfg = PatchingConfig(
        patch_size=args.patch_size, step_size=args.step_size, patch_level=args.patch_level,
        target_mpp=args.target_mpp, target_mag=args.target_mag, min_tissue=args.min_tissue, seg=seg,
        save_png=args.save_png, save_thumbnail=not args.no_thumbnails,
    )
    exts = tuple(e if e.startswith(".") else f".{e}" for e in args.extensions.split(",") if e)
    slides = find_slides(args.source, exts)
    if not slides:
        print(f"no slides with extensions {exts} under {args.source}", file=sys.stderr)
        return 1
    try:
        check_and_record_params(args.save_dir, cfg, overwrite=args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = process_slides(slides, args.save_dir, cfg, workers=args.workers,
                             skip_existing=not args.overwrite, progress=not args.no_progress)
    counts = summarize(results)
    print(
        f"{len(results)} slides: {counts['done']} done, {counts['skipped_existing']} skipped (existing), "
        f"{counts['no_tissue']} without tissue, {counts['failed']} failed; {counts['patches']} patches. "
        f"Summary: {Path(args.save_dir) / 'summary.csv'}"
    )
    ok = counts["done"] + counts["skipped_existing"] + counts["no_tissue"]
    if ok == 0:
        return 1
    if args.verify and counts["done"] + counts["skipped_existing"] > 0:
        from dino.data.wsi.verify import verify_patches

        report = verify_patches(args.source, args.save_dir, progress=not args.no_progress)
        bad = report["unreadable"]
        print(f"verify: read {report['patches']} patches, {len(bad)} unreadable"
              + (f" in {len({b[0] for b in bad})} slide(s), e.g. {bad[0][0]} at ({bad[0][1]}, {bad[0][2]}): {bad[0][3]}"
                 if bad else "") + f". List: {Path(args.save_dir) / 'verify.csv'}")
        if bad:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
