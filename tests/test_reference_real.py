"""Reference lungs on the real series of ../shared/data (skipped when it is absent):
the procedure with the shipped corrections, and the pipeline's masks against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.pipeline import dice
from analysis.types import LUNG_LEFT, LUNG_RIGHT
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent"
)
CORRECTIONS = Path(__file__).resolve().parents[1] / "analysis" / "reference_corrections"


def _reference(folder: str):
    from analysis.corrections import load_corrections
    from node.offline import read_folder
    from node.reference import reference_for_series
    from node.workflow.analyze import load_series

    by_series, _ = read_folder([SHARED_DATA / folder])
    uid, datasets = max(by_series.items(), key=lambda kv: len(kv[1]))
    datasets = [ds for ds in datasets if ds.get("Modality") == "CT"]
    outcome = reference_for_series(datasets, load_corrections(CORRECTIONS).get(uid))
    return outcome, load_series(datasets, {})


def patient_x(volume, mask: np.ndarray) -> float:
    k, r, c = np.nonzero(mask)
    return float((volume.affine[0, 1] * r.mean() + volume.affine[0, 2] * c.mean()
                  + volume.affine[0, 3]))


@pytest.mark.parametrize("folder, left_ml, right_ml", [
    ("ct-chest-slice", (50, 60), (57, 67)),
    ("ct-liver-3slice", (20, 28), (20, 28)),
])
def test_reference_and_pipeline_on_small_real_series(folder: str, left_ml, right_ml) -> None:
    from analysis.pipeline import get_pipeline
    from node.config import load_settings
    from node.workflow.analyze import pipeline_context

    outcome, loaded = _reference(folder)
    assert outcome.status == "written" and outcome.seg is not None
    assert left_ml[0] <= outcome.volumes_ml[LUNG_LEFT] <= left_ml[1], outcome.volumes_ml
    assert right_ml[0] <= outcome.volumes_ml[LUNG_RIGHT] <= right_ml[1], outcome.volumes_ml
    volume = loaded.volume
    assert patient_x(volume, outcome.masks[LUNG_LEFT]) > patient_x(volume, outcome.masks[LUNG_RIGHT])
    pipeline = get_pipeline("ct-body-lungs")
    result = pipeline.run(volume, pipeline_context(pipeline, load_settings(None), None))
    # The figures of docs/models.md ("Reference lungs"), with a margin.
    for label in (LUNG_LEFT, LUNG_RIGHT):
        assert dice(result.masks[label], outcome.masks[label]) >= 0.88, label
        assert dice(result.candidates["classical"][label], outcome.masks[label]) >= 0.96, label


@pytest.mark.parametrize("folder", ["ct-extremity-sts/STS_003", "ct-phantom-tilted"])
def test_no_lung_series_state_it(folder: str) -> None:
    outcome, _ = _reference(folder)
    assert outcome.status == "no-lung" and outcome.seg is None
    assert "corrections state no lung" in outcome.reason


@pytest.fixture(scope="module")
def lidc():
    return _reference("ct-chest-lidc")  # about 40 s on 2 cores


def test_lidc_reference(lidc) -> None:
    outcome, loaded = lidc
    assert outcome.status == "written"
    assert 1850 <= outcome.volumes_ml[LUNG_LEFT] <= 1950, outcome.volumes_ml
    assert 900 <= outcome.volumes_ml[LUNG_RIGHT] <= 960, outcome.volumes_ml
    assert any(note.startswith("airways grown") for note in outcome.notes), outcome.notes
    volume = loaded.volume
    assert patient_x(volume, outcome.masks[LUNG_LEFT]) > 30
    assert patient_x(volume, outcome.masks[LUNG_RIGHT]) < -30


@pytest.mark.parametrize("folder", ["ct-extremity-sts/STS_001", "ct-extremity-sts/STS_002",
                                    "ct-extremity-sts/STS_003", "ct-phantom-tilted"])
def test_no_lung_where_there_is_none(folder: str) -> None:
    """The issue's targets on real series without lung, which no shipped model trains on:
    under 5 mL of final "lung" per series and under 2 cm2 on any slice."""
    from analysis.pipeline import get_pipeline
    from node.config import load_settings
    from node.evaluate import false_lung
    from node.workflow.analyze import pipeline_context

    _, loaded = _reference(folder)
    pipeline = get_pipeline("ct-body-lungs")
    result = pipeline.run(loaded.volume, pipeline_context(pipeline, load_settings(None), None))
    found = false_lung(result, loaded.volume)["final"]
    assert found["volume_ml"] < 5.0, found
    assert found["worst_slice_cm2"] < 2.0, found
