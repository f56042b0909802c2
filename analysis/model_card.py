"""Model cards: what a segmentation model expects, what its outputs mean, how it was made.

A card is a JSON file beside the model. :class:`ModelCard` loads it and validates it
in its constructors, as highdicom does for its objects: a card that loads is one the
node can use, and an error names the field to fix, e.g.
``labels[2].type.meaning: must be a non-empty string of at most 64 characters``.

The label map gives each model output index a segment label, a display name and the
SNOMED CT coded segmented property category and type that the DICOM SEG records.
A label may ``contain`` others: its mask is the union of its own output index and
theirs (the body is every non-background class, lungs included).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.slice_grid import GridSpec
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT

SCHEMA = "pacsnode.model-card/1"
BACKGROUND = "background"
#: Orientation the model's slices are turned to before inference (the only one known).
STANDARD_AXIAL = "standard-axial"
_LABEL_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# DICOM VR limits of Code Value (SH: 16), Coding Scheme Designator (SH) and Code
# Meaning (LO: 64); a card that breaks them would only fail later, in the SEG.
_MAX_CODE_VALUE = 16
_MAX_SCHEME = 16
_MAX_MEANING = 64


class ModelCardError(ValueError):
    """A model card is invalid; ``field`` names the offending field (dotted path)."""

    def __init__(self, field_name: str, message: str, *, source: str | None = None) -> None:
        self.field = field_name
        self.detail = message
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{field_name}: {message}")


# ---------------------------------------------------------------------- checks


def _string(value: Any, where: str, *, max_length: int | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelCardError(where, f"must be a non-empty string, got {value!r}")
    if max_length is not None and len(value) > max_length:
        raise ModelCardError(
            where, f"must be at most {max_length} characters (DICOM), got {len(value)}: {value!r}"
        )
    return value


def _number(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelCardError(where, f"must be a number, got {value!r}")
    if positive and not value > 0:
        raise ModelCardError(where, f"must be positive, got {value!r}")
    return float(value)


def _integer(value: Any, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelCardError(where, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ModelCardError(where, f"must be an object, got {type(value).__name__}")
    return value


def _keys(data: Mapping[str, Any], where: str, required: set[str], optional: set[str]) -> None:
    """Missing and unknown keys are both errors: a typo must not silently mean a default."""
    for key in sorted(required - set(data)):
        raise ModelCardError(_join(where, key), "is required")
    for key in sorted(set(data) - required - optional):
        raise ModelCardError(
            _join(where, key), f"unknown field; known: {', '.join(sorted(required | optional))}"
        )


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _shape(value: Any, where: str) -> tuple[int | None, ...]:
    """A tensor shape: a list of positive integers, ``null`` for a free (batch) axis."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 4:
        raise ModelCardError(where, f"must be [batch, rows, columns, channels], got {value!r}")
    shape: list[int | None] = []
    for i, item in enumerate(value):
        shape.append(None if item is None else _integer(item, _join(where, i), minimum=1))
    return tuple(shape)


# ---------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Code:
    """A coded concept: ``value``, coding ``scheme`` (e.g. ``SCT``) and ``meaning``."""

    value: str
    scheme: str
    meaning: str
    where: str = field(default="code", repr=False, compare=False)

    def __post_init__(self) -> None:
        _string(self.value, _join(self.where, "value"), max_length=_MAX_CODE_VALUE)
        _string(self.scheme, _join(self.where, "scheme"), max_length=_MAX_SCHEME)
        _string(self.meaning, _join(self.where, "meaning"), max_length=_MAX_MEANING)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Code:
        data = _mapping(data, where)
        _keys(data, where, {"value", "scheme", "meaning"}, set())
        return cls(data["value"], data["scheme"], data["meaning"], where=where)

    def to_dict(self) -> dict[str, str]:
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}


@dataclass(frozen=True)
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

    index: int
    label: str
    display: str
    category: Code | None = None
    type: Code | None = None
    contains: tuple[str, ...] = ()
    where: str = field(default="label", repr=False, compare=False)

    def __post_init__(self) -> None:
        _integer(self.index, _join(self.where, "index"))
        if not isinstance(self.label, str) or not _LABEL_PATTERN.match(self.label):
            raise ModelCardError(
                _join(self.where, "label"),
                f"must be lower case letters, digits and '_' starting with a letter, got {self.label!r}",
            )
        _string(self.display, _join(self.where, "display"), max_length=_MAX_MEANING)
        if self.label != BACKGROUND:
            for name in ("category", "type"):
                if not isinstance(getattr(self, name), Code):
                    raise ModelCardError(_join(self.where, name), "is required (a coded concept)")
        elif self.contains:
            raise ModelCardError(_join(self.where, "contains"), "the background contains nothing")

    @property
    def is_background(self) -> bool:
        return self.label == BACKGROUND

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OutputLabel:
        data = _mapping(data, where)
        _keys(data, where, {"index", "label", "display"}, {"category", "type", "contains"})
        codes = {
            name: Code.from_dict(data[name], _join(where, name)) if data.get(name) is not None else None
            for name in ("category", "type")
        }
        contains = data.get("contains", [])
        if not isinstance(contains, list) or not all(isinstance(c, str) for c in contains):
            raise ModelCardError(_join(where, "contains"), f"must be a list of labels, got {contains!r}")
        return cls(
            index=data["index"], label=data["label"], display=data["display"],
            contains=tuple(contains), where=where, **codes,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "label": self.label, "display": self.display}
        if self.category is not None:
            out["category"] = self.category.to_dict()
        if self.type is not None:
            out["type"] = self.type.to_dict()
        if self.contains:
            out["contains"] = list(self.contains)
        return out


@dataclass(frozen=True)
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

    hu_window: tuple[float, float]
    pixel_spacing_mm: float
    pad_hu: float
    orientation: str = STANDARD_AXIAL
    where: str = field(default="preprocessing", repr=False, compare=False)

    def __post_init__(self) -> None:
        low = _number(self.hu_window[0], _join(_join(self.where, "hu_window"), 0))
        high = _number(self.hu_window[1], _join(_join(self.where, "hu_window"), 1))
        if not low < high:
            raise ModelCardError(
                _join(self.where, "hu_window"), f"low must be below high, got {self.hu_window}"
            )
        _number(self.pixel_spacing_mm, _join(self.where, "pixel_spacing_mm"), positive=True)
        _number(self.pad_hu, _join(self.where, "pad_hu"))
        if self.orientation != STANDARD_AXIAL:
            raise ModelCardError(
                _join(self.where, "orientation"),
                f"must be {STANDARD_AXIAL!r} (the only orientation supported), got {self.orientation!r}",
            )

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Preprocessing:
        data = _mapping(data, where)
        _keys(data, where, {"hu_window", "pixel_spacing_mm", "pad_hu", "orientation"},
              {"description"})
        window = data["hu_window"]
        if not isinstance(window, list) or len(window) != 2:
            raise ModelCardError(_join(where, "hu_window"), f"must be [low, high], got {window!r}")
        return cls(
            hu_window=(window[0], window[1]), pixel_spacing_mm=data["pixel_spacing_mm"],
            pad_hu=data["pad_hu"], orientation=data["orientation"], where=where,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "hu_window": list(self.hu_window),
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "pad_hu": self.pad_hu,
            "orientation": self.orientation,
            "description": (
                "Per axial slice: turn to standard orientation using the affine (patient "
                "left on image right, anterior up); resample to pixel_spacing_mm (OpenCV "
                "INTER_AREA when shrinking, INTER_LINEAR when growing); centre on the "
                "input canvas, padding with pad_hu or cropping; map hu_window linearly to "
                "[0, 1], clipped. Outputs: scores cut from the canvas (cropped parts are "
                "background), resized linearly to the source slice, arg-max, turned back."
            ),
        }


# ---------------------------------------------------------------------- the card


@dataclass(frozen=True)
class ModelCard:
    """A validated model card; see the module docstring.

    ``fill_holes`` (JSON ``postprocessing.fill_holes``) lists labels whose masks have
    their holes filled per slice after prediction: a body is everything within its
    outline, air inside included, as the classical pipeline has it.
    ``training``, ``metrics`` and ``framework`` are free-form records (JSON objects),
    except that every number under ``metrics.dice`` must lie in [0, 1].
    """

    name: str
    version: str
    task: str
    model_file: str
    input_shape: tuple[int | None, ...]
    output_shape: tuple[int | None, ...]
    preprocessing: Preprocessing
    labels: tuple[OutputLabel, ...]
    description: str = ""
    model_sha256: str | None = None
    fill_holes: tuple[str, ...] = ()
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    framework: Mapping[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise ModelCardError("schema", f"must be {SCHEMA!r}, got {self.schema!r}")
        for name in ("name", "version", "task", "model_file"):
            _string(getattr(self, name), name)
        if self.model_sha256 is not None and not (
            isinstance(self.model_sha256, str) and _SHA256_PATTERN.match(self.model_sha256)
        ):
            raise ModelCardError(
                "model_sha256", f"must be 64 lower-case hex digits, got {self.model_sha256!r}"
            )
        self._check_shapes()
        self._check_labels()
        segments = {entry.label for entry in self.segments}
        for i, label in enumerate(self.fill_holes):
            if label not in segments:
                raise ModelCardError(
                    f"postprocessing.fill_holes[{i}]", f"{label!r} is not a segment label of this card"
                )
        self._check_dice(self.metrics.get("dice", {}), "metrics.dice")

    def _check_shapes(self) -> None:
        for name in ("input_shape", "output_shape"):
            if len(getattr(self, name)) != 4:
                raise ModelCardError(name, f"must be [batch, rows, columns, channels], got {getattr(self, name)}")
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

    def _check_dice(self, dice: Any, where: str) -> None:
        if isinstance(dice, Mapping):
            for key, value in dice.items():
                self._check_dice(value, _join(where, str(key)))
        elif isinstance(dice, (int, float)) and not isinstance(dice, bool):
            if not 0.0 <= dice <= 1.0:
                raise ModelCardError(where, f"a Dice coefficient must lie in [0, 1], got {dice}")

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
            data = _mapping(data, "card")
            _keys(
                data, "",
                {"schema", "name", "version", "task", "model_file", "input_shape", "output_shape",
                 "preprocessing", "labels"},
                {"description", "model_sha256", "postprocessing", "training", "metrics", "framework"},
            )
            post = _mapping(data.get("postprocessing", {}), "postprocessing")
            _keys(post, "postprocessing", set(), {"fill_holes"})
            fill_holes = post.get("fill_holes", [])
            if not isinstance(fill_holes, list) or not all(isinstance(x, str) for x in fill_holes):
                raise ModelCardError(
                    "postprocessing.fill_holes", f"must be a list of labels, got {fill_holes!r}"
                )
            labels = data["labels"]
            if not isinstance(labels, list) or not labels:
                raise ModelCardError("labels", "must be a non-empty list")
            for name in ("training", "metrics", "framework"):
                _mapping(data.get(name, {}), name)
            return cls(
                schema=data["schema"],
                name=data["name"],
                version=data["version"],
                task=data["task"],
                description=data.get("description", ""),
                model_file=data["model_file"],
                model_sha256=data.get("model_sha256"),
                fill_holes=tuple(fill_holes),
                input_shape=_shape(data["input_shape"], "input_shape"),
                output_shape=_shape(data["output_shape"], "output_shape"),
                preprocessing=Preprocessing.from_dict(data["preprocessing"], "preprocessing"),
                labels=tuple(OutputLabel.from_dict(item, f"labels[{i}]") for i, item in enumerate(labels)),
                training=data.get("training", {}),
                metrics=data.get("metrics", {}),
                framework=data.get("framework", {}),
            )
        except ModelCardError as error:
            if source is None or error.source is not None:
                raise
            raise ModelCardError(error.field, error.detail, source=source) from None

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
