"""CNN segmentation of CT volumes: load a model with its card, predict masks per slice.

:class:`SegmentationModel` pairs a Keras model (``.keras`` or ``.h5`` file, or a
TensorFlow SavedModel directory) with its :class:`~analysis.model_card.ModelCard`,
refuses a model whose input or outputs do not match the card, and predicts masks for
an :class:`~analysis.types.ImageVolume` slice by slice in batches: turned to standard
orientation and put on the model's grid (:mod:`analysis.slice_grid`), then the scores
are brought back and turned back. Loaded models are cached per process, so a worker
loads each model once.

TensorFlow is imported when a model is first loaded (it costs seconds), never by
importing this module: a node that runs only classical pipelines does not pay for it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis import slice_grid
from analysis.model_card import ModelCard
from analysis.segment import fill_holes_slicewise
from analysis.types import ImageVolume

#: The shipped body-and-lungs model and its card.
SHIPPED_DIR = Path(__file__).resolve().parent / "models" / "lungs"
SHIPPED_MODEL = SHIPPED_DIR / "unet.keras"
SHIPPED_CARD = SHIPPED_DIR / "card.json"

_CACHE: dict[tuple[Any, ...], SegmentationModel] = {}
_CACHE_LOCK = threading.Lock()


class ModelLoadError(RuntimeError):
    """A model cannot be used with its card; the message names the model and the numbers."""


@dataclass(frozen=True, eq=False)
class SegmentationModel:
    """A loaded segmentation model with its card. Build with :meth:`load`.

    Attributes
    ----------
    card
        The validated model card.
    model_path
        Where the model was loaded from.
    infer
        ``(n, size, size, 1) float32 -> (n, size, size, classes)`` scores.
    """

    card: ModelCard
    model_path: Path
    infer: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def load(cls, model_path: str | Path, card_path: str | Path | None = None) -> SegmentationModel:
        """Load (or take from this process's cache) a model and its card.

        Parameters
        ----------
        model_path
            A Keras ``.keras`` or ``.h5`` file, or a SavedModel directory.
        card_path
            The model card; by default ``card.json`` beside the model.

        Raises
        ------
        ModelCardError
            The card is invalid (the error names the field).
        ModelLoadError
            The model cannot be read, has not one input and one output, or its input
            shape or number of output channels differs from the card's; or the card's
            ``model_sha256`` does not match the file.
        """
        model_path = Path(model_path).resolve()
        card_path = Path(card_path).resolve() if card_path else model_path.parent / "card.json"
        key = (model_path, card_path, _stamp(model_path), _stamp(card_path))
        with _CACHE_LOCK:
            cached = _CACHE.get(key)
            if cached is None:
                cached = _CACHE[key] = cls._load(model_path, card_path)
            return cached

    @classmethod
    def _load(cls, model_path: Path, card_path: Path) -> SegmentationModel:
        card = ModelCard.load(card_path)
        if not model_path.exists():
            raise ModelLoadError(f"model {model_path}: no such file or directory")
        if card.model_sha256 is not None and model_path.is_file():
            digest = file_sha256(model_path)
            if digest != card.model_sha256:
                raise ModelLoadError(
                    f"model {model_path}: sha256 {digest} differs from model_sha256 "
                    f"{card.model_sha256} in its card {card_path}; the card describes another file"
                )
        infer, input_shape, output_shape = _open_model(model_path)
        _check_shapes(model_path, card_path, card, input_shape, output_shape)
        return cls(card=card, model_path=model_path, infer=infer)

    @classmethod
    def shipped(cls) -> SegmentationModel:
        """The body-and-lungs model shipped with pacsnode."""
        return cls.load(SHIPPED_MODEL, SHIPPED_CARD)

    # ----------------------------------------------------------------- predict

    def predict_classes(self, volume: ImageVolume, batch_size: int = 16) -> np.ndarray:
        """The arg-max output index of every voxel, uint8 of ``volume.hu``'s shape.

        Raises
        ------
        analysis.slice_grid.NotAxialError
            The volume's slices are not axial.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        grid = self.card.grid
        orientation = slice_grid.orientation_of(volume.affine)
        hu = slice_grid.to_standard(volume.hu, orientation)
        spacing = slice_grid.standard_spacing(tuple(volume.spacing_mm[1:]), orientation)
        place = slice_grid.placement(hu.shape[1:], spacing, grid)
        classes = np.empty(hu.shape, dtype=np.uint8)
        for start in range(0, hu.shape[0], batch_size):
            stop = min(start + batch_size, hu.shape[0])
            x = slice_grid.to_model_grid(hu[start:stop], place, grid)
            scores = np.asarray(self.infer(x[..., None]))
            classes[start:stop] = slice_grid.from_model_grid(scores, place, self.card.background_index)
        return np.ascontiguousarray(slice_grid.from_standard(classes, orientation))

    def predict(self, volume: ImageVolume, batch_size: int = 16) -> dict[str, np.ndarray]:
        """label -> bool mask of ``volume.hu``'s shape, for every segment of the card.

        A label's mask is its own output class plus those it ``contains`` (the body
        includes the lungs), holes filled per slice if the card's ``fill_holes`` names
        it; a structure not found has an all-False mask.
        """
        classes = self.predict_classes(volume, batch_size)
        masks = {}
        for entry in self.card.segments:
            lookup = np.zeros(256, dtype=bool)
            lookup[list(self.card.indices_of(entry.label))] = True
            mask = lookup[classes]
            if entry.label in self.card.fill_holes:
                mask = fill_holes_slicewise(mask)
            masks[entry.label] = mask
        return masks


def cnn_masks(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    affine: np.ndarray,
    model: SegmentationModel | str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Masks of body, left and right lung (or whatever the model's card lists).

    Shaped as a pipeline step over the values every run starts with, e.g.
    ``Step("segment_cnn", cnn_masks, ("hu", "spacing_mm", "affine"), ("masks",))``.

    Parameters
    ----------
    hu, spacing_mm, affine
        The volume (see :class:`~analysis.types.ImageVolume`).
    model
        A loaded model, the path of a model file (its card beside it), or None for
        the shipped body-and-lungs model.
    """
    if model is None:
        model = SegmentationModel.shipped()
    elif not isinstance(model, SegmentationModel):
        model = SegmentationModel.load(model)
    volume = ImageVolume(hu=hu, spacing_mm=spacing_mm, affine=np.asarray(affine, dtype=np.float64))
    return model.predict(volume)


def clear_cache() -> None:
    """Forget loaded models (tests; a worker keeps them for its lifetime)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- loading


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime, size) so that a model replaced on disk is loaded afresh."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter out of the node's logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _open_model(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], tuple, tuple]:
    """(batch inference function, input shape, output shape) of a model on disk."""
    quiet_tensorflow()
    import tensorflow as tf

    if path.is_dir():
        return _open_saved_model(path, tf)
    import keras

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds for a bad file
        raise ModelLoadError(f"model {path}: cannot be loaded by Keras: {error}") from error
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelLoadError(
            f"model {path}: has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "a segmentation model has one of each"
        )

    @tf.function(reduce_retracing=True, autograph=False)
    def run(x: Any) -> Any:
        return model(x, training=False)

    def infer(x: np.ndarray) -> np.ndarray:
        return run(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()

    return infer, tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)


def _open_saved_model(path: Path, tf: Any) -> tuple[Callable[[np.ndarray], np.ndarray], tuple, tuple]:
    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(
            f"model {path}: not a SavedModel with a serving_default signature: {error}"
        ) from error
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(
            f"model {path}: serving_default has {len(inputs)} inputs and {len(outputs)} outputs; "
            "a segmentation model has one of each"
        )
    (input_name, input_spec), = inputs.items()
    (output_name, output_spec), = outputs.items()

    def infer(x: np.ndarray) -> np.ndarray:
        # Keep a reference to ``loaded``: the signature's variables live in it.
        _ = loaded
        return signature(**{input_name: tf.convert_to_tensor(x, dtype=tf.float32)})[output_name].numpy()

    return infer, tuple(input_spec.shape), tuple(output_spec.shape)


def _check_shapes(
    model_path: Path, card_path: Path, card: ModelCard, input_shape: tuple, output_shape: tuple
) -> None:
    """Refuse a model whose input or outputs differ from its card (free axes are fine)."""
    expected_in = tuple(card.input_shape)
    if len(input_shape) != 4 or any(
        got is not None and want is not None and got != want
        for got, want in zip(input_shape[1:], expected_in[1:])
    ):
        raise ModelLoadError(
            f"model {model_path}: input shape {_fmt(input_shape)} does not match the card's "
            f"input_shape {_fmt(expected_in)} ({card_path})"
        )
    channels = output_shape[-1] if output_shape else None
    if len(output_shape) != 4 or channels != len(card.labels):
        raise ModelLoadError(
            f"model {model_path}: {channels} output channels (shape {_fmt(output_shape)}) but its "
            f"card ({card_path}) maps {len(card.labels)} labels "
            f"({', '.join(entry.label for entry in card.labels)})"
        )
    for got, want in zip(output_shape[1:3], card.output_shape[1:3]):
        if got is not None and got != want:
            raise ModelLoadError(
                f"model {model_path}: output shape {_fmt(output_shape)} does not match the "
                f"card's output_shape {_fmt(card.output_shape)} ({card_path})"
            )


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join("None" if n is None else str(int(n)) for n in shape) + "]"
