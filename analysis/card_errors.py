"""Every invalid model card raises one :class:`ModelCardError` naming the field to fix;
:func:`card_error` turns pydantic's validation errors into it, with the path from the
card's root (``labels[2].type.meaning``) and the wording the card's users know.

Shared by the segmentation model card (:mod:`analysis.model_card`) and the region
model card (:mod:`analysis.region_card`).
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Iterator, Sequence
from typing import Any, get_args, get_type_hints

from pydantic import ValidationError


class ModelCardError(ValueError):
    """A model card is invalid; ``field`` names the offending field (dotted path).

    Raised inside a card model's validator, ``field`` is relative to the object being
    validated; :func:`card_error` prefixes the path from the card's root.
    """

    def __init__(self, field_name: str, message: str, *, source: str | None = None) -> None:
        self.field = field_name
        self.detail = message
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{field_name}: {message}")


# ------------------------------------------------------- pydantic -> ModelCardError

#: How pydantic's error types read in a card error (``{...}`` from the error's context).
_WORDING: dict[str, str] = {
    "missing": "is required",
    "missing_argument": "is required",
    "extra_forbidden": "unknown field",
    "unexpected_keyword_argument": "unknown field",
    "unexpected_positional_argument": "is an unexpected argument",
    "model_type": "must be an object",
    "dataclass_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "literal_error": "must be {expected}",
    "string_too_long": "must be at most {max_length} characters",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "positive": "must be positive",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
}
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")
_NO_VALUE = ("missing", "missing_argument", *_UNKNOWN)
#: Dataclass field metadata: the key that holds the field in a card file, if another.
IN_FILE = "in_file"
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 70
_SHORT.maxlist = _SHORT.maxtuple = 8


def card_error(
    error: ValidationError,
    root: type,
    *,
    where: str = "",
    source: str | None = None,
    arguments: Sequence[str] = (),
) -> ModelCardError:
    """The first of pydantic's errors as a :class:`ModelCardError` naming the field.

    Parameters
    ----------
    error
        From validating ``root``.
    root
        The model (pydantic dataclass or ``BaseModel``) validated: it lists the known
        fields when an unknown one is found.
    where
        Name of ``root`` in the path, for an object built on its own (``code``).
    source
        The card file, if any.
    arguments
        The constructor's parameter names: a positional argument is named, not
        numbered, in the path.
    """
    first = error.errors()[0]
    loc: list[str | int] = list(first["loc"])
    if arguments and loc and isinstance(loc[0], int) and loc[0] < len(arguments):
        loc[0] = arguments[loc[0]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ModelCardError):
        return ModelCardError(_path(where, *loc, cause.field), cause.detail, source=source)
    detail = str(cause) if isinstance(cause, ValueError) else _describe(first, root, loc)
    return ModelCardError(_path(where, *loc), detail, source=source)


def _path(*parts: str | int) -> str:
    """``labels[2].type`` from ``("labels", 2, "type")``; the card itself is ``card``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part:
            text += f".{part}" if text and not part.startswith("[") else part
    return text or "card"


def _describe(error: Any, root: type, loc: Sequence[str | int]) -> str:
    kind, context = error["type"], error.get("ctx", {})
    if kind == "greater_than" and context.get("gt") == 0:
        kind = "positive"  # pydantic's PositiveFloat
    template = _WORDING.get(kind)
    detail = template.format(**context) if template else error["msg"]
    if kind in _UNKNOWN:
        part = _part_at(root, loc[:-1])
        if part is not None:
            known = sorted(f.metadata.get(IN_FILE, f.name) for f in dataclasses.fields(part))
            detail += f"; known: {', '.join(known)}"
    elif kind not in _NO_VALUE:
        detail += f", got {_SHORT.repr(error['input'])}"
    return detail


def _part_at(root: type, loc: Sequence[str | int]) -> Any:
    """The dataclass that ``loc`` points into, starting at ``root`` (None if not one)."""
    part: Any = root
    for key in loc:
        if isinstance(key, int):
            continue  # an item of a sequence: the same type
        hint = get_type_hints(part).get(key) if dataclasses.is_dataclass(part) else None
        part = next((t for t in _types_in(hint) if dataclasses.is_dataclass(t)), None)
        if part is None:
            return None
    return part if dataclasses.is_dataclass(part) else None


def _types_in(hint: Any) -> Iterator[Any]:
    yield hint
    for arg in get_args(hint):
        yield from _types_in(arg)


