"""Grey-level co-occurrence (GLCM) texture of HU images within masks.

scikit-image's ``graycomatrix`` / ``graycoprops`` on a windowed, quantised image; used
by the series features of :mod:`analysis.features` and the segment features of
:mod:`analysis.segment_features`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.feature import graycomatrix, graycoprops

#: GLCM windows (name, centre, width): broad to see air against tissue and bone, soft
#: tissue to see texture within organs. Quantised to GLCM_LEVELS grey levels.
GLCM_WINDOWS: tuple[tuple[str, float, float], ...] = (("wide", 0.0, 2000.0), ("soft", 40.0, 400.0))
GLCM_LEVELS = 32
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")


def glcm_features(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    center: float,
    width: float,
    distances: Sequence[int] = (1, 2),
    prefix: str = "glcm",
) -> dict[str, float]:
    """GLCM properties of HU images within masks, averaged over 4 angles and distances.

    ``distances`` are in pixels of the images: on the series' 2 mm grid the defaults
    pair pixels 2 and 4 mm apart, on a segment's 1 mm grid 1 and 2 mm apart.

    Pixels inside a mask are windowed and quantised to levels ``1..GLCM_LEVELS-1``;
    outside is level 0, whose co-occurrences are dropped before normalising, so the
    outline and the background do not count as texture. The counts of all images are
    pooled before the properties are taken.

    Returns
    -------
    dict
        ``{prefix}_{prop}`` for each of :data:`GLCM_PROPS`; zeros without pairs.
    """
    levels = GLCM_LEVELS
    angles = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    total = np.zeros((levels, levels, len(distances), len(angles)), dtype=np.float64)
    low = center - width / 2.0
    for image, mask in zip(images, masks, strict=True):
        if mask.sum() < 4:
            continue
        q = np.clip((image - low) / width, 0.0, 1.0) * (levels - 2)
        quantised = np.where(mask, np.rint(q).astype(np.uint8) + 1, 0).astype(np.uint8)
        total += graycomatrix(
            quantised, distances=list(distances), angles=list(angles), levels=levels, symmetric=True
        )
    total[0, :, :, :] = 0
    total[:, 0, :, :] = 0
    sums = total.sum(axis=(0, 1), keepdims=True)
    if not np.all(sums > 0):
        return {f"{prefix}_{prop}": 0.0 for prop in GLCM_PROPS}
    normed = total / sums
    out = {}
    for prop in GLCM_PROPS:
        with np.errstate(invalid="ignore", divide="ignore"):
            value = graycoprops(normed, prop)
        # Correlation is undefined (NaN) on a constant image: call it 1, perfectly predictable.
        out[f"{prefix}_{prop}"] = float(np.nan_to_num(value, nan=1.0).mean())
    return out
