"""Pipelines: named sequences of steps over a shared dictionary of values, and a registry.

A step declares the values it reads and the ones it writes, in the manner of MONAI
Deploy operators; :meth:`Pipeline.run` checks each step's inputs exist before calling
it (so a mis-wired pipeline fails naming the step and the missing value, not deep in
numpy) and times every step. Steps work on a downsampled copy where that suffices;
masks come back to the source grid and are measured on the original HU.

Values every run starts with: ``volume`` (the :class:`ImageVolume`), ``hu``,
``spacing_mm`` and ``affine``. A pipeline must end with ``masks`` (label -> mask on
the source grid) and ``measurements``; ``notes`` (list of str) is optional.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis import filters, intensity, segment
from analysis.measure import measure_segment
from analysis.types import (
    BODY,
    LUNG_LEFT,
    LUNG_RIGHT,
    ImageVolume,
    PipelineResult,
    SegmentMeasurement,
)

#: In-plane size the segmentation works at; 512x512 CT is shrunk by 2.
WORK_SIZE = 256


class PipelineError(RuntimeError):
    """A pipeline is mis-wired: a step's input is missing or it returned the wrong outputs."""


class UnknownPipeline(KeyError):
    """No pipeline registered under that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Step:
    """One processing step: ``outputs = run(*inputs)`` over the shared values.

    Attributes
    ----------
    name
        Shown in timings and errors.
    run
        Called with the named input values, in order; returns one value for a single
        output, else a tuple with one item per output.
    inputs, outputs
        Names of values read and written.
    """

    name: str
    run: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    """Named steps run in order over one volume.

    ``algorithm_family`` names the kind of algorithm for the results' Algorithm
    Identification (a concept of DICOM CID 7162, e.g. ``MorphologicalOperations`` for
    thresholds and morphology, ``ArtificialIntelligence`` for a learned model).
    """

    name: str
    steps: tuple[Step, ...]
    algorithm_family: str = "MorphologicalOperations"

    def run(self, volume: ImageVolume) -> PipelineResult:
        """Run every step on ``volume``; the result holds masks, measurements and timings."""
        values: dict[str, Any] = {
            "volume": volume,
            "hu": volume.hu,
            "spacing_mm": tuple(float(s) for s in volume.spacing_mm),
            "affine": np.asarray(volume.affine, dtype=np.float64),
            "notes": [],
        }
        timings: dict[str, float] = {}
        for step in self.steps:
            missing = [name for name in step.inputs if name not in values]
            if missing:
                raise PipelineError(
                    f"pipeline {self.name!r}, step {step.name!r}: missing input(s) {missing}; "
                    f"available: {sorted(values)}"
                )
            started = time.perf_counter()
            produced = step.run(*(values[name] for name in step.inputs))
            timings[step.name] = time.perf_counter() - started
            values.update(self._outputs(step, produced))
        for required in ("masks", "measurements"):
            if required not in values:
                raise PipelineError(f"pipeline {self.name!r} produced no {required!r}")
        return PipelineResult(
            pipeline=self.name,
            masks=values["masks"],
            measurements=values["measurements"],
            timings_s=timings,
            notes=list(values["notes"]),
        )

    def _outputs(self, step: Step, produced: Any) -> dict[str, Any]:
        if len(step.outputs) == 1:
            return {step.outputs[0]: produced}
        if not isinstance(produced, tuple) or len(produced) != len(step.outputs):
            raise PipelineError(
                f"pipeline {self.name!r}, step {step.name!r} must return {len(step.outputs)} "
                f"values {step.outputs}"
            )
        return dict(zip(step.outputs, produced, strict=True))


# ------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Pipeline] = {}


def register_pipeline(pipeline: Pipeline, *, replace: bool = False) -> Pipeline:
    """Make ``pipeline`` available by name; refuses to shadow another unless ``replace``."""
    if pipeline.name in _REGISTRY and not replace:
        raise ValueError(f"a pipeline named {pipeline.name!r} is already registered")
    _REGISTRY[pipeline.name] = pipeline
    return pipeline


def get_pipeline(name: str) -> Pipeline:
    """The registered pipeline called ``name``.

    Raises
    ------
    UnknownPipeline
        With the known names in the message, e.g. for a typo in the configuration.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(pipeline_names()) or "none"
        raise UnknownPipeline(f"unknown pipeline {name!r}; known pipelines: {known}") from None


def pipeline_names() -> list[str]:
    """Names of all registered pipelines, sorted."""
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------- CT steps


def _downsample(
    hu: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Shrink in-plane to at most ``WORK_SIZE``: segmentation needs no finer grid."""
    rows, columns = hu.shape[1:]
    scale = min(1.0, WORK_SIZE / max(rows, columns))
    shape = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    work = intensity.resize_slices(hu, shape)
    work_spacing = (spacing[0], spacing[1] * rows / shape[0], spacing[2] * columns / shape[1])
    return work, intensity.scale_affine(affine, hu.shape, work.shape), work_spacing


def _denoise(hu: np.ndarray) -> np.ndarray:
    # A median keeps organ edges where the thresholds expect them.
    return filters.median_filter(hu, 3)


def _upsample(hu: np.ndarray, labelled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Masks back onto the source grid (linear interpolation, thresholded at half)."""
    shape = hu.shape[1:]
    return {
        label: intensity.resize_slices(mask, shape, mask=True) for label, mask in labelled.items()
    }


def _measure(
    masks: dict[str, np.ndarray], hu: np.ndarray, spacing: tuple[float, float, float]
) -> list[SegmentMeasurement]:
    return [
        measure_segment(label, mask, hu, spacing) for label, mask in masks.items() if mask.any()
    ]


def _notes(masks: dict[str, np.ndarray], notes: list[str]) -> list[str]:
    return notes + [f"{label}: not found" for label, mask in masks.items() if not mask.any()]


def _front_steps() -> tuple[Step, ...]:
    return (
        Step("downsample", _downsample, ("hu", "affine", "spacing_mm"),
             ("work_hu", "work_affine", "work_spacing_mm")),
        Step("denoise", _denoise, ("work_hu",), ("work_hu",)),
        Step("segment_body", segment.segment_body, ("work_hu", "work_spacing_mm"), ("work_body",)),
    )


def _back_steps() -> tuple[Step, ...]:
    return (
        Step("upsample", _upsample, ("hu", "work_masks"), ("masks",)),
        Step("measure", _measure, ("masks", "hu", "spacing_mm"), ("measurements",)),
        Step("notes", _notes, ("masks", "notes"), ("notes",)),
    )


def ct_body_lungs() -> Pipeline:
    """Body, left lung and right lung of a CT volume."""
    segment_lungs = Step(
        "segment_lungs",
        segment.segment_lungs,
        ("work_hu", "work_body", "work_spacing_mm", "work_affine"),
        ("work_lung_left", "work_lung_right"),
    )
    collect = Step(
        "collect",
        lambda body, left, right: {BODY: body, LUNG_LEFT: left, LUNG_RIGHT: right},
        ("work_body", "work_lung_left", "work_lung_right"),
        ("work_masks",),
    )
    return Pipeline("ct-body-lungs", (*_front_steps(), segment_lungs, collect, *_back_steps()))


def ct_body() -> Pipeline:
    """The body outline of a CT volume only."""
    collect = Step("collect", lambda body: {BODY: body}, ("work_body",), ("work_masks",))
    return Pipeline("ct-body", (*_front_steps(), collect, *_back_steps()))


register_pipeline(ct_body_lungs())
register_pipeline(ct_body())
