"""Train the CT region classifier and write it with its model card.

Training data are generated phantoms (:mod:`analysis.phantoms.regions`, fixed seeds per
region) plus, optionally, real series given as ``(region, DICOM folder)`` pairs. A
separate set of phantoms (other seeds) is held back and only predicted, for the card's
held-back accuracy and confusion matrix; cross-validation on the training set gives
the other estimate. The same arguments always produce the same files.

Command line (the shipped model is exactly the output of the first line)::

    python -m analysis.training.region --out analysis/models/region
    python -m analysis.training.region --out DIR [--classifier rf|svm] [--per-region N] [--seed S]
        [--real REGION=FOLDER ...] [--k K] [--threshold P] [--jobs J]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import sklearn
from joblib import Parallel, delayed
from pydicom.errors import InvalidDicomError
from sklearn.base import clone
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import StratifiedKFold

from analysis.features import NoBodyError, feature_vector, series_features
from analysis.phantoms.regions import make_region_phantom, phantom_volume
from analysis.region import (
    DEFAULT_CLASSIFIER,
    DEFAULT_K,
    DEFAULT_THRESHOLD,
    MODEL_FEATURES,
    OTHER,
    REGIONS,
    RegionModel,
    build_pipeline,
)
from analysis.region_card import CARD_SCHEMA, CLASSIFIERS
from analysis.training import region_real
from analysis.types import ImageVolume
from analysis.volume import volume_from_datasets

log = logging.getLogger("pacsnode.train_region")

MODEL_NAME = "pacsnode-ct-region"
MODEL_VERSION = "1.0.0"
DEFAULT_PER_REGION = 100
DEFAULT_TEST_PER_REGION = 25
DEFAULT_CV_FOLDS = 5
#: Single slices of each phantom added to the training set beside its whole series.
SLICES_PER_PHANTOM = 6
#: Phantom seeds: ``seed * 1_000_000 + split offset + region index * 100_000 + i``.
#: With ``--seed 0`` training uses 0.., held-back 500_000..; seeds from
#: :data:`UNSEEN_SEEDS_START` up to 999_999 are never used by seed 0 and are free for tests.
_SEED_STRIDE = 1_000_000
_TEST_OFFSET = 500_000
_REGION_STRIDE = 100_000
UNSEEN_SEEDS_START = 900_000
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.88",
    "1.2.840.10008.5.1.4.1.1.481",
)


def phantom_seeds(region: str, count: int, seed: int = 0, *, held_back: bool = False) -> list[int]:
    """The phantom seeds of one region in the training or the held-back set."""
    base = (
        seed * _SEED_STRIDE
        + (_TEST_OFFSET if held_back else 0)
        + REGIONS.index(region) * _REGION_STRIDE
    )
    if count > _REGION_STRIDE:
        raise ValueError(f"at most {_REGION_STRIDE} phantoms per region, got {count}")
    return list(range(base, base + count))


def phantom_features(
    region: str, seed: int, overrides: Mapping[str, object] | None = None
) -> np.ndarray:
    """The feature row (:data:`MODEL_FEATURES`) of one generated phantom's whole series."""
    return phantom_samples(region, seed, overrides, slices=0)[0]


def phantom_samples(
    region: str,
    seed: int,
    overrides: Mapping[str, object] | None = None,
    *,
    slices: int = SLICES_PER_PHANTOM,
) -> list[np.ndarray]:
    """Feature rows of one phantom: its whole series, then up to ``slices`` single slices.

    Scanners send single slices and short series too, and a slice alone looks unlike
    the whole series it came from (a neck slice of a chest CT); the slices are picked
    from the phantom's seed.
    """
    volume = phantom_volume(make_region_phantom(region, seed, **dict(overrides or {})))
    rows = [feature_vector(series_features(volume), MODEL_FEATURES)]
    n = volume.hu.shape[0]
    picks = np.random.default_rng([seed, 5]).choice(n, size=min(slices, n), replace=False)
    for i in sorted(int(i) for i in picks):
        try:
            rows.append(feature_vector(series_features(region_real.window(volume, i, i + 1)),
                                       MODEL_FEATURES))
        except NoBodyError:  # a slice beyond the body's end (the vertex, the thighs' gap)
            continue
    return rows


def load_series(folder: Path) -> list[tuple[str, ImageVolume]]:
    """Every image series under ``folder`` as ``(SeriesInstanceUID, volume)``.

    Files that are not DICOM, non-image objects (SEG, SR, RT ...), multi-frame objects,
    localizers and DICOMDIRs are skipped; the rest are grouped by series.
    """
    groups: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        if not _is_image(ds):
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return [(uid, volume_from_datasets(datasets)[0]) for uid, datasets in groups.items()]


def _is_image(ds: pydicom.Dataset) -> bool:
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class or sop_class.startswith(_NON_IMAGE_SOP_PREFIXES) or "PixelData" not in ds:
        return False
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "ImagePositionPatient" not in ds:
        return False
    return "LOCALIZER" not in [str(v).upper() for v in ds.get("ImageType", [])]


def train_region(
    out_dir: Path | str,
    *,
    classifier: str = DEFAULT_CLASSIFIER,
    per_region: int = DEFAULT_PER_REGION,
    test_per_region: int = DEFAULT_TEST_PER_REGION,
    seed: int = 0,
    real: Sequence[tuple[str, Path | str]] = (),
    k: int = DEFAULT_K,
    score_func: str = "f_classif",
    threshold: float = DEFAULT_THRESHOLD,
    cv_folds: int = DEFAULT_CV_FOLDS,
    n_jobs: int = 1,
    phantom_overrides: Mapping[str, object] | None = None,
    real_root: Path | str | None = None,
    real_windows: int = region_real.WINDOWS_PER_SERIES,
) -> dict[str, Any]:
    """Train the region model, evaluate it and save it with its card to ``out_dir``.

    Parameters
    ----------
    out_dir
        Receives ``model.joblib`` and ``card.json`` (created if missing).
    classifier
        ``"et"`` (extremely randomized trees, the default), ``"rf"`` (random forest) or
        ``"svm"``.
    per_region, test_per_region
        Generated phantoms per region for training and for the held-back test.
    seed
        Selects the phantom seeds (:func:`phantom_seeds`) and seeds the classifier and
        the cross-validation split.
    real
        ``(region, folder)`` pairs: every image series in the folder is added to the
        training set with that region.
    k, score_func
        ``SelectKBest`` parameters (see :func:`analysis.region.build_pipeline`).
    threshold
        Below this top probability predictions are "other"; stored in the card.
    cv_folds
        Stratified folds for cross-validation (fewer if a region has fewer samples).
    n_jobs
        Processes generating phantoms and features (the results do not depend on it).
    phantom_overrides
        :func:`analysis.phantoms.regions.make_region_phantom` overrides for every phantom,
        e.g. ``{"matrix": 128}`` for fast tests; recorded in the card.
    real_root
        A folder holding the real series of :data:`region_real.REAL_SERIES`
        (``../shared/data``): their windows join the training set, and each real
        patient is evaluated by a model trained without them (leave one patient out),
        recorded in the card's ``metrics.real_leave_one_patient_out``.
    real_windows
        Windows cut from each real series.

    Returns
    -------
    dict
        The model card as written.
    """
    if per_region < 2 or test_per_region < 1:
        raise ValueError("per_region must be at least 2 and test_per_region at least 1")
    started = time.monotonic()
    overrides = dict(phantom_overrides or {})
    x_train, y_train, whole_train = _synthetic_set(per_region, seed, overrides, n_jobs,
                                                   held_back=False)
    x_test, y_test, whole_test = _synthetic_set(test_per_region, seed, overrides, n_jobs,
                                                held_back=True)
    real_rows, real_record = _real_set(real)
    x_synthetic, y_synthetic = x_train, y_train
    if real_rows:
        x_train = np.vstack([x_train, np.array([row for row, _ in real_rows])])
        y_train = np.concatenate([y_train, np.array([label for _, label in real_rows])])
    windows: list[region_real.RealRow] = []
    if real_root is not None:
        windows, windows_record = region_real.real_rows(Path(real_root), load_series, seed,
                                                        real_windows)
        real_record += windows_record
        x_real, y_real = region_real.trainable(windows)
        if len(y_real):
            x_train = np.vstack([x_train, x_real])
            y_train = np.concatenate([y_train, y_real])
    log.info(
        "features of %d training and %d held-back series in %.1f s",
        len(y_train),
        len(y_test),
        time.monotonic() - started,
    )

    pipeline = build_pipeline(classifier, k=k, score_func=score_func, seed=seed)
    with _constant_features_allowed():
        cv = _cross_validate(pipeline, x_train, y_train, cv_folds, seed)
        pipeline.fit(x_train, y_train)
    model_card = _card(
        pipeline,
        classifier=classifier,
        k=k,
        score_func=score_func,
        threshold=threshold,
        seed=seed,
        per_region=per_region,
        test_per_region=test_per_region,
        overrides=overrides,
        real=real_record,
        y_train=y_train,
        cv=cv,
        held_back=_held_back(pipeline, x_test[whole_test], y_test[whole_test], threshold),
        held_back_slices=_held_back(pipeline, x_test[~whole_test], y_test[~whole_test],
                                    threshold),
        reference=_reference_rows(x_synthetic, y_synthetic, whole_train, seed),
    )
    if windows:
        with _constant_features_allowed():
            per_patient = region_real.leave_one_patient_out(pipeline, x_synthetic, y_synthetic,
                                                            windows, threshold)
        model_card["metrics"]["real_leave_one_patient_out"] = {
            "patients": per_patient, **region_real.summary(per_patient),
            "windows_per_series": real_windows,
            "note": "each real patient predicted by a model trained on the phantoms and the "
                    "other real patients only; 'other' patients (limbs) are never trained "
                    "on and count as right when the model answers 'other'",
        }
    model = RegionModel(pipeline, model_card)
    model.save(out_dir)
    log.info("trained and saved to %s in %.1f s", out_dir, time.monotonic() - started)
    return model.card


@contextlib.contextmanager
def _constant_features_allowed() -> Iterator[None]:
    """A feature constant over the training set (no arms anywhere in a tiny set, say)
    scores zero in SelectKBest, as it should; its F statistic divides by zero."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.filterwarnings("ignore", message="Features .* are constant", category=UserWarning)
        yield


def _synthetic_set(
    count: int, seed: int, overrides: Mapping[str, object], n_jobs: int, *, held_back: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, their regions, and which rows are whole series (the rest single slices)."""
    jobs = [
        (region, s)
        for region in REGIONS
        for s in phantom_seeds(region, count, seed, held_back=held_back)
    ]
    samples = Parallel(n_jobs=n_jobs)(
        delayed(phantom_samples)(region, s, overrides) for region, s in jobs
    )
    rows = [row for sample in samples for row in sample]
    regions = [region for (region, _), sample in zip(jobs, samples, strict=True) for _ in sample]
    whole = [i == 0 for sample in samples for i in range(len(sample))]
    return np.array(rows, dtype=np.float64), np.array(regions), np.array(whole)


def _real_set(
    real: Sequence[tuple[str, Path | str]],
) -> tuple[list[tuple[np.ndarray, str]], list[dict[str, Any]]]:
    rows, record = [], []
    for region, folder in real:
        if region not in REGIONS:
            raise ValueError(
                f"unknown region {region!r} for {folder}; expected one of {', '.join(REGIONS)}"
            )
        series = load_series(Path(folder))
        if not series:
            raise ValueError(f"no image series found in {folder}")
        for _, volume in series:
            rows.append((feature_vector(series_features(volume), MODEL_FEATURES), region))
        record.append(
            {
                "region": region,
                "folder": str(folder),
                "series": len(series),
                "slices": [int(v.hu.shape[0]) for _, v in series],
            }
        )
    return rows, record


def _cross_validate(
    pipeline: Any, x: np.ndarray, y: np.ndarray, folds: int, seed: int
) -> dict[str, Any]:
    smallest = min(np.unique(y, return_counts=True)[1])
    folds = max(2, min(folds, int(smallest)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = np.empty(len(y), dtype=object)
    scores = []
    for train, test in splitter.split(x, y):
        fold = clone(pipeline).fit(x[train], y[train])
        predicted[test] = fold.classes_[np.argmax(fold.predict_proba(x[test]), axis=1)]
        scores.append(float(np.mean(predicted[test] == y[test])))
    return {
        "folds": folds,
        "accuracy": float(np.mean(predicted == y)),
        "fold_accuracy_std": float(np.std(scores)),
        "confusion": confusion_matrix(y, predicted.astype(str), labels=list(REGIONS)).tolist(),
    }


def _held_back(pipeline: Any, x: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    probs = pipeline.predict_proba(x)
    predicted = pipeline.classes_[np.argmax(probs, axis=1)]
    confident = probs.max(axis=1) >= threshold
    return {
        "count": len(y),
        "accuracy": float(np.mean(predicted == y)),
        "confusion": confusion_matrix(y, predicted, labels=list(REGIONS)).tolist(),
        # With the threshold applied: how often the model says "other", and how often
        # it is right when it does not.
        "other_rate": float(1.0 - confident.mean()),
        "confident_accuracy": float(np.mean(predicted[confident] == y[confident]))
        if confident.any()
        else 0.0,
    }


def _reference_rows(
    x_train: np.ndarray, y_train: np.ndarray, whole: np.ndarray, seed: int
) -> dict[str, Any]:
    """The first training phantom's whole-series features per region, to 6 significant digits.

    A test recomputes them: if phantoms or features change, the shipped model no longer
    matches what the documented command would train, and must be retrained.
    """
    first = {region: int(np.flatnonzero((y_train == region) & whole)[0]) for region in REGIONS}
    return {
        region: {
            "seed": phantom_seeds(region, 1, seed)[0],
            "features": [float(f"{v:.6g}") for v in x_train[first[region]]],
        }
        for region in REGIONS
    }


def _selected_features(pipeline: Any) -> list[str]:
    support = pipeline.named_steps["select"].get_support()
    return [name for name, keep in zip(MODEL_FEATURES, support, strict=True) if keep]


def _card(
    pipeline: Any,
    *,
    classifier: str,
    k: int,
    score_func: str,
    threshold: float,
    seed: int,
    per_region: int,
    test_per_region: int,
    overrides: Mapping[str, object],
    real: list[dict[str, Any]],
    y_train: np.ndarray,
    cv: Mapping[str, Any],
    held_back: Mapping[str, Any],
    held_back_slices: Mapping[str, Any],
    reference: Mapping[str, Any],
) -> dict[str, Any]:
    estimator = pipeline.named_steps["classify"]
    params = {
        key: value
        for key, value in estimator.get_params().items()
        if isinstance(value, (int, float, str, bool)) or value is None
    }
    counts = {region: int(np.sum(y_train == region)) for region in REGIONS}
    command = (
        f"python -m analysis.training.region --out DIR --classifier {classifier} "
        f"--per-region {per_region} --seed {seed}"
    )
    command += "".join(f" --real {r['region']}={r['folder']}" for r in real
                       if "patient" not in r)
    if any("patient" in r for r in real):
        command += " --real-data DATA"  # the folder holding region_real.REAL_SERIES
    if k != DEFAULT_K:
        command += f" --k {k}"
    return {
        "schema": CARD_SCHEMA,
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "task": "region",
        "description": (
            "Anatomical region of an axial CT series (head, chest, abdomen, pelvis) from "
            "hand-crafted intensity, shape, air, bone-arrangement and GLCM texture features; "
            "'other' below the threshold."
        ),
        "labels": list(REGIONS),
        "other_label": OTHER,
        "threshold": float(threshold),
        "classifier": {"kind": classifier, "estimator": type(estimator).__name__, "params": params},
        "feature_selection": {"score_func": score_func, "k": int(k)},
        "features": {
            "extractor": "analysis.features.series_features",
            "input": list(MODEL_FEATURES),
            "selected": _selected_features(pipeline),
        },
        "training_data": {
            "synthetic": {
                "generator": "analysis.phantoms.regions.make_region_phantom",
                "per_region": per_region,
                "held_back_per_region": test_per_region,
                "seed": seed,
                "train_seeds": {r: _span(phantom_seeds(r, per_region, seed)) for r in REGIONS},
                "held_back_seeds": {
                    r: _span(phantom_seeds(r, test_per_region, seed, held_back=True))
                    for r in REGIONS
                },
                "overrides": {key: _jsonable(value) for key, value in overrides.items()},
                "reference": reference,
            },
            "real": real,
            "counts": counts,
            "command": command,
        },
        "metrics": {
            "cv_accuracy": cv["accuracy"],
            "cv_folds": cv["folds"],
            "cv_fold_accuracy_std": cv["fold_accuracy_std"],
            "cv_confusion": {"labels": list(REGIONS), "matrix": cv["confusion"]},
            "held_back_accuracy": held_back["accuracy"],
            "held_back_count": held_back["count"],
            "held_back_confusion": {"labels": list(REGIONS), "matrix": held_back["confusion"]},
            "held_back_other_rate": held_back["other_rate"],
            "held_back_confident_accuracy": held_back["confident_accuracy"],
            "held_back_slices": {
                "count": held_back_slices["count"],
                "accuracy": held_back_slices["accuracy"],
                "other_rate": held_back_slices["other_rate"],
                "confusion": {"labels": list(REGIONS), "matrix": held_back_slices["confusion"]},
            },
            "note": "accuracies are of the top class (no threshold) on generated phantoms; "
            "held_back_* are whole series, held_back_slices single slices of them; the "
            "training set holds each phantom's whole series and up to "
            f"{SLICES_PER_PHANTOM} of its slices; confusion rows are the truth, columns "
            "the predictions",
        },
        "intended_use": (
            "Routing and header sanity checks (BodyPartExamined) in pacsnode; not for diagnosis. "
            "Axial CT of adults and children in head-first or feet-first position."
        ),
        "limitations": [
            "Trained on generated phantoms only unless real series are listed under "
            "training_data.real; accuracy on real scans is not measured by these metrics.",
            "Four regions only: neck, extremities and whole-body series should come out 'other' "
            "but may not.",
            "Series spanning two regions (chest-abdomen) get one label, of the larger part, or "
            "'other'; a few slices at the thoraco-abdominal junction tend to be called chest.",
            "Slices more than 45 degrees off axial are not classified.",
        ],
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "sklearn_version": sklearn.__version__,
        "model_file": "model.joblib",
        "model_sha256": "0" * 64,  # replaced by RegionModel.save
    }


def _span(seeds: Sequence[int]) -> list[int]:
    return [int(seeds[0]), int(seeds[-1])]


def _jsonable(value: object) -> object:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


# ---------------------------------------------------------------------------- command


def _real_pair(text: str) -> tuple[str, Path]:
    region, sep, folder = text.partition("=")
    if not sep or region not in REGIONS or not folder:
        raise argparse.ArgumentTypeError(
            f"expected REGION=FOLDER with REGION one of {', '.join(REGIONS)}, got {text!r}"
        )
    return region, Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.training.region", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for model.joblib and card.json"
    )
    parser.add_argument("--classifier", choices=list(CLASSIFIERS), default=DEFAULT_CLASSIFIER)
    parser.add_argument(
        "--per-region", type=int, default=DEFAULT_PER_REGION, help="training phantoms per region"
    )
    parser.add_argument(
        "--test-per-region",
        type=int,
        default=DEFAULT_TEST_PER_REGION,
        help="held-back phantoms per region",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--real",
        type=_real_pair,
        action="append",
        default=[],
        metavar="REGION=FOLDER",
        help="add the image series in FOLDER as REGION (repeatable)",
    )
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="features kept by SelectKBest")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="below this top probability the label is 'other'",
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes for phantoms and features")
    parser.add_argument("--real-data", type=Path, metavar="DIR",
                        help="folder of the real series in region_real.REAL_SERIES "
                             "(../shared/data): trained on, and evaluated leave-one-patient-out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    card = train_region(
        args.out,
        classifier=args.classifier,
        per_region=args.per_region,
        test_per_region=args.test_per_region,
        seed=args.seed,
        real=args.real,
        k=args.k,
        threshold=args.threshold,
        n_jobs=args.jobs,
        real_root=args.real_data,
    )
    m = card["metrics"]
    print(f"wrote {args.out}/model.joblib and card.json")
    print(
        f"cross-validated accuracy {m['cv_accuracy']:.3f} ({m['cv_folds']} folds), "
        f"held-back accuracy {m['held_back_accuracy']:.3f} on {m['held_back_count']} phantoms"
    )
    print("held-back confusion (rows truth, columns predicted):", ", ".join(REGIONS))
    for region, row in zip(REGIONS, m["held_back_confusion"]["matrix"], strict=True):
        print(f"  {region:8s} {row}")
    print("selected features:", ", ".join(card["features"]["selected"]))
    if "real_leave_one_patient_out" in m:
        print(region_real.format_report(m["real_leave_one_patient_out"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
