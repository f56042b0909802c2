"""The node's machine-learning models: which segmentation model a route uses, the
region classifier, and what the SEG and SR say about them.

Models load once per worker process (``analysis.cnn`` and ``analysis.region`` cache
them by path). A configured model is also loaded once at start (:func:`check_models`),
in an analysis worker process, never in the receiving one, so a model whose outputs
do not match its card is refused before any study arrives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node import __version__
from node.config import ConfigError, Settings

if TYPE_CHECKING:
    from analysis.cnn import SegmentationModel
    from analysis.region import RegionPrediction
    from node.results import AlgorithmInfo, RegionFinding, StructureCatalog


def segmentation_model(settings: Settings, name: str | None) -> SegmentationModel:
    """The configured model called ``name``, or the shipped one for ``None``."""
    from analysis.cnn import SegmentationModel

    if name is None:
        return SegmentationModel.shipped()
    config = next((m for m in settings.models if m.name == name), None)
    if config is None:
        raise ConfigError(f"no model named {name!r} in models")
    model = SegmentationModel.load(config.path, config.card)
    structures_of(model)  # a card that recodes a built-in label is refused here
    return model


def structures_of(model: SegmentationModel | None) -> StructureCatalog:
    """The coded meaning of every label a model's results may carry."""
    from node.results import DEFAULT_STRUCTURES, StructureCatalog

    if model is None:
        return DEFAULT_STRUCTURES
    return StructureCatalog.with_model_card(model.card)


def check_models(settings: Settings) -> None:
    """Load every configured model now; a bad one is a configuration error naming it."""
    for number, config in enumerate(settings.models):
        try:
            segmentation_model(settings, config.name)
        except Exception as exc:  # card, file, shape or label errors all land here
            raise ConfigError(
                f"invalid configuration:\n  models.{number} ({config.name}): {exc}"
            ) from None


def pipeline_context(pipeline: Any, settings: Settings, model: str | None) -> dict[str, Any]:
    """Inputs a pipeline's steps take beyond the volume."""
    context: dict[str, Any] = {
        "final_mask": dict(settings.segmentation.final_mask),
        "batch_size": settings.segmentation.batch_size,
    }
    if getattr(pipeline, "uses_model", False):
        context["model"] = segmentation_model(settings, model)
    return context


def region_finding(
    region: RegionPrediction | None,
) -> tuple[RegionFinding | None, AlgorithmInfo | None]:
    """The region prediction as an SR finding, with the classifier that made it."""
    from analysis.region import load_region_model
    from node.results import REGION_CODES, AlgorithmFamily, AlgorithmInfo, RegionFinding

    if region is None or region.label not in REGION_CODES:
        return None, None  # "other": not sure enough to report a region
    card = load_region_model().card
    algorithm = AlgorithmInfo(
        name="pacsnode region classifier",
        version=str(card.get("version", __version__)),
        family=AlgorithmFamily.ARTIFICIAL_INTELLIGENCE,
        parameters={"classifier": str(card.get("classifier", ""))},
    )
    return RegionFinding(region.label, float(region.probability)), algorithm
