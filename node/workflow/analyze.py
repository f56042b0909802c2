"""One series through its pipeline: read -> volume -> steps -> SEG + SR + preview.

:func:`analyze_series` is the one path from datasets to results, shared by the node's
workers (:func:`node.workflow.worker.run_job`, which also files the results and queues
their deliveries) and the offline ``pacsnode analyze`` (:mod:`node.offline`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import Dataset

from analysis.types import ImageVolume, PipelineResult
from node import __version__
from node.config import Settings

if TYPE_CHECKING:
    from analysis.region import RegionPrediction

log = logging.getLogger(__name__)


class AnalysisRefused(Exception):
    """A series that cannot be analysed, with a reason a user can act on."""


@dataclass
class SeriesOutcome:
    """What became of one series; ``status`` is done, skipped or failed."""

    series_instance_uid: str
    status: str
    reason: str = ""
    route: str | None = None
    pipeline: str | None = None
    result: PipelineResult | None = None
    seg: Dataset | None = None
    sr: Dataset | None = None
    preview: np.ndarray | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    region: RegionPrediction | None = None
    flag: str | None = None  # BodyPartExamined contradicts the pixels


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def _is_localizer(ds: Dataset) -> bool:
    return "LOCALIZER" in {str(v).upper() for v in ds.get("ImageType", []) or []}


@dataclass
class LoadedSeries:
    """A series' images (localizers left out) and the volume built from them.

    A series whose slice spacing changes is held as several ``blocks`` of uniform
    spacing; ``volume`` is then the largest block (for the region and the preview) and
    ``order`` runs over all blocks in turn, as the pipeline's masks do.
    """

    images: list[Dataset]
    volume: ImageVolume
    order: list[int]  # slice k of the (stacked) masks comes from images[order[k]]
    blocks: list[ImageVolume] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the SR and the log

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = [self.volume]

    def block_of_volume(self) -> slice:
        """Where ``volume`` lies among the stacked slices."""
        start = 0
        for block in self.blocks:
            if block is self.volume:
                return slice(start, start + block.hu.shape[0])
            start += block.hu.shape[0]
        raise ValueError("volume is not one of the blocks")

    @property
    def series_instance_uid(self) -> str:
        return str(self.images[0].SeriesInstanceUID)

    @property
    def body_part(self) -> str:
        return str(self.images[0].get("BodyPartExamined", "") or "")


def load_series(datasets: Sequence[Dataset], timings: dict[str, float]) -> LoadedSeries:
    """The volume of a series, or :class:`AnalysisRefused` with the reason."""
    from analysis.volume import (
        VolumeError,
        frame_of_reference_note,
        volume_blocks_from_datasets,
    )

    images = [ds for ds in datasets if not _is_localizer(ds)]
    if not images:
        raise AnalysisRefused("only localizer (scout) images in this series")
    with timed(timings, "volume"):
        try:
            blocks = volume_blocks_from_datasets(images)
        except VolumeError as exc:
            raise AnalysisRefused(f"cannot build a volume: {exc}") from None
    notes = [note for note in (frame_of_reference_note(images),) if note]
    uid = images[0].get("SeriesInstanceUID", "?")
    for note in notes:
        log.warning("series %s: %s", uid, note)
    if len(blocks) > 1:
        log.warning("series %s: slice spacing varies; analysed in %d blocks of %s slices",
                    uid, len(blocks), "/".join(str(len(order)) for _, order in blocks))
    largest = max(blocks, key=lambda block: block[0].hu.shape[0] * block[0].spacing_mm[0])[0]
    return LoadedSeries(images, largest, [i for _, order in blocks for i in order],
                        blocks=[volume for volume, _ in blocks], notes=notes)


def predict_region(loaded: LoadedSeries, timings: dict[str, float]) -> RegionPrediction | None:
    """The region classifier's reading of the pixels; ``None`` if it cannot say."""
    from analysis.region import load_region_model

    with timed(timings, "region"):
        try:
            return load_region_model().predict(loaded.volume)
        except Exception:  # the region is an aid: its failure must not fail the series
            log.exception("region prediction failed for series %s", loaded.series_instance_uid)
            return None


def region_flag(loaded: LoadedSeries, region: RegionPrediction | None) -> str | None:
    """A note when BodyPartExamined contradicts what the pixels look like."""
    from analysis.region import body_part_contradiction

    if region is None:
        return None
    return body_part_contradiction(loaded.body_part, region)


def analyze_series(
    datasets: Sequence[Dataset], pipeline_name: str, settings: Settings,
    timings: dict[str, float] | None = None, *, loaded: LoadedSeries | None = None,
    region: RegionPrediction | None = None, model: str | None = None,
) -> SeriesOutcome:
    """Run ``pipeline_name`` on one series and encode its results.

    ``loaded`` and ``region`` may come from a caller that needed them to route the
    series; ``model`` names a configured model for pipelines that use one.

    Raises
    ------
    AnalysisRefused
        When the series cannot be made into a volume or nothing was found.
    """
    from analysis.blocks import run_in_blocks
    from analysis.pipeline import get_pipeline
    from analysis.preview import render_overlay

    timings = {} if timings is None else timings
    loaded = loaded or load_series(datasets, timings)
    if region is None:
        region = predict_region(loaded, timings)
    pipeline = get_pipeline(pipeline_name)
    context = pipeline_context(pipeline, settings, model)
    result = run_in_blocks(pipeline, loaded.blocks, context)
    result.notes = loaded.notes + result.notes
    timings.update({f"step.{name}": s for name, s in result.timings_s.items()})
    if not any(mask.any() for mask in result.masks.values()):
        raise AnalysisRefused(f"pipeline {pipeline_name} found none of "
                              f"{', '.join(result.masks)} in this series")
    seg, sr = _encode(loaded, result, pipeline, settings, region, timings,
                      context.get("model"))
    with timed(timings, "preview"):
        shown = loaded.block_of_volume()
        preview = render_overlay(loaded.volume, {k: m[shown] for k, m in result.masks.items()})
    outcome = SeriesOutcome(loaded.series_instance_uid, "done", pipeline=pipeline_name,
                            result=result, seg=seg, sr=sr, preview=preview, timings_s=timings,
                            region=region, flag=region_flag(loaded, region))
    if outcome.flag:
        log.warning("series %s: %s", loaded.series_instance_uid, outcome.flag)
    return outcome


def pipeline_context(pipeline: Any, settings: Settings, model: str | None) -> dict[str, Any]:
    """Inputs a pipeline's steps need beyond the volume (models, choices)."""
    from node.workflow import ml_models

    return ml_models.pipeline_context(pipeline, settings, model)


def _encode(
    loaded: LoadedSeries, result: PipelineResult, pipeline: Any, settings: Settings,
    region: RegionPrediction | None, timings: dict[str, float], model: Any,
) -> tuple[Dataset, Dataset]:
    from node import results
    from node.workflow import ml_models

    algorithm = results.AlgorithmInfo(name=f"pacsnode {pipeline.name}", version=__version__,
                                      family=results.AlgorithmFamily(pipeline.algorithm_family))
    identity = results.EncoderIdentity.for_node(settings.node.ae_title)
    finding, classifier = ml_models.region_finding(region)
    structures = ml_models.structures_of(model)
    with timed(timings, "encode_seg"):
        sources = results.prepare_sources([loaded.images[i] for i in loaded.order],
                                          one_frame_of_reference=True)
        seg = results.build_segmentation(
            sources, result.masks, algorithm=algorithm, identity=identity,
            series_number=settings.results.seg_series_number,
            series_description=settings.results.seg_series_description,
            structures=structures,
        )
    with timed(timings, "encode_sr"):
        sr = results.build_measurement_report(
            seg, sources, result.measurements, algorithm=algorithm, identity=identity,
            series_number=settings.results.sr_series_number,
            series_description=settings.results.sr_series_description,
            agreement=result.agreement or None, region=finding, region_algorithm=classifier,
            structures=structures, notes=result.notes,
        )
    return seg, sr


def dataset_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode the preview as PNG")
    return encoded.tobytes()
