"""The region model's card (``pacsnode.region-model-card/1``) and what it may contain.

The card stays the JSON object training writes (:func:`analysis.training.region._card`)
and :class:`analysis.region.RegionModel` reads as a mapping; :func:`validate_card` checks
it against pydantic models of the fields the node relies on. Other fields (description,
intended use, limitations, library versions, further metrics ...) are free. An invalid
card raises :class:`analysis.model_card.ModelCardError`, naming the field, as the
segmentation cards do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from annotated_types import Ge, Gt, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from analysis.card_errors import ModelCardError, card_error
from analysis.features import SERIES_FEATURES
from analysis.model_card import Number, matching

Classifier = Literal["et", "rf", "svm"]
ScoreFunction = Literal["f_classif", "mutual_info"]
REGIONS: tuple[str, ...] = ("head", "chest", "abdomen", "pelvis")
CLASSIFIERS: tuple[str, ...] = get_args(Classifier)
SCORE_FUNCTIONS: tuple[str, ...] = get_args(ScoreFunction)
CARD_FILE = "card.json"
CARD_SCHEMA = "pacsnode.region-model-card/1"


def validate_card(card: Mapping[str, Any], *, source: str = CARD_FILE) -> dict[str, Any]:
    """Check a model card's fields; return it as a plain dict.

    Parameters
    ----------
    card
        The parsed ``card.json``.
    source
        Named in errors: the card file.

    Raises
    ------
    ModelCardError
        Naming the first missing or invalid field (dotted for nested ones).
    """
    try:
        _RegionCard.model_validate(card)
    except ValidationError as error:
        raise card_error(error, _RegionCard, source=source) from None
    return dict(card)


# ---------------------------------------------------------------------- field checks


def _distinct_regions(labels: list[str]) -> list[str]:
    if not labels or not all(labels) or len(set(labels)) != len(labels):
        raise ValueError(f"must be distinct non-empty strings, got {labels!r}")
    unknown = [x for x in labels if x not in REGIONS]
    if unknown:
        raise ValueError(f"contains unknown regions {unknown}; known: {list(REGIONS)}")
    return labels


def _computed_features(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in SERIES_FEATURES]
    if unknown:
        raise ValueError(
            f"names features this version does not compute: {unknown[:5]} (retrain the model)"
        )
    return names


def _file_name(name: str) -> str:
    if Path(name).name != name:
        raise ValueError(f"must be a file name in the model directory, got {name!r}")
    return name


_Names = list[Annotated[str, Strict()]]
_Fraction = Annotated[float, Strict(), Ge(0), Le(1)]


# ---------------------------------------------------------------------- the card


class _Part(BaseModel):
    # Only the fields the node uses are checked; the rest of the record is free.
    model_config = ConfigDict(extra="allow")


class _ClassifierPart(_Part):
    kind: Classifier


class _FeatureSelection(_Part):
    score_func: ScoreFunction
    k: Annotated[int, Strict(), Ge(1)]


class _Features(_Part):
    input: Annotated[_Names, AfterValidator(_computed_features)]
    selected: _Names

    @model_validator(mode="after")
    def _selected_from_input(self) -> _Features:
        if not set(self.selected) <= set(self.input):
            raise ModelCardError("selected", "must be a subset of features.input")
        return self


class _Confusion(_Part):
    labels: _Names
    matrix: list[list[Annotated[int, Strict(), Ge(0)]]]


class _Metrics(_Part):
    cv_accuracy: _Fraction
    held_back_accuracy: _Fraction
    held_back_confusion: _Confusion


class _RegionCard(_Part):
    card_schema: Literal["pacsnode.region-model-card/1"] = Field(alias="schema")
    name: Annotated[str, Strict()]
    version: Annotated[str, Strict(), matching(r"\d+\.\d+\.\d+", "MAJOR.MINOR.PATCH")]
    task: Literal["region"]
    labels: Annotated[_Names, AfterValidator(_distinct_regions)]
    threshold: Annotated[Number, Gt(0), Le(1)]
    classifier: _ClassifierPart
    feature_selection: _FeatureSelection
    features: _Features
    training_data: dict[str, Any]
    metrics: _Metrics
    sklearn_version: Annotated[str, Strict(), matching(r"\d+\.\d+(\.\d+)?\S*", "a version")]
    model_file: Annotated[str, Strict(), AfterValidator(_file_name)]
    model_sha256: Annotated[str, Strict(), matching(r"[0-9a-f]{64}", "64 lower-case hex digits")]

    @model_validator(mode="after")
    def _consistent(self) -> _RegionCard:
        k, inputs, selected = self.feature_selection.k, self.features.input, self.features.selected
        if len(selected) != min(k, len(inputs)):
            raise ModelCardError(
                "features.selected", f"has {len(selected)} names, feature_selection.k is {k}"
            )
        confusion = self.metrics.held_back_confusion
        if confusion.labels != self.labels:
            raise ModelCardError("metrics.held_back_confusion.labels", "must equal the card's labels")
        n = len(self.labels)
        if len(confusion.matrix) != n or any(len(row) != n for row in confusion.matrix):
            raise ModelCardError(
                "metrics.held_back_confusion.matrix", f"must be {n}x{n} non-negative integers"
            )
        return self
