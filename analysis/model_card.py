"""Model cards: what a segmentation model expects, what its outputs mean, how it was made.

A card is a JSON file beside the model. :class:`ModelCard` and its parts are pydantic
dataclasses: they validate in their constructors, as highdicom does for its objects, so
a card that loads is one the node can use, and an error names the field to fix, e.g.
``labels[2].type.meaning: must be at most 64 characters, got 'xxx...'``. Every invalid
card, of any kind (the region model's too, :mod:`analysis.region_card`), raises
:class:`ModelCardError`; :func:`card_error` turns pydantic's errors into it.

The label map gives each model output index a segment label, a display name and the
SNOMED CT coded segmented property category and type that the DICOM SEG records.
A label may ``contain`` others: its mask is the union of its own output index and
theirs (the body is every non-background class, lungs included).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Ge, Gt
from pydantic import (
    AfterValidator,
    ConfigDict,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass

from analysis.card_errors import IN_FILE, ModelCardError, card_error
from analysis.slice_grid import GridSpec
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT

SCHEMA = "pacsnode.model-card/1"
BACKGROUND = "background"
#: Orientation the model's slices are turned to before inference (the only one known).
STANDARD_AXIAL = "standard-axial"
_LABEL_PATTERN = r"[a-z][a-z0-9_]*"
_SHA256_PATTERN = r"[0-9a-f]{64}"
# DICOM VR limits of Code Value (SH: 16), Coding Scheme Designator (SH) and Code
# Meaning (LO: 64); a card that breaks them would only fail later, in the SEG.
_MAX_CODE_VALUE = 16
_MAX_SCHEME = 16
_MAX_MEANING = 64
_PREPROCESSING_DESCRIPTION = (
    "Per axial slice: turn to standard orientation using the affine (patient "
    "left on image right, anterior up); resample to pixel_spacing_mm (OpenCV "
    "INTER_AREA when shrinking, INTER_LINEAR when growing); centre on the "
    "input canvas, padding with pad_hu or cropping; map hu_window linearly to "
    "[0, 1], clipped. Outputs: scores cut from the canvas (cropped parts are "
    "background), resized linearly to the source slice, arg-max, turned back."
)


# ---------------------------------------------------------------------- field types


def matching(pattern: str, meaning: str) -> AfterValidator:
    """A check that a whole string matches ``pattern``; an error says it must be ``meaning``."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {meaning}, got {value!r}")
        return value

    return AfterValidator(check)


_NON_EMPTY = matching(r"(?s).*\S.*", "a non-empty string")
#: JSON numbers; booleans and numeric strings are refused (strict), integers become floats.
Number = Annotated[float, Strict()]
_Text = Annotated[str, Strict(), _NON_EMPTY]
_Dimension = Annotated[int, Strict(), Ge(1)] | None  # None: a free (batch) axis


_CodeValue = Annotated[str, StringConstraints(strict=True, max_length=_MAX_CODE_VALUE), _NON_EMPTY]
_Scheme = Annotated[str, StringConstraints(strict=True, max_length=_MAX_SCHEME), _NON_EMPTY]
_Meaning = Annotated[str, StringConstraints(strict=True, max_length=_MAX_MEANING), _NON_EMPTY]
_Label = Annotated[
    str, Strict(), matching(_LABEL_PATTERN, "lower case letters, digits and '_' starting with a letter")
]
_Sha256 = Annotated[str, Strict(), matching(_SHA256_PATTERN, "64 lower-case hex digits")]


_T = TypeVar("_T")


def _part(where: str) -> Callable[[type[_T]], type[_T]]:
    """Make a pydantic dataclass's constructor raise :class:`ModelCardError`.

    ``where`` names the object in the error (``code.value``). Parts validated within a
    card are built without their constructor, so those errors name the path from the
    card instead (``labels[2].type.value``).
    """

    def decorate(cls: type[_T]) -> type[_T]:
        init = cls.__init__
        arguments = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as error:
                raise card_error(error, cls, where=where, arguments=arguments) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return decorate


def _stated(data: Any, name: str) -> None:
    """Code may rely on a default; a card file (a mapping) must state the field."""
    if isinstance(data, Mapping) and name not in data:
        raise ModelCardError(name, "is required")


# Missing and unknown keys are both errors: a typo must not silently mean a default.
_CONFIG = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- parts


@_part("code")
@dataclass(frozen=True, config=_CONFIG)
class Code:
    """A coded concept: ``value``, coding ``scheme`` (e.g. ``SCT``) and ``meaning``."""

    value: _CodeValue
    scheme: _Scheme
    meaning: _Meaning

    def to_dict(self) -> dict[str, str]:
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}


@_part("label")
@dataclass(frozen=True, config=_CONFIG)
class OutputLabel:
    """What one output index of the model means.

    Attributes
    ----------
    index
        Channel of the model's output.
    label
        Segment label in results (``body``, ``lung_left``, ...); ``background`` for
        the class that is no segment.
    display
        Human-readable name (the SEG's Segment Label).
    category, type
        SNOMED CT coded segmented property category and type; required except for
        the background.
    contains
        Other labels whose pixels also belong to this segment.
    """

    index: Annotated[int, Strict(), Ge(0)]
    label: _Label
    display: _Meaning
    category: Code | None = None
    type: Code | None = None
    contains: tuple[Annotated[str, Strict()], ...] = ()

    @model_validator(mode="after")
    def _coded_unless_background(self) -> OutputLabel:
        if self.is_background:
            if self.contains:
                raise ModelCardError("contains", "the background contains nothing")
            return self
        for name in ("category", "type"):
            if getattr(self, name) is None:
                raise ModelCardError(name, "is required (a coded concept)")
        return self

    @property
    def is_background(self) -> bool:
        return self.label == BACKGROUND

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "label": self.label, "display": self.display}
        if self.category is not None:
            out["category"] = self.category.to_dict()
        if self.type is not None:
            out["type"] = self.type.to_dict()
        if self.contains:
            out["contains"] = list(self.contains)
        return out


@_part("preprocessing")
@dataclass(frozen=True, config=_CONFIG)
class Preprocessing:
    """How slices are prepared for the model (see :mod:`analysis.slice_grid`).

    Attributes
    ----------
    hu_window
        (low, high) HU mapped linearly to [0, 1], clipped.
    pixel_spacing_mm
        Slices are resampled to this spacing (area averaging when shrinking, linear
        when growing), then centred on the input canvas: padded with ``pad_hu`` or
        cropped, so the field of view does not matter up to ``size * spacing``.
    pad_hu
        Value of the canvas outside the slice.
    orientation
        ``standard-axial``: slices are turned (from the affine) so that the patient's
        left is on the image's right and anterior at the top; masks are turned back.
    """

    hu_window: tuple[Number, Number]
    pixel_spacing_mm: Annotated[float, Strict(), Gt(0)]
    pad_hu: Number
    orientation: Literal["standard-axial"] = STANDARD_AXIAL

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: Any) -> Any:
        # The file's description is prose for readers; to_dict writes this code's own.
        _stated(data, "orientation")
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if key != "description"}
        return data

    @model_validator(mode="after")
    def _window_rises(self) -> Preprocessing:
        if not self.hu_window[0] < self.hu_window[1]:
            raise ModelCardError("hu_window", f"low must be below high, got {list(self.hu_window)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "hu_window": list(self.hu_window),
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "pad_hu": self.pad_hu,
            "orientation": self.orientation,
            "description": _PREPROCESSING_DESCRIPTION,
        }


@dataclass(frozen=True, config=_CONFIG)
class _Postprocessing:
    """A card file's ``postprocessing`` section (:attr:`ModelCard.fill_holes` in code)."""

    fill_holes: tuple[Annotated[str, Strict()], ...] = ()


# ---------------------------------------------------------------------- the card


@_part("")
@dataclass(frozen=True, config=_CONFIG)
class ModelCard:
    """A validated model card; see the module docstring.

    ``fill_holes`` (JSON ``postprocessing.fill_holes``) lists labels whose masks have
    their holes filled per slice after prediction: a body is everything within its
    outline, air inside included, as the classical pipeline has it.
    ``training``, ``metrics`` and ``framework`` are free-form records (JSON objects),
    except that every number under ``metrics.dice`` must lie in [0, 1].
    """

    name: _Text
    version: _Text
    task: _Text
    model_file: _Text
    input_shape: tuple[_Dimension, ...]
    output_shape: tuple[_Dimension, ...]
    preprocessing: Preprocessing
    labels: tuple[OutputLabel, ...]
    description: Annotated[str, Strict()] = ""
    model_sha256: _Sha256 | None = None
    fill_holes: tuple[Annotated[str, Strict()], ...] = field(
        default=(), metadata={IN_FILE: "postprocessing"}
    )
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    framework: dict[str, Any] = field(default_factory=dict)
    schema: Literal["pacsnode.model-card/1"] = SCHEMA

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        _stated(data, "schema")
        if "fill_holes" in data:
            raise ModelCardError("fill_holes", "unknown field; it belongs in postprocessing")
        try:
            post = _adapter(_Postprocessing).validate_python(data.get("postprocessing", {}))
        except ValidationError as error:
            raise card_error(error, _Postprocessing, where="postprocessing") from None
        fields = {key: value for key, value in data.items() if key != "postprocessing"}
        return {**fields, "fill_holes": post.fill_holes}

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if not self.labels:
            raise ModelCardError("labels", "must be a non-empty list")
        self._check_shapes()
        self._check_labels()
        segments = {entry.label for entry in self.segments}
        for i, label in enumerate(self.fill_holes):
            if label not in segments:
                raise ModelCardError(
                    f"postprocessing.fill_holes[{i}]", f"{label!r} is not a segment label of this card"
                )
        _check_dice(self.metrics.get("dice", {}), "metrics.dice")
        return self

    def _check_shapes(self) -> None:
        for name in ("input_shape", "output_shape"):
            if len(getattr(self, name)) != 4:
                raise ModelCardError(
                    name, f"must be [batch, rows, columns, channels], got {list(getattr(self, name))}"
                )
        size = (self.input_shape[1], self.input_shape[2])
        if size[0] != size[1] or size[0] is None:
            raise ModelCardError(
                "input_shape", f"rows and columns must be equal and fixed, got {list(self.input_shape)}"
            )
        if self.input_shape[3] != 1:
            raise ModelCardError("input_shape", f"must have 1 channel (HU), got {self.input_shape[3]}")
        if tuple(self.output_shape[1:3]) != size:
            raise ModelCardError(
                "output_shape",
                f"rows and columns must match input_shape {list(size)}, got {list(self.output_shape)}",
            )
        if self.output_shape[3] != len(self.labels):
            raise ModelCardError(
                "output_shape",
                f"has {self.output_shape[3]} channels but labels describes {len(self.labels)} outputs",
            )

    def _check_labels(self) -> None:
        if len(self.labels) > 255:
            raise ModelCardError("labels", f"at most 255 outputs are supported, got {len(self.labels)}")
        indices = sorted(entry.index for entry in self.labels)
        if indices != list(range(len(self.labels))):
            raise ModelCardError(
                "labels", f"indices must be 0..{len(self.labels) - 1} once each, got {indices}"
            )
        names = [entry.label for entry in self.labels]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ModelCardError(f"labels[{i}].label", f"{name!r} appears twice")
        if names.count(BACKGROUND) != 1:
            raise ModelCardError("labels", f"exactly one label must be {BACKGROUND!r}")
        for i, entry in enumerate(self.labels):
            for other in entry.contains:
                if other == entry.label or other == BACKGROUND or other not in names:
                    raise ModelCardError(
                        f"labels[{i}].contains", f"{other!r} is not another segment label of this card"
                    )

    # ------------------------------------------------------------------ derived

    @property
    def grid(self) -> GridSpec:
        p = self.preprocessing
        return GridSpec(
            size=int(self.input_shape[1]),  # type: ignore[arg-type]
            pixel_spacing_mm=p.pixel_spacing_mm,
            hu_window=(float(p.hu_window[0]), float(p.hu_window[1])),
            pad_hu=float(p.pad_hu),
        )

    @property
    def background_index(self) -> int:
        return next(entry.index for entry in self.labels if entry.is_background)

    @property
    def segments(self) -> tuple[OutputLabel, ...]:
        """The non-background labels, in the card's order."""
        return tuple(entry for entry in self.labels if not entry.is_background)

    def indices_of(self, label: str) -> tuple[int, ...]:
        """Output indices whose pixels make up ``label``'s mask (itself and what it contains)."""
        by_name = {entry.label: entry for entry in self.labels}
        entry = by_name[label]
        return (entry.index, *(by_name[other].index for other in entry.contains))

    # ------------------------------------------------------------------ JSON

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> ModelCard:
        """Validate and build a card from parsed JSON; errors name ``source`` and the field."""
        try:
            return _adapter(cls).validate_python(data)
        except ValidationError as error:
            raise card_error(error, cls, source=source) from None

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read and validate a card file.

        Raises
        ------
        ModelCardError
            Unreadable JSON (field ``card``) or an invalid field, with the path.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ModelCardError("card", f"cannot read JSON: {error}", source=str(path)) from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "description": self.description,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "preprocessing": self.preprocessing.to_dict(),
            "postprocessing": {"fill_holes": list(self.fill_holes)},
            "labels": [entry.to_dict() for entry in self.labels],
            "training": dict(self.training),
            "metrics": dict(self.metrics),
            "framework": dict(self.framework),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _check_dice(dice: Any, where: str) -> None:
    if isinstance(dice, Mapping):
        for key, value in dice.items():
            _check_dice(value, f"{where}.{key}")
    elif isinstance(dice, (int, float)) and not isinstance(dice, bool):
        if not 0.0 <= dice <= 1.0:
            raise ModelCardError(where, f"a Dice coefficient must lie in [0, 1], got {dice}")


@functools.cache
def _adapter(cls: type[_T]) -> TypeAdapter[_T]:
    return TypeAdapter(cls)


# ---------------------------------------------------------------------- lungs

_SCT_ANATOMY = Code("91723000", "SCT", "Anatomical Structure")


def lung_labels() -> tuple[OutputLabel, ...]:
    """The label map of the body-and-lungs models: background, body (not lung), lungs."""
    return (
        OutputLabel(0, BACKGROUND, "Background"),
        OutputLabel(1, BODY, "Body", _SCT_ANATOMY, Code("38266002", "SCT", "Entire body"),
                    contains=(LUNG_LEFT, LUNG_RIGHT)),
        OutputLabel(2, LUNG_LEFT, "Left lung", _SCT_ANATOMY, Code("44029006", "SCT", "Left lung")),
        OutputLabel(3, LUNG_RIGHT, "Right lung", _SCT_ANATOMY, Code("3341006", "SCT", "Right lung")),
    )
