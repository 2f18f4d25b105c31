"""Whole-slide image preparation: tissue segmentation and CLAM-format patch coordinates."""
from dino.data.wsi.patching import (
    PatchGeometry,
    PatchingConfig,
    SlideResult,
    find_slides,
    open_slide,
    patch_slide,
    process_slides,
    read_coords_h5,
    read_patch,
    resolve_geometry,
    write_coords_h5,
)
from dino.data.wsi.segmentation import BIOPSY_PRESET, SegmentationParams, TissueSegmentation, segment_tissue

__all__ = [
    "BIOPSY_PRESET", "PatchGeometry", "PatchingConfig", "SegmentationParams", "SlideResult", "TissueSegmentation",
    "find_slides", "open_slide", "patch_slide", "process_slides", "read_coords_h5", "read_patch",
    "resolve_geometry", "segment_tissue", "write_coords_h5",
]
