"""Real CT for the region classifier: samples cut from real series, and an evaluation
that never tests on a patient it trained on.

A real series gives the classifier more than one example: each window of consecutive
slices (1 to 40, at seeded random places) is a series a scanner could have sent, and
its features are computed as for any series. The real data are the folders of
:data:`REAL_SERIES` under a data root (``../shared/data`` here); a folder that is
absent is skipped and the card records what was used.

Leave one patient out: for each real patient, the classifier is trained on the
phantoms and the windows of every *other* real patient, then predicts the held-out
patient's whole series and windows. Patients labelled ``other`` (limbs) are never
trained on; they measure whether the model stays unsure where it should.

:func:`slice_accuracy` scores any model on every single slice of the real series;
``python -m analysis.training.region_real --data ../shared/data [--model DIR]`` prints
it for the shipped model, which has seen no real data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone

from analysis.features import feature_vector, series_features
from analysis.region import MODEL_FEATURES, OTHER, REGIONS, decide
from analysis.types import ImageVolume

log = logging.getLogger("pacsnode.train_region")

#: (folder under the data root, region, patient). ``other``: evaluated, never trained.
REAL_SERIES: tuple[tuple[str, str, str], ...] = (
    ("ct-chest-lidc", "chest", "LIDC-IDRI-0314"),
    ("ct-chest-slice", "chest", "CT1"),
    ("ct-liver-3slice", "abdomen", "dcmqi-liver"),
    ("ct-phantom-tilted", "head", "head-phantom"),
    ("ct-extremity-sts/STS_001", OTHER, "STS_001"),
    ("ct-extremity-sts/STS_002", OTHER, "STS_002"),
    ("ct-extremity-sts/STS_003", OTHER, "STS_003"),
)
WINDOWS_PER_SERIES = 24
MAX_WINDOW_SLICES = 40


@dataclass(frozen=True)
class RealRow:
    """One sample: the features of a whole real series or of a window of it."""

    features: np.ndarray
    region: str
    patient: str
    whole: bool  # the whole series, not a window
    fov_cut_frac: float = 0.0  # decides "other" by rule, as RegionModel.predict_features does


def window(volume: ImageVolume, start: int, stop: int) -> ImageVolume:
    """Slices ``start:stop`` of ``volume`` as a volume of their own."""
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ np.array([start, 0, 0, 1.0]))[:3]
    return ImageVolume(hu=volume.hu[start:stop], spacing_mm=volume.spacing_mm, affine=affine)


def window_bounds(slices: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``count`` windows (or every window, when there are fewer) of 1 to 40 slices."""
    if slices <= 3:
        return [(a, b) for a in range(slices) for b in range(a + 1, slices + 1)][:count]
    bounds = []
    for _ in range(count):
        length = int(rng.integers(1, min(MAX_WINDOW_SLICES, slices) + 1))
        start = int(rng.integers(0, slices - length + 1))
        bounds.append((start, start + length))
    return bounds


def real_rows(root: Path, load: Any, seed: int = 0,
              windows: int = WINDOWS_PER_SERIES) -> tuple[list[RealRow], list[dict[str, Any]]]:
    """Feature rows of the real series under ``root``, and a record of what was used.

    ``load(folder)`` returns ``[(series_uid, volume)]`` (the training module's loader).
    """
    rows: list[RealRow] = []
    record: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for folder, region, patient in REAL_SERIES:
        path = root / folder
        if not path.is_dir():
            log.warning("real data %s is absent; not used", path)
            continue
        series = load(path)
        for _, volume in series:
            parts = [(volume, True)] + [(window(volume, start, stop), False) for start, stop
                                         in window_bounds(volume.hu.shape[0], windows, rng)]
            for part, whole in parts:
                features = series_features(part)
                rows.append(RealRow(feature_vector(features, MODEL_FEATURES), region, patient,
                                    whole, features["fov_cut_frac"]))
        record.append({"folder": folder, "region": region, "patient": patient,
                       "series": len(series),
                       "slices": [int(v.hu.shape[0]) for _, v in series],
                       "trained_on": region != OTHER})
    return rows, record


def trainable(rows: Sequence[RealRow]) -> tuple[np.ndarray, np.ndarray]:
    """The rows a model may learn from (regions it knows; ``other`` never)."""
    kept = [r for r in rows if r.region in REGIONS]
    if not kept:
        return np.empty((0, 0)), np.empty(0, dtype=str)
    return np.array([r.features for r in kept]), np.array([r.region for r in kept])


def leave_one_patient_out(pipeline: Any, x_synthetic: np.ndarray, y_synthetic: np.ndarray,
                          rows: Sequence[RealRow], threshold: float) -> list[dict[str, Any]]:
    """Per real patient: trained without them, how their series and windows come out.

    Returns one dict per patient: region, whole-series prediction and probability,
    the fraction of windows predicted right (``other`` counts as right for ``other``
    patients and wrong for the rest), and the windows' predictions counted by label.
    """
    out = []
    for patient in dict.fromkeys(r.patient for r in rows):
        held = [r for r in rows if r.patient == patient]
        x_real, y_real = trainable([r for r in rows if r.patient != patient])
        x = np.vstack([x_synthetic, x_real]) if len(y_real) else x_synthetic
        y = np.concatenate([y_synthetic, y_real]) if len(y_real) else y_synthetic
        model = clone(pipeline).fit(x, y)
        labels = [_decide(model, r, threshold) for r in held]
        region = held[0].region
        whole = [(label, p) for (label, p), r in zip(labels, held, strict=True) if r.whole]
        windows = [label for (label, _), r in zip(labels, held, strict=True) if not r.whole]
        out.append({
            "patient": patient,
            "region": region,
            "series": [{"predicted": label, "probability": round(p, 3)} for label, p in whole],
            "windows": len(windows),
            "window_accuracy": round(float(np.mean([w == region for w in windows])), 3)
            if windows else None,
            "window_predictions": {label: windows.count(label)
                                   for label in (*REGIONS, OTHER) if label in windows},
        })
    return out


def _decide(model: Any, row: RealRow, threshold: float) -> tuple[str, float]:
    """As :meth:`RegionModel.predict_features` decides, for a bare fitted pipeline."""
    probs = model.predict_proba(row.features[None, :])[0]
    decided = decide([str(c) for c in model.classes_], probs, threshold, row.fov_cut_frac)
    return decided.label, decided.probability


def summary(per_patient: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over every held-out series and window, and per region."""
    by_region: dict[str, list[float]] = {}
    series_right = []
    for p in per_patient:
        for s in p["series"]:
            series_right.append(s["predicted"] == p["region"])
        if p["window_accuracy"] is not None:
            by_region.setdefault(p["region"], []).append(p["window_accuracy"])
    return {
        "series_accuracy": round(float(np.mean(series_right)), 3) if series_right else None,
        "window_accuracy_by_region": {r: round(float(np.mean(v)), 3)
                                      for r, v in by_region.items()},
    }


def format_report(evaluation: dict[str, Any]) -> str:
    """The leave-one-patient-out figures as a text table."""
    lines = ["real patients, each left out of training (leave one patient out):",
             f"  {'patient':16s} {'truth':8s} {'series predicted':26s} windows right"]
    for p in evaluation["patients"]:
        series = ", ".join(f"{s['predicted']} {s['probability']:.2f}" for s in p["series"])
        right = "-" if p["window_accuracy"] is None else f"{p['window_accuracy']:.0%}"
        lines.append(f"  {p['patient']:16s} {p['region']:8s} {series:26s} {right} of "
                     f"{p['windows']} {p['window_predictions']}")
    lines.append(f"  whole series right: {evaluation['series_accuracy']}; windows right by "
                 f"region: {evaluation['window_accuracy_by_region']}")
    return "\n".join(lines)


def slice_accuracy(predict: Any, root: Path, load: Any) -> dict[str, Any]:
    """Every single slice of every real series under ``root``, predicted alone.

    ``predict(volume)`` returns a label. Returns per patient the slices right and the
    labels counted, the accuracy over all slices, and the confusion (truth -> predicted
    -> count). A slice whose features cannot be computed (no body) counts as ``other``.
    """
    patients: list[dict[str, Any]] = []
    confusion: dict[str, dict[str, int]] = {}
    for folder, region, patient in REAL_SERIES:
        path = root / folder
        if not path.is_dir():
            continue
        labels = [predict(window(volume, i, i + 1))
                  for _, volume in load(path) for i in range(volume.hu.shape[0])]
        for label in labels:
            row = confusion.setdefault(region, {})
            row[label] = row.get(label, 0) + 1
        patients.append({"patient": patient, "region": region, "slices": len(labels),
                         "right": sum(label == region for label in labels),
                         "predicted": {label: labels.count(label) for label in sorted(set(labels))}})
    total = sum(p["slices"] for p in patients)
    right = sum(p["right"] for p in patients)
    return {"patients": patients, "slices": total, "right": right,
            "accuracy": round(right / total, 3) if total else None, "confusion": confusion}


def format_slices(result: dict[str, Any]) -> str:
    """:func:`slice_accuracy` as a text table."""
    lines = [f"  {'patient':16s} {'truth':8s} {'slices right':>14s}  predicted"]
    for p in result["patients"]:
        lines.append(f"  {p['patient']:16s} {p['region']:8s} {p['right']:6d} of {p['slices']:<5d} "
                     f"{p['predicted']}")
    lines.append(f"  all real slices: {result['right']} of {result['slices']} right "
                 f"({result['accuracy']:.1%})" if result["slices"] else "  no real data found")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Score a region model on every slice of the real series (it must not have trained on them)."""
    import argparse

    from analysis.region import load_region_model
    from analysis.training.region import load_series

    parser = argparse.ArgumentParser(prog="python -m analysis.training.region_real",
                                     description=main.__doc__)
    parser.add_argument("--data", required=True, type=Path, help="e.g. ../shared/data")
    parser.add_argument("--model", help="a region model directory (default: the shipped one)")
    args = parser.parse_args(argv)
    model = load_region_model(args.model)
    result = slice_accuracy(lambda v: model.predict(v).label, args.data, load_series)
    print(format_slices(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
