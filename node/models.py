"""The node's models: which segmentation model a route uses, the region classifier,
and what the SR says about them.

Models load once per worker process (``analysis.cnn`` and ``analysis.region`` cache
them by path). A configured model is also loaded once at start (:func:`check_models`),
so a model whose outputs do not match its card is refused before any study arrives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node import __version__
from node.config import ConfigError, Settings

if TYPE_CHECKING:
    from analysis.cnn import SegmentationModel
    from analysis.region import RegionPrediction
    from node.results import AlgorithmInfo, RegionFinding


def segmentation_model(settings: Settings, name: str | None) -> SegmentationModel:
    """The configured model called ``name``, or the shipped one for ``None``.

    The labels of a user's model are registered with their codes from its card, so the
    SEG and SR can name them.
    """
    from analysis.cnn import SegmentationModel

    if name is None:
        return SegmentationModel.shipped()
    config = next((m for m in settings.models if m.name == name), None)
    if config is None:
        raise ConfigError(f"no model named {name!r} in models")
    model = SegmentationModel.load(config.path, config.card)
    _register_labels(model)
    return model


def _register_labels(model: SegmentationModel) -> None:
    from pydicom.sr.coding import Code

    from node.results import Structure, register_structure

    for entry in model.card.segments:
        assert entry.category is not None and entry.type is not None  # card-validated
        category = Code(entry.category.value, entry.category.scheme, entry.category.meaning)
        kind = Code(entry.type.value, entry.type.scheme, entry.type.meaning)
        # A built-in label keeps its codes; other codes for it are refused here.
        register_structure(Structure(label=entry.label, display_label=entry.display,
                                     category=category, property_type=kind,
                                     finding_site=kind))


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
