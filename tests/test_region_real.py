"""Real series for the region classifier (analysis/training/region_real.py): windows cut
from a series, training with a real-data folder, and a leave-one-patient-out evaluation
that never trains on the patient it tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.regions import make_region_phantom, phantom_volume
from analysis.region import OTHER
from analysis.training import region_real
from analysis.training.region import UNSEEN_SEEDS_START, train_region
from tests.conftest import SHARED_DATA
from tests.test_region import TINY


def test_a_window_is_the_slices_it_says() -> None:
    volume = phantom_volume(make_region_phantom("chest", UNSEEN_SEEDS_START, matrix=64,
                                                slices=10))
    part = region_real.window(volume, 3, 7)
    assert part.hu.shape[0] == 4
    np.testing.assert_array_equal(part.hu, volume.hu[3:7])
    np.testing.assert_allclose(part.affine @ [0, 5, 5, 1], volume.affine @ [3, 5, 5, 1])
    bounds = region_real.window_bounds(100, 24, np.random.default_rng(0))
    assert len(bounds) == 24 and all(0 <= a < b <= 100 and b - a <= 40 for a, b in bounds)
    assert region_real.window_bounds(3, 24, np.random.default_rng(0)) == [
        (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


class _Recorder(ClassifierMixin, BaseEstimator):
    """Remembers the rows of every fit; predicts the first class it saw."""

    fits: ClassVar[list[set[tuple[float, ...]]]] = []

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Recorder:
        type(self).fits.append({tuple(row) for row in x})
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        probs = np.zeros((len(x), len(self.classes_)))
        probs[:, 0] = 1.0
        return probs


def test_leave_one_patient_out_never_trains_on_the_patient_it_tests() -> None:
    def row(value: float, region: str, patient: str, whole: bool) -> region_real.RealRow:
        return region_real.RealRow(np.full(3, value), region, patient, whole)

    rows = [row(1, "chest", "A", True), row(2, "chest", "A", False),
            row(3, "head", "B", True), row(4, "head", "B", False),
            row(5, OTHER, "C", True)]
    _Recorder.fits.clear()
    result = region_real.leave_one_patient_out(
        _Recorder(), np.full((2, 3), 9.0), np.array(["abdomen", "pelvis"]), rows, 0.6)
    assert [p["patient"] for p in result] == ["A", "B", "C"]
    for patient, fitted in zip("ABC", _Recorder.fits, strict=True):
        own = {tuple(r.features) for r in rows if r.patient == patient}
        assert not own & fitted, patient
        assert (9.0, 9.0, 9.0) in fitted  # the phantoms always
        # "other" patients are never trained on, even when another patient is held out.
        assert (5.0, 5.0, 5.0) not in fitted
    assert result[0]["series"] == [{"predicted": "abdomen", "probability": 1.0}]
    assert result[0]["window_accuracy"] == 0.0 and result[0]["windows"] == 1
    assert region_real.summary(result)["series_accuracy"] == 0.0


def test_training_with_a_real_data_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_ct_series(make_region_phantom("chest", UNSEEN_SEEDS_START + 1, matrix=128, slices=6),
                    root / "ct-chest-lidc")
    write_ct_series(make_region_phantom("head", UNSEEN_SEEDS_START + 2, matrix=128, slices=6),
                    root / "ct-phantom-tilted")
    card: dict[str, Any] = train_region(tmp_path / "m", per_region=3, test_per_region=1, k=5,
                                        cv_folds=2, phantom_overrides=TINY, real_root=root,
                                        real_windows=2)
    used = [(r["folder"], r["region"], r["trained_on"]) for r in card["training_data"]["real"]]
    assert used == [("ct-chest-lidc", "chest", True), ("ct-phantom-tilted", "head", True)]
    # Each real series gives itself and 2 windows.
    # Phantoms give their whole series and single slices; the real chest 3 rows more.
    assert card["training_data"]["counts"]["chest"] > 3 + 3
    assert " --real-data DATA" in card["training_data"]["command"]
    evaluation = card["metrics"]["real_leave_one_patient_out"]
    assert [p["patient"] for p in evaluation["patients"]] == ["LIDC-IDRI-0314", "head-phantom"]
    assert all(p["windows"] == 2 for p in evaluation["patients"])
    assert 0.0 <= evaluation["series_accuracy"] <= 1.0
    assert "leave one patient out" in region_real.format_report(evaluation)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
def test_the_real_series_list_names_folders_that_exist() -> None:
    for folder, _, _ in region_real.REAL_SERIES:
        assert (SHARED_DATA / folder).is_dir(), folder


def test_every_real_slice_is_scored_alone(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_ct_series(make_region_phantom("chest", UNSEEN_SEEDS_START + 3, matrix=64, slices=5),
                    root / "ct-chest-lidc")
    write_ct_series(make_region_phantom("head", UNSEEN_SEEDS_START + 4, matrix=64, slices=3),
                    root / "ct-phantom-tilted")
    from analysis.training.region import load_series

    seen: list[int] = []

    def predict(volume: Any) -> str:
        seen.append(volume.hu.shape[0])
        return "chest"

    result = region_real.slice_accuracy(predict, root, load_series)
    assert seen == [1] * 8  # one slice at a time, every slice of both series
    assert [(p["patient"], p["right"], p["slices"]) for p in result["patients"]] == [
        ("LIDC-IDRI-0314", 5, 5), ("head-phantom", 0, 3)]
    assert result["accuracy"] == round(5 / 8, 3)
    assert result["confusion"] == {"chest": {"chest": 5}, "head": {"chest": 3}}
    assert "5 of 8 right" in region_real.format_slices(result)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
def test_the_shipped_model_on_every_real_slice_and_series() -> None:
    """The issue's targets on the real series (figures in docs/models.md): at least 90%
    of the slices right, the head CT called head, the limb crops other."""
    from analysis.region import load_region_model
    from analysis.training.region import load_series

    model = load_region_model()
    result = region_real.slice_accuracy(lambda v: model.predict(v).label, SHARED_DATA,
                                        load_series)
    assert result["slices"] == 491
    assert result["accuracy"] >= 0.9, region_real.format_slices(result)
    by_patient = {p["patient"]: p for p in result["patients"]}
    assert by_patient["head-phantom"]["right"] >= 40
    for crop in ("STS_001", "STS_002", "STS_003"):
        assert by_patient[crop]["right"] == by_patient[crop]["slices"], crop
    [(_, head)] = load_series(SHARED_DATA / "ct-phantom-tilted")
    assert model.predict(head).label == "head"
