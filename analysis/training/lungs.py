"""Train the body-and-lungs U-Net and write it with its model card.

``python -m analysis.training.lungs --out analysis/models/lungs`` (the defaults) is the
command that produced the shipped model. Training data are generated phantoms
(:mod:`analysis.training.lung_data`), plus real CT folders when ``--real`` names any,
labelled by the reference procedure (``--real-labels classical``: the classical pipeline). Seeds are fixed and TensorFlow runs deterministic ops, so
the same command on the same machine and versions writes the same weights; a
held-back set of generated volumes, segmented through the full inference path
(orientation, resampling and back), gives the Dice coefficients in the card.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis.cnn import (
    ModelLoadError,
    SegmentationModel,
    file_sha256,
    quiet_tensorflow,
)
from analysis.corrections import CorrectionsError, training_corrections
from analysis.model_card import ModelCard, OutputLabel, Preprocessing, lung_labels
from analysis.slice_grid import GridSpec
from analysis.training import lung_data
from analysis.training.lung_data import KIND_WEIGHTS, KINDS, SliceSet, Volume
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, ImageVolume

if TYPE_CHECKING:
    from analysis.corrections import Corrections

#: Field of view of the model's input canvas, whatever its size in pixels.
FIELD_OF_VIEW_MM = 512.0
HU_WINDOW = (-1000.0, 600.0)
DEFAULT_SEED = 0
DEFAULT_VOLUMES = 800
DEFAULT_SLICES_PER_VOLUME = 8
DEFAULT_EPOCHS = 2
DEFAULT_BATCH_SIZE = 8
DEFAULT_EVAL_VOLUMES = 24
EVAL_SLICES_PER_VOLUME = 12
BASE_FILTERS = 12
LEARNING_RATE = 2e-3
MODEL_FILE = "unet.keras"
CARD_FILE = "card.json"
VERSION = "1.0.0"
_ROOT = Path(__file__).resolve().parents[2]
#: Code the model depends on; their hashes in the card tie the model to the source.
_SOURCES = ("analysis/phantoms/trunk.py", "analysis/training/lung_data.py",
            "analysis/slice_grid.py", "analysis/training/unet.py", "analysis/training/lungs.py")


def train_lungs(
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    volumes: int = DEFAULT_VOLUMES,
    epochs: int = DEFAULT_EPOCHS,
    slice_size: int = 256,
    real_folders: Sequence[Path] = (),
    real_labels: str = "reference",
    corrections: Mapping[str, Corrections] | None = None,
    slices_per_volume: int = DEFAULT_SLICES_PER_VOLUME,
    eval_volumes: int = DEFAULT_EVAL_VOLUMES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    base_filters: int = BASE_FILTERS,
    crop_size: int | None = None,
    verbose: int = 1,
) -> ModelCard:
    """Train the body-and-lungs model; write ``unet.keras`` and ``card.json`` in ``out_dir``.

    Parameters
    ----------
    out_dir
        Created if missing; both files are replaced.
    seed
        Seeds the generated data (training and held-back sets are separate streams)
        and Keras' weights and shuffling.
    volumes
        Generated training volumes (kinds: see :mod:`analysis.training.lung_data`).
    epochs
        Passes over the training slices.
    slice_size
        Model input size; the canvas always covers :data:`FIELD_OF_VIEW_MM`, so a
        smaller size means coarser pixels (64 for quick tests).
    real_folders
        Folders of real CT series added to the training data.
    real_labels
        How they are labelled: ``"reference"`` (the reference procedure of
        :mod:`analysis.reference` with ``corrections``, the masks ``pacsnode reference``
        writes) or ``"classical"`` (the ``ct-body-lungs-classical`` pipeline).
    corrections
        Series Instance UID -> hand-checked corrections of its reference.
    slices_per_volume
        Slices drawn per generated volume, spread from its top to its bottom.
    eval_volumes
        Held-back generated volumes for the card's metrics (0 for none).
    batch_size
        Slices per training step.
    base_filters
        Width of the U-Net (see :func:`analysis.training.unet.build_unet`).
    crop_size
        Training sees this square around the body of each slice (a multiple of 32;
        by default three quarters of ``slice_size``): most of the canvas is air, and
        the network is convolutional, so the saved model still takes whole canvases.
    verbose
        0 silent, 1 progress lines.

    Returns
    -------
    ModelCard
        The card written, with its metrics.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras, tf = _deterministic_keras(seed)
    grid = GridSpec(size=slice_size, pixel_spacing_mm=FIELD_OF_VIEW_MM / slice_size,
                    hu_window=HU_WINDOW, pad_hu=HU_WINDOW[0])
    say = print if verbose else (lambda *args, **kwargs: None)

    say(f"generating {volumes} training volumes ...", flush=True)
    synthetic, counts = lung_data.synthetic_set(seed, volumes, grid, slices=slices_per_volume)
    real, real_records = lung_data.real_slices([Path(f) for f in real_folders], grid,
                                               labels=real_labels, corrections=corrections)
    crop = crop_size or max(32, slice_size * 3 // 4 // 32 * 32)
    train = crop_around_body(SliceSet.concatenate([synthetic, real], grid.size), crop,
                             np.random.default_rng([seed, 3]))
    say(f"{len(synthetic)} generated + {len(real)} real slices; training {epochs} epochs ...", flush=True)

    from analysis.training.unet import build_unet

    classes = len(lung_data.CLASSES)
    model = build_unet(input_size=crop, classes=classes, base_filters=base_filters)
    _fit(model, train, seed=seed, epochs=epochs, batch_size=batch_size, keras=keras, tf=tf, verbose=verbose)

    model_path = out_dir / MODEL_FILE
    final = build_unet(input_size=slice_size, classes=classes, base_filters=base_filters)
    final.set_weights(model.get_weights())
    save_model(final, model_path, keras=keras)
    card = _card(
        grid, model_path, metrics={},
        training=_training_record(
            seed, volumes, epochs, slices_per_volume, batch_size, base_filters, crop, counts,
            len(synthetic), real_folders, real_records, len(real), eval_volumes, final,
        ),
    )
    card.save(out_dir / CARD_FILE)
    if eval_volumes:
        say(f"evaluating on {eval_volumes} held-back volumes ...", flush=True)
        loaded = SegmentationModel.load(model_path, out_dir / CARD_FILE)
        card = _card(grid, model_path, metrics=evaluate(loaded, seed, eval_volumes),
                     training=card.training)
        card.save(out_dir / CARD_FILE)
    say(f"wrote {model_path} and {out_dir / CARD_FILE} in {time.perf_counter() - started:.0f} s", flush=True)
    return card


# ------------------------------------------------------------------------ training


def crop_around_body(slices: SliceSet, crop: int, rng: np.random.Generator) -> SliceSet:
    """A ``crop`` square of each slice around its labelled body, jittered by up to a tenth."""
    size = slices.x.shape[1]
    if crop >= size:
        return slices
    x = np.empty((len(slices), crop, crop), dtype=slices.x.dtype)
    y = np.empty((len(slices), crop, crop), dtype=slices.y.dtype)
    jitter = rng.integers(-(crop // 10), crop // 10 + 1, size=(len(slices), 2))
    for k in range(len(slices)):
        start = []
        for axis in (0, 1):
            hits = np.flatnonzero(slices.y[k].any(axis=1 - axis))
            centre = (hits[0] + hits[-1]) // 2 if hits.size else size // 2
            start.append(int(np.clip(centre - crop // 2 + jitter[k, axis], 0, size - crop)))
        window = (slice(start[0], start[0] + crop), slice(start[1], start[1] + crop))
        x[k], y[k] = slices.x[k][window], slices.y[k][window]
    return SliceSet(x, y)


def _deterministic_keras(seed: int) -> tuple[Any, Any]:
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return keras, tf


def _loss(classes: int) -> Any:
    """Cross-entropy plus soft Dice over the foreground classes (outlines and balance)."""
    from keras import ops

    def loss(y_true: Any, y_pred: Any) -> Any:
        labels = ops.cast(y_true, "int32")
        ce = ops.mean(ops.sparse_categorical_crossentropy(labels, y_pred))
        onehot = ops.one_hot(labels, classes)
        overlap = ops.sum(onehot * y_pred, axis=(0, 1, 2))
        total = ops.sum(onehot, axis=(0, 1, 2)) + ops.sum(y_pred, axis=(0, 1, 2))
        dice = (2.0 * overlap + 1.0) / (total + 1.0)
        return ce + 1.0 - ops.mean(dice[1:])

    return loss


def _fit(model: Any, train: SliceSet, *, seed: int, epochs: int, batch_size: int,
         keras: Any, tf: Any, verbose: int) -> None:
    steps = max(1, epochs * int(np.ceil(len(train) / batch_size)))
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=_loss(model.outputs[0].shape[-1]))
    data = (
        tf.data.Dataset.from_tensor_slices((train.x, train.y))
        .shuffle(len(train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(lambda x, y: (tf.cast(x, tf.float32)[..., None], y))
        .prefetch(2)
    )
    model.fit(data, epochs=epochs, shuffle=False, verbose=2 if verbose else 0)


def save_model(model: Any, path: Path, *, keras: Any) -> None:
    """Save an inference-only copy whose bytes depend on the weights alone.

    ``model`` must be uncompiled (a fresh model given the trained weights), so the
    file holds no optimiser or training loss and loads without custom objects; the
    archive's timestamps and Keras' ``date_saved`` are dropped, so retraining with
    the same seed reproduces the file byte for byte.
    """
    model.save(path)
    _normalise_archive(path)


def _normalise_archive(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            if name == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata, sort_keys=True).encode()
            elif name == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data,
                             compress_type=zipfile.ZIP_DEFLATED)
    path.write_bytes(buffer.getvalue())


def _renumber_shared_objects(config: Any) -> Any:
    """Keras marks objects shared between layers with their Python ``id()``, a memory
    address that changes from run to run; number them in order of appearance instead."""
    numbers: dict[Any, int] = {}

    def walk(item: Any) -> Any:
        if isinstance(item, dict):
            out = {}
            for key, value in item.items():
                if key == "shared_object_id":
                    value = numbers.setdefault(value, len(numbers) + 1)
                out[key] = walk(value)
            return out
        if isinstance(item, list):
            return [walk(value) for value in item]
        return item

    return walk(config)


# ---------------------------------------------------------------------- evaluation


def eval_volume(seed: int, index: int) -> tuple[Volume, ImageVolume]:
    """Held-back volume ``index``: kinds in turn; odd ones stored with columns mirrored.

    Mirrored volumes carry the matching affine, so they check that masks come back
    in the source orientation with left and right intact.
    """
    rng = np.random.default_rng([seed, 2, index])
    kind = KINDS[index % len(KINDS)]
    volume = lung_data.generate_volume(kind, rng, EVAL_SLICES_PER_VOLUME)
    ps, st = volume.pixel_spacing_mm, volume.slice_thickness_mm
    affine = np.array([[0, 0, ps, 0], [0, ps, 0, 0], [-st, 0, 0, 0], [0, 0, 0, 1.0]])
    hu = volume.hu
    if index % 2:
        hu = np.ascontiguousarray(hu[:, :, ::-1])
        affine[0, 2] = -ps
    return volume, ImageVolume(hu=hu, spacing_mm=(st, ps, ps), affine=affine)


def evaluate(model: SegmentationModel, seed: int, volumes: int) -> dict[str, Any]:
    """Dice per structure (pooled over voxels) on held-back generated volumes.

    Also the lung volume found where there is none (abdomen and head volumes), in ml.
    """
    structures = {BODY: (1, 2, 3), LUNG_LEFT: (2,), LUNG_RIGHT: (3,)}
    tallies: dict[str, dict[str, list[float]]] = {}
    false_lung_ml: dict[str, float] = {}
    for index in range(volumes):
        truth_volume, image = eval_volume(seed, index)
        masks = model.predict(image)
        if index % 2:
            masks = {label: mask[:, :, ::-1] for label, mask in masks.items()}
        kind = truth_volume.kind
        voxel_ml = float(np.prod(image.spacing_mm)) / 1000.0
        for label, classes in structures.items():
            truth = np.isin(truth_volume.labels, classes)
            found = masks[label]
            tally = tallies.setdefault(label, {}).setdefault(kind, [0.0, 0.0])
            tally[0] += 2.0 * np.count_nonzero(truth & found)
            tally[1] += np.count_nonzero(truth) + np.count_nonzero(found)
        if kind in ("abdomen", "head"):
            lung = masks[LUNG_LEFT] | masks[LUNG_RIGHT]
            false_lung_ml[kind] = false_lung_ml.get(kind, 0.0) + np.count_nonzero(lung) * voxel_ml

    def dice(parts: list[list[float]]) -> float | None:
        overlap, total = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return round(float(overlap / total), 4) if total else None

    # Kinds without lungs get no lung Dice (there is nothing to overlap): false_lung_ml.
    per_kind = {
        kind: {label: dice([tallies[label][kind]]) for label in structures
               if kind in tallies[label] and (label == BODY or kind not in ("abdomen", "head"))}
        for kind in KINDS
    }
    return {
        "dice": {label: dice(list(tallies[label].values())) for label in structures},
        "dice_by_kind": {kind: {k: v for k, v in d.items() if v is not None} for kind, d in per_kind.items()},
        "false_lung_ml": {kind: round(ml, 1) for kind, ml in false_lung_ml.items()},
        "evaluation_set": {
            "generator": "analysis.training.lungs.eval_volume (numpy seed stream [seed, 2, index])",
            "volumes": volumes,
            "slices_per_volume": EVAL_SLICES_PER_VOLUME,
            "kinds": {kind: sum(1 for i in range(volumes) if KINDS[i % len(KINDS)] == kind) for kind in KINDS},
            "note": "Dice pooled over all voxels of a kind (or of the whole set), on the source "
                    "grid after the full inference path; odd volumes mirrored with their affine. "
                    "abdomen and head volumes hold no lung: false_lung_ml is what was found there.",
        },
    }


# --------------------------------------------------------------------------- card


def _card(grid: GridSpec, model_path: Path, *, metrics: dict[str, Any],
          training: dict[str, Any]) -> ModelCard:
    size = grid.size
    labels: tuple[OutputLabel, ...] = lung_labels()
    return ModelCard(
        name="ct-body-lungs-unet",
        version=VERSION,
        task="segmentation",
        description=(
            "2D U-Net over axial CT slices: per-pixel softmax over background, body (not "
            "lung), left lung and right lung. The body segment is every non-background "
            "class. Trained on generated phantoms only unless training.real lists folders."
        ),
        model_file=model_path.name,
        model_sha256=file_sha256(model_path),
        fill_holes=(BODY,),
        input_shape=(None, size, size, 1),
        output_shape=(None, size, size, len(labels)),
        preprocessing=Preprocessing(
            hu_window=grid.hu_window, pixel_spacing_mm=grid.pixel_spacing_mm, pad_hu=grid.pad_hu,
        ),
        labels=labels,
        training=training,
        metrics=metrics,
        framework=_framework(),
    )


def _framework() -> dict[str, str]:
    import cv2
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }


def _training_record(
    seed: int, volumes: int, epochs: int, slices_per_volume: int, batch_size: int, base_filters: int,
    crop: int, counts: dict[str, int], synthetic_slices: int, real_folders: Sequence[Path],
    real_records: list[dict[str, object]], real_slices: int, eval_volumes: int, model: Any,
) -> dict[str, Any]:
    command = (f"python -m analysis.training.lungs --out DIR --seed {seed} --volumes {volumes} "
               f"--epochs {epochs}" + "".join(f" --real {f}" for f in real_folders))
    if any(r.get("labels") == "classical" for r in real_records):
        command += " --real-labels classical"
    return {
        "command": command,
        "seed": seed,
        "determinism": "keras.utils.set_random_seed(seed); "
                       "tf.config.experimental.enable_op_determinism()",
        "synthetic": {
            "generator": "analysis.training.lung_data.synthetic_set (numpy seed stream [seed, 1, index])",
            "volumes": volumes,
            "volumes_per_kind": counts,
            "kind_weights": dict(zip(KINDS, KIND_WEIGHTS)),
            "slices_per_volume": slices_per_volume,
            "slices": synthetic_slices,
            "settings": (
                "trunk: field of view 300-500 mm at 256/384/512 px; body semi-axes AP 80-150 mm, "
                "LR 1.15-1.7x AP; outline exponent 1.8-3; offset y -15..30, x -25..25 mm; fat "
                "4-35 mm; table 85%; arms 40% (gap 3-25 mm); lungs AP 0.6-0.78, LR 0.28-0.36 of "
                "the body, 3-10 vessels per slice; ribs 70%; heart and aorta 70% "
                "(40 or 120-300 HU); diaphragm domes with liver and stomach (always for base and "
                "abdomen, 40% for chest); stomach gas (base, abdomen, 30% chest); bowel gas 80% "
                "(base, abdomen); consolidation 50% (0-70 HU, radius 15-45 mm) and ground glass 30% "
                "(radius 12-35 mm) against the pleura of either lung, posterior 70%; trachea "
                "60% (chest); "
                "lung -920..-780 HU, posterior up to 120 HU denser; foam mattress 50% (15-60 mm, "
                "-960..-750 HU); noise 3-40 HU; blur 0-1.2 mm; reconstruction circle 20%. base: "
                "lungs in the cranial 35-75% of the slices. head: skull, orbits, sinus and "
                "mastoid air, stereotactic frame 50%, head holder with foam cushion 60%, dry skull "
                "(air inside) 20%, field of view 220-320 mm."
            ),
            "augmentation": "per slice on the model grid: rotation -10..10 degrees, correlated "
                            "noise 0-25 HU, grey-level shift -15..15 HU",
        },
        "real": {
            "folders": [str(f) for f in real_folders],
            "series": real_records,
            "slices": real_slices,
            "labels": _labels_record(real_records),
        },
        "held_back": {"volumes": eval_volumes, "seed_stream": "[seed, 2, index]"},
        "epochs": epochs,
        "batch_size": batch_size,
        "crop": f"{crop}x{crop} around the body of each slice (numpy seed stream [seed, 3])",
        "optimizer": f"Adam, cosine decay from {LEARNING_RATE} to 5% over all steps",
        "loss": "sparse categorical cross-entropy + (1 - mean soft Dice of the 3 foreground classes)",
        "architecture": {
            "builder": "analysis.training.unet.build_unet",
            "base_filters": base_filters,
            "levels": 4,
            "head_filters": 8,
            "parameters": int(model.count_params()),
        },
        "source_sha256": {name: _source_hash(name) for name in _SOURCES},
    }


def _labels_record(real_records: list[dict[str, object]]) -> str:
    kinds = {str(r.get("labels")) for r in real_records}
    if kinds == {"classical"}:
        return "classical pipeline ct-body-lungs (analysis.pipeline)"
    if kinds == {"reference"}:
        return ("reference procedure (analysis.reference) with the hand-checked corrections "
                "named per series (analysis.corrections)")
    return "none" if not kinds else ", ".join(sorted(kinds))


def _source_hash(name: str) -> str | None:
    path = _ROOT / name
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.training.lungs",
        description="Train the body-and-lungs U-Net; writes unet.keras and card.json.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--volumes", type=int, default=DEFAULT_VOLUMES,
                        help="generated training volumes (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--slice-size", type=int, default=256)
    parser.add_argument("--eval-volumes", type=int, default=DEFAULT_EVAL_VOLUMES)
    parser.add_argument("--real", type=Path, action="append", default=[], metavar="FOLDER",
                        help="a folder of real CT series to add (repeatable)")
    parser.add_argument("--real-labels", choices=lung_data.REAL_LABELS, default="reference",
                        help="label real series by the reference procedure with their "
                             "hand-checked corrections, or by the classical pipeline")
    parser.add_argument("--corrections", type=Path, metavar="FILE|DIR",
                        help="corrections of the references (default: "
                             "analysis/reference_corrections)")
    args = parser.parse_args(argv)
    try:
        corrections = (training_corrections(args.corrections)
                       if args.real and args.real_labels == "reference" else {})
        card = train_lungs(
            args.out, seed=args.seed, volumes=args.volumes, epochs=args.epochs,
            slice_size=args.slice_size, real_folders=args.real, eval_volumes=args.eval_volumes,
            real_labels=args.real_labels, corrections=corrections,
        )
    except CorrectionsError as error:
        print(f"error: --corrections: {error}", file=sys.stderr)
        return 2
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(card.metrics.get("dice", {}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
