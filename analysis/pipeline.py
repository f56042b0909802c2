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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis import anatomy, filters, intensity, segment
from analysis.measure import measure_segment
from analysis.types import (
    BODY,
    DEFAULT_FINAL_MASK,
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


def _initial(volume: ImageVolume) -> dict[str, Any]:
    """The values every run starts with."""
    return {
        "volume": volume,
        "hu": volume.hu,
        "spacing_mm": tuple(float(s) for s in volume.spacing_mm),
        "affine": np.asarray(volume.affine, dtype=np.float64),
        "notes": [],
    }


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
    #: Steps take a ``model`` input: the node loads it (once per worker process).
    uses_model: bool = False

    def run(self, volume: ImageVolume, context: Mapping[str, Any] | None = None) -> PipelineResult:
        """Run every step on ``volume``; the result holds masks, measurements and timings.

        ``context`` adds named inputs for the steps (a loaded model, which segmenter
        provides each final mask, ...).
        """
        values, timings = self._run({**_initial(volume), **DEFAULT_CONTEXT, **(context or {})})
        for required in ("masks", "measurements"):
            if required not in values:
                raise PipelineError(f"pipeline {self.name!r} produced no {required!r}")
        return PipelineResult(
            pipeline=self.name,
            masks=values["masks"],
            measurements=values["measurements"],
            timings_s=timings,
            notes=list(values["notes"]),
            agreement=dict(values.get("agreement", {})),
            mask_sources=dict(values.get("mask_sources", {})),
            candidates=dict(values.get("candidates", {})),
        )

    def run_values(self, volume: ImageVolume) -> dict[str, Any]:
        """Run the steps and return every named value (for composing pipelines)."""
        return self._run(_initial(volume))[0]

    def _run(self, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
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
        return values, timings

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


def _anatomy_step() -> Step:
    """Lung pieces outside the thoracic cavity dropped, or moved to their side."""
    return Step("anatomy", anatomy.guard_lungs, ("masks", "hu", "spacing_mm", "affine", "notes"),
                ("masks", "notes"))


def _back_steps() -> tuple[Step, ...]:
    return (
        Step("upsample", _upsample, ("hu", "work_masks"), ("masks",)),
        _anatomy_step(),
        Step("measure", _measure, ("masks", "hu", "spacing_mm"), ("measurements",)),
        Step("notes", _notes, ("masks", "notes"), ("notes",)),
    )


def ct_body_lungs_classical() -> Pipeline:
    """Body, left lung and right lung of a CT volume: thresholds, morphology, components."""
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
    return Pipeline("ct-body-lungs-classical",
                    (*_front_steps(), segment_lungs, collect, *_back_steps()))


def _classical_mask_steps() -> tuple[Step, ...]:
    """The classical pipeline up to its masks on the source grid (no measurements)."""
    steps = ct_body_lungs_classical().steps
    # The guard runs once, on the final masks of ct-body-lungs.
    return tuple(step for step in steps if step.name not in ("anatomy", "measure", "notes"))


def _run_steps(steps: tuple[Step, ...], volume: ImageVolume, output: str) -> Any:
    return Pipeline("steps", steps).run_values(volume)[output]


def _segment_both(
    volume: ImageVolume, model: Any, batch_size: int, notes: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, list[str]]:
    """The classical masks and the CNN's, computed at the same time.

    TensorFlow and most of the classical steps (OpenCV, SciPy) release the GIL, so on
    two cores the classical steps largely hide behind the CNN.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="classical") as pool:
        classical = pool.submit(_run_steps, _classical_mask_steps(), volume, "masks")
        cnn, notes = _segment_cnn(volume, model, batch_size, notes)
        return classical.result(), cnn, notes


def _segment_cnn(
    volume: ImageVolume, model: Any, batch_size: int, notes: list[str]
) -> tuple[dict[str, np.ndarray] | None, list[str]]:
    """The CNN's masks, or ``None`` (with a note) where it cannot run on this volume."""
    from analysis.cnn import SegmentationModel
    from analysis.slice_grid import NotAxialError

    model = model if model is not None else SegmentationModel.shipped()
    try:
        masks = model.predict(volume, batch_size=batch_size)
    except NotAxialError as exc:
        return None, notes + [f"CNN not used: {exc}"]
    for label in (LUNG_LEFT, LUNG_RIGHT):
        if label in masks:
            masks[label] = drop_specks(masks[label], volume.voxel_volume_ml, MIN_LUNG_ML)
    return masks, notes


#: A lung of which the CNN finds less than this in the whole series is not reported:
#: lung bases in the top slices of an abdomen are larger, while the specks it finds in
#: skull-base air cells (1.2 mL on the real head phantom) or bowel gas are not.
MIN_LUNG_ML = 5.0


def drop_specks(mask: np.ndarray, voxel_ml: float, min_ml: float) -> np.ndarray:
    """``mask``, or an empty mask when all of it is smaller than ``min_ml``.

    The whole mask, not each connected piece: labelling 3D components of a 512x512
    series costs about a second per lung, and the false finds are whole-series specks.
    """
    if float(mask.sum()) * voxel_ml >= min_ml:
        return mask
    return np.zeros_like(mask)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks; two empty masks agree fully."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _combine(
    classical: dict[str, np.ndarray], cnn: dict[str, np.ndarray] | None,
    final_mask: Mapping[str, str],
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, str], dict[str, Any]]:
    """Per structure, the configured segmenter's mask; their agreement as a QA figure."""
    masks, agreement, sources = {}, {}, {}
    for label, mask in classical.items():
        other = cnn.get(label) if cnn is not None else None
        source = final_mask.get(label, "classical") if other is not None else "classical"
        masks[label] = other if source == "cnn" else mask
        sources[label] = source
        if other is not None:
            agreement[label] = dice(other, mask)
    candidates = {"classical": classical, **({"cnn": cnn} if cnn is not None else {})}
    return masks, agreement, sources, candidates


def ct_body_lungs() -> Pipeline:
    """Body and lungs by both the CNN and the classical steps; per structure, the
    configured one (``final_mask``) is final and their Dice agreement is reported."""
    return Pipeline("ct-body-lungs", (
        Step("segment", _segment_both, ("volume", "model", "batch_size", "notes"),
             ("classical_masks", "cnn_masks", "notes")),
        Step("combine", _combine, ("classical_masks", "cnn_masks", "final_mask"),
             ("masks", "agreement", "mask_sources", "candidates")),
        _anatomy_step(),
        Step("measure", _measure, ("masks", "hu", "spacing_mm"), ("measurements",)),
        Step("notes", _notes, ("masks", "notes"), ("notes",)),
    ), algorithm_family="ArtificialIntelligence", uses_model=True)


def cnn_only() -> Pipeline:
    """The route's model alone (a user's own, or the shipped one): its labels, measured."""
    def segment(volume: ImageVolume, model: Any, batch_size: int) -> dict[str, np.ndarray]:
        from analysis.cnn import SegmentationModel

        model = model if model is not None else SegmentationModel.shipped()
        return model.predict(volume, batch_size=batch_size)

    return Pipeline("cnn", (
        Step("segment_cnn", segment, ("volume", "model", "batch_size"), ("masks",)),
        Step("measure", _measure, ("masks", "hu", "spacing_mm"), ("measurements",)),
        Step("notes", _notes, ("masks", "notes"), ("notes",)),
    ), algorithm_family="ArtificialIntelligence", uses_model=True)


def ct_body() -> Pipeline:
    """The body outline of a CT volume only."""
    collect = Step("collect", lambda body: {BODY: body}, ("work_body",), ("work_masks",))
    return Pipeline("ct-body", (*_front_steps(), collect, *_back_steps()))


register_pipeline(ct_body_lungs())
register_pipeline(ct_body_lungs_classical())
register_pipeline(ct_body())
register_pipeline(cnn_only())

#: Inputs the node passes in every run's context; these defaults serve direct callers.
DEFAULT_CONTEXT: dict[str, Any] = {
    "model": None,  # the shipped model
    "batch_size": 16,
    "final_mask": DEFAULT_FINAL_MASK,
}
