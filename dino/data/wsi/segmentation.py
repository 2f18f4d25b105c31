"""Tissue segmentation of a whole-slide image, following CLAM's saturation-threshold recipe.

The recipe (CLAM ``WholeSlideImage.segmentTissue``): convert a low-resolution RGB view of the
slide to HSV, median-blur the saturation channel, threshold it (fixed or Otsu), close small
gaps, then find tissue contours and their holes with ``cv2.findContours(RETR_CCOMP)`` and drop
pieces that are small compared with a reference patch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

try:  # opencv is part of the optional "wsi" extra
    import cv2
except ImportError:  # pragma: no cover - exercised only without the extra
    cv2 = None


def _require_cv2():
    if cv2 is None:
        raise ImportError(
            "tissue segmentation needs OpenCV: pip install 'mvhybrid[wsi]' (opencv-python-headless)"
        )


@dataclass(frozen=True)
class SegmentationParams:
    """Parameters of the tissue segmentation; defaults are CLAM's ``bwh_biopsy`` preset.

    Areas ``a_t`` (tissue) and ``a_h`` (holes) are in units of a ``ref_patch_size``² patch at
    level 0, rescaled to the segmentation level exactly as CLAM does.
    """

    seg_level: int = -1  # -1: the lowest-resolution level of the pyramid
    sthresh: int = 15
    sthresh_up: int = 255
    mthresh: int = 11  # median-blur kernel size (odd)
    close: int = 2  # morphological closing kernel size; 0 disables
    use_otsu: bool = False
    a_t: float = 1.0
    a_h: float = 1.0
    max_n_holes: int = 2
    ref_patch_size: int = 512  # CLAM's default for segmentTissue

    def __post_init__(self):
        if self.mthresh < 1 or self.mthresh % 2 == 0:
            raise ValueError(f"mthresh must be a positive odd kernel size, got {self.mthresh}")
        if not 0 <= self.sthresh <= 255:
            raise ValueError(f"sthresh must be in [0, 255], got {self.sthresh}")
        if self.max_n_holes < 0:
            raise ValueError(f"max_n_holes must be >= 0, got {self.max_n_holes}")


BIOPSY_PRESET = SegmentationParams()


@dataclass
class TissueSegmentation:
    """Result of :func:`segment_tissue`, in pixel coordinates of the segmentation image.

    ``contours[i]`` is an (K, 1, 2) int32 polygon and ``holes[i]`` the list of hole polygons
    inside it. ``downsample`` maps segmentation pixels to level-0 pixels (x, y).
    """

    contours: list = field(default_factory=list)
    holes: list = field(default_factory=list)
    downsample: tuple = (1.0, 1.0)
    shape: tuple = (0, 0)  # (H, W) of the segmentation image

    @property
    def empty(self) -> bool:
        return len(self.contours) == 0

    def mask(self) -> np.ndarray:
        """Filled tissue mask (uint8 0/1) of the segmentation image, holes cut out."""
        _require_cv2()
        m = np.zeros(self.shape, dtype=np.uint8)
        if self.contours:
            cv2.drawContours(m, self.contours, -1, 1, thickness=cv2.FILLED)
            all_holes = [h for hs in self.holes for h in hs]
            if all_holes:
                cv2.drawContours(m, all_holes, -1, 0, thickness=cv2.FILLED)
        return m

    def to_level0(self):
        """Contours and holes scaled to level-0 pixel coordinates (CLAM's stored form)."""
        s = np.asarray(self.downsample, dtype=np.float64)
        scale = lambda c: (c.astype(np.float64) * s).astype(np.int32)  # noqa: E731
        return [scale(c) for c in self.contours], [[scale(h) for h in hs] for hs in self.holes]


def saturation_mask(rgb: np.ndarray, params: SegmentationParams = BIOPSY_PRESET) -> np.ndarray:
    """Binary (0/255) foreground mask from the blurred HSV saturation channel."""
    _require_cv2()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[:, :, 1]
    sat = cv2.medianBlur(sat, params.mthresh)
    if params.use_otsu:
        _, binary = cv2.threshold(sat, 0, params.sthresh_up, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        _, binary = cv2.threshold(sat, params.sthresh, params.sthresh_up, cv2.THRESH_BINARY)
    if params.close > 0:
        kernel = np.ones((params.close, params.close), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    return binary


def _filter_contours(contours, hierarchy, min_tissue_area, min_hole_area, max_n_holes):
    """Keep outer contours whose area net of holes exceeds the threshold, and their largest holes."""
    # RETR_CCOMP gives a two-level tree; column 3 of the hierarchy is the parent index.
    parents = hierarchy[:, 3]
    kept, kept_holes = [], []
    for idx in np.flatnonzero(parents == -1):
        holes = [contours[h] for h in np.flatnonzero(parents == idx)]
        net_area = cv2.contourArea(contours[idx]) - sum(cv2.contourArea(h) for h in holes)
        if net_area <= 0 or net_area <= min_tissue_area:
            continue
        holes = sorted(holes, key=cv2.contourArea, reverse=True)[:max_n_holes]
        kept.append(contours[idx])
        kept_holes.append([h for h in holes if cv2.contourArea(h) > min_hole_area])
    return kept, kept_holes


def segment_tissue(rgb: np.ndarray, downsample=(1.0, 1.0), params: SegmentationParams = BIOPSY_PRESET):
    """Segment tissue in an RGB image taken at ``downsample`` (level-0 px per image px, x and y).

    Returns a :class:`TissueSegmentation`; an image with no tissue gives an empty one.
    """
    _require_cv2()
    if np.isscalar(downsample):
        downsample = (float(downsample), float(downsample))
    binary = saturation_mask(rgb, params)
    # CLAM: areas are given in reference-patch units and rescaled to this level (integer area).
    ref_area = int(params.ref_patch_size**2 / (downsample[0] * downsample[1]))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    seg = TissueSegmentation(downsample=tuple(map(float, downsample)), shape=binary.shape[:2])
    if hierarchy is None or len(contours) == 0:
        return seg
    seg.contours, seg.holes = _filter_contours(
        contours, hierarchy.reshape(-1, 4), params.a_t * ref_area, params.a_h * ref_area, params.max_n_holes
    )
    return seg
