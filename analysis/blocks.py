"""A pipeline over a series whose slice spacing changes: one run per uniform block,
one result over all slices.

:func:`analysis.volume.volume_blocks_from_datasets` splits such a series (sequential
head protocols: thin slices through the posterior fossa, thicker above) into regular
volumes. Each is analysed as any volume; the masks are stacked back in slice order
(so one SEG covers every source frame) and the measurements of each structure are
pooled over the blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analysis.pipeline import Pipeline, dice
from analysis.types import ImageVolume, PipelineResult, SegmentMeasurement


def run_in_blocks(pipeline: Pipeline, volumes: Sequence[ImageVolume],
                  context: Mapping[str, Any] | None = None) -> PipelineResult:
    """``pipeline`` on each volume; masks concatenated along the slices, measurements
    pooled, the CNN-classical agreement computed over all slices."""
    if len(volumes) == 1:
        return pipeline.run(volumes[0], context)
    results = [pipeline.run(volume, context) for volume in volumes]
    labels = list(results[0].masks)
    masks = {label: np.concatenate([r.masks[label] for r in results]) for label in labels}
    candidates = {
        source: {label: np.concatenate([r.candidates[source][label] for r in results])
                 for label in results[0].candidates[source]}
        for source in results[0].candidates
        if all(source in r.candidates for r in results)
    }
    agreement = {}
    if "cnn" in candidates and "classical" in candidates:
        agreement = {label: dice(candidates["cnn"][label], candidates["classical"][label])
                     for label in results[0].agreement}
    timings: dict[str, float] = {}
    for r in results:
        for step, seconds in r.timings_s.items():
            timings[step] = timings.get(step, 0.0) + seconds
    notes = [f"slice spacing varies along the series: analysed in {len(volumes)} blocks of "
             f"uniform spacing ({_describe(volumes)}); surface area and maximum diameter "
             "are pooled over the blocks (sum and largest)"]
    for r in results:
        notes += [n for n in r.notes if n not in notes and not n.endswith(": not found")]
    notes += [f"{label}: not found" for label, mask in masks.items() if not mask.any()]
    return PipelineResult(
        pipeline=pipeline.name,
        masks=masks,
        measurements=[pool_measurements([_of(r, label) for r in results]) for label in labels
                      if any(m.label == label for m in results[0].measurements)],
        timings_s=timings,
        notes=notes,
        agreement=agreement,
        mask_sources=dict(results[0].mask_sources),
        candidates=candidates,
    )


def pool_measurements(parts: Sequence[SegmentMeasurement]) -> SegmentMeasurement:
    """One structure's measurements over blocks: volumes and surfaces add up, the mean
    and SD are those of all the tissue together, the diameter is the largest of any block
    (a structure that crosses blocks may be longer)."""
    present = [m for m in parts if m.voxels > 0]
    if not present:
        return parts[0]
    voxels = sum(m.voxels for m in present)
    # Weighted by volume, not voxels: a voxel of a 5 mm block stands for twice the
    # tissue of one of a 2.5 mm block.
    volume = sum(m.volume_ml for m in present)
    mean = sum(m.volume_ml * m.mean_hu for m in present) / volume
    variance = sum(m.volume_ml * (m.std_hu ** 2 + (m.mean_hu - mean) ** 2)
                   for m in present) / volume
    return SegmentMeasurement(
        label=present[0].label,
        voxels=voxels,
        volume_ml=volume,
        mean_hu=float(mean),
        std_hu=float(np.sqrt(variance)),
        surface_area_mm2=sum(m.surface_area_mm2 for m in present),
        max_diameter_mm=max(m.max_diameter_mm for m in present),
    )


def _of(result: PipelineResult, label: str) -> SegmentMeasurement:
    return next(m for m in result.measurements if m.label == label)


def _describe(volumes: Sequence[ImageVolume]) -> str:
    return ", ".join(f"{v.hu.shape[0]} x {v.spacing_mm[0]:.3g} mm" for v in volumes)
