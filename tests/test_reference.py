"""Reference lungs (analysis/reference.py, node/reference.py, ``pacsnode reference``)
against generated phantoms whose truth is known."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from analysis.corrections import (
    SCHEMA,
    CorrectionsError,
    apply_corrections,
    parse_corrections,
)
from analysis.phantoms.trunk import (
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    PhantomSpec,
    make_phantom,
    phantom_affine,
)
from analysis.pipeline import dice
from analysis.reference import reference_lungs
from analysis.types import LUNG_LEFT, LUNG_RIGHT
from analysis.volume import volume_from_datasets
from node.cli import main
from tests.test_anatomy import _restored
from tests.test_results import dciodvfy_clean

SPEC = PhantomSpec(slices=24, rows=160, columns=160, pixel_spacing_mm=2.2, trachea=True,
                   stomach_gas=True, bowel_gas=True, heart=True, ribs=True, arms=True)
SPACING = (SPEC.slice_thickness_mm, SPEC.pixel_spacing_mm, SPEC.pixel_spacing_mm)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SPEC)


def test_procedure_matches_the_phantom_truth(phantom) -> None:
    found = reference_lungs(phantom.hu, SPACING, phantom_affine(SPEC))
    assert dice(found.left, phantom.labels == LABEL_LUNG_LEFT) >= 0.95
    assert dice(found.right, phantom.labels == LABEL_LUNG_RIGHT) >= 0.95
    assert found.airways.any(), found.notes  # the trachea was grown and taken out
    assert not (found.airways & (found.left | found.right)).any()
    assert any("gas component" in note for note in found.notes)


def test_the_whole_tracheal_lumen_is_airway_not_lung(phantom) -> None:
    """Streaks across the lumen lift part of it above the growing threshold (as on
    LIDC-IDRI-0314, where 1-2 cm2 per slice of the trachea became "right lung")."""
    lumen = reference_lungs(phantom.hu, SPACING, phantom_affine(SPEC)).airways
    hu = phantom.hu.copy()
    for k in np.flatnonzero(lumen.any(axis=(1, 2))):
        rows = np.flatnonzero(lumen[k].any(axis=1))
        lower = lumen[k] & (np.arange(hu.shape[1]) >= rows.mean())[:, None]
        hu[k][lower] = -930.0  # air, above the -950 HU of the growing
    found = reference_lungs(hu, SPACING, phantom_affine(SPEC))
    assert lumen.sum() > 100
    assert not ((found.left | found.right) & lumen).any()
    assert dice(found.right, phantom.labels == LABEL_LUNG_RIGHT) >= 0.95


@pytest.mark.parametrize("flip_rows, flip_columns", [(False, True), (True, True)],
                         ids=["mirrored", "prone"])
def test_sides_follow_the_patient(phantom, flip_rows: bool, flip_columns: bool) -> None:
    from analysis.phantoms.dicom_series import ct_series_datasets

    volume, order = volume_from_datasets(_restored(ct_series_datasets(phantom),
                                                   flip_rows, flip_columns))
    found = reference_lungs(volume.hu, volume.spacing_mm, volume.affine)
    labels = phantom.labels[order]
    if flip_rows:
        labels = labels[:, ::-1]
    if flip_columns:
        labels = labels[:, :, ::-1]
    assert dice(found.left, labels == LABEL_LUNG_LEFT) >= 0.95
    assert dice(found.right, labels == LABEL_LUNG_RIGHT) >= 0.95


def _document(**changes: object) -> dict:
    data = {"schema": SCHEMA, "name": "x", "series_instance_uid": "1.2.3", "lung": True,
            "corrections": [], "checked": "looked at every slice"}
    data.update(changes)
    return data


@pytest.mark.parametrize("changes, field", [
    ({"schema": "other/1"}, "schema"),
    ({"series_instance_uid": 5}, "series_instance_uid"),
    ({"checked": " "}, "checked"),
    ({"lung": "yes"}, "lung"),
    ({"colour": 1}, "colour"),
    ({"corrections": [{"action": "paint"}]}, "corrections[0].action"),
    ({"corrections": [{"action": "erase", "slices": [3, 1], "rows": [0, 1],
                       "columns": [0, 1]}]}, "corrections[0].slices"),
    ({"corrections": [{"action": "relabel", "slice": 0, "row": 0, "column": 0,
                       "to": "liver"}]}, "corrections[0].to"),
    ({"corrections": [{"action": "drop", "slice": 0, "row": 0}]}, "corrections[0].column"),
    ({"lung": False, "corrections": [{"action": "drop", "slice": 0, "row": 0, "column": 0}]},
     "corrections"),
])
def test_corrections_errors_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(CorrectionsError, match="f.json: " + re.escape(field)):
        parse_corrections(_document(**changes), "f.json")


def test_corrections_erase_drop_and_relabel() -> None:
    left = np.zeros((4, 10, 10), bool)
    right = np.zeros_like(left)
    left[:, 1:4, 1:4] = True
    left[:, 6:9, 6:9] = True  # a second piece, given the wrong side
    right[:, 1:4, 6:9] = True
    corrections = parse_corrections(_document(corrections=[
        {"action": "erase", "slices": [0, 1], "rows": [0, 10], "columns": [0, 10]},
        {"action": "relabel", "slice": 2, "row": 7, "column": 7, "to": "lung_right"},
        {"action": "drop", "slice": 2, "row": 2, "column": 7},
    ]))
    out = apply_corrections({LUNG_LEFT: left, LUNG_RIGHT: right}, corrections)
    assert not out[LUNG_LEFT][0].any() and not out[LUNG_RIGHT][0].any()
    assert out[LUNG_RIGHT][1:, 6:9, 6:9].all() and not out[LUNG_LEFT][:, 6:9, 6:9].any()
    assert not out[LUNG_RIGHT][:, 1:4, 6:9].any()
    assert out[LUNG_LEFT][1:, 1:4, 1:4].all()
    no_lung = parse_corrections(_document(lung=False))
    assert not any(m.any() for m in apply_corrections({LUNG_LEFT: left, LUNG_RIGHT: right},
                                                      no_lung).values())


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, phantom):
    from analysis.phantoms.dicom_series import write_ct_series

    folder = tmp_path_factory.mktemp("series")
    return folder, write_ct_series(phantom, folder)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_a_valid_seg_and_evaluate_reads_it_back(
        series, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, info = series
    code, out, err = _run(capsys, "reference", "--task", "lungs", str(folder),
                          "--out", str(tmp_path / "ref"))
    assert code == 0, err
    [item] = json.loads(out)["series"]
    seg = dcmread(item["seg"])
    assert seg.StudyInstanceUID == info.study_instance_uid
    assert seg.SeriesDescription == "Reference lungs (threshold + corrections)"
    types = {str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence}
    assert types == {"44029006", "3341006"}
    referenced = {str(i.ReferencedSOPInstanceUID)
                  for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(info.sop_instance_uids)
    dciodvfy_clean(Path(item["seg"]))

    from node.config import load_settings
    from node.evaluate import evaluate_paths

    [score] = evaluate_paths([folder], load_settings(None), references=[tmp_path / "ref"])
    assert score.dice[LUNG_LEFT]["classical"] > 0.9, score.as_dict()
    assert score.dice[LUNG_RIGHT]["final"] > 0.85, score.as_dict()


def test_cli_errors(series, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = series
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "reference", "--task", "lungs", str(empty),
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "no image series found" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_document(series_instance_uid="1.2.3.4")))
    code, _, err = _run(capsys, "reference", "--task", "lungs", str(folder),
                        "--out", str(tmp_path / "o"), "--corrections", str(other))
    assert code == 2 and "for series 1.2.3.4, which is not among" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_document(lung=1)))
    code, _, err = _run(capsys, "reference", "--task", "lungs", str(folder),
                        "--out", str(tmp_path / "o"), "--corrections", str(bad))
    assert code == 2 and "bad.json: lung: must be bool" in err


def test_no_lung_series_gets_no_seg(series, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder, info = series
    stated = tmp_path / "none.json"
    stated.write_text(json.dumps(_document(series_instance_uid=info.series_instance_uid,
                                           lung=False)))
    code, out, _ = _run(capsys, "reference", "--task", "lungs", str(folder),
                        "--out", str(tmp_path / "o"), "--corrections", str(stated))
    [item] = json.loads(out)["series"]
    assert code == 0 and item["status"] == "no-lung" and "seg" not in item
    assert not list((tmp_path / "o").iterdir())


def test_shipped_corrections_are_valid() -> None:
    from analysis.corrections import load_corrections

    folder = Path(__file__).resolve().parents[1] / "analysis" / "reference_corrections"
    found = load_corrections(folder)
    assert len(found) == 7
    assert sum(not c.lung for c in found.values()) == 4


def test_false_lung_volume_and_worst_slice() -> None:
    from types import SimpleNamespace

    from analysis.types import ImageVolume
    from node.evaluate import false_lung

    volume = ImageVolume(hu=np.zeros((3, 10, 10), np.float32), spacing_mm=(2.0, 1.0, 1.0),
                         affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    found = np.zeros((3, 10, 10), bool)
    found[1, :5, :4] = True  # 20 px of 1 mm2 on one slice
    found[2, 0, 0] = True
    empty = np.zeros_like(found)
    result = SimpleNamespace(masks={LUNG_LEFT: found, LUNG_RIGHT: empty},
                             candidates={"cnn": {LUNG_LEFT: empty, LUNG_RIGHT: empty}})
    out = false_lung(result, volume)  # type: ignore[arg-type]
    assert out["final"] == pytest.approx({"volume_ml": 21 * 2.0 / 1000, "worst_slice_cm2": 0.2})
    assert out["cnn"] == {"volume_ml": 0.0, "worst_slice_cm2": 0.0}


def test_slices_holding_a_lung_where_a_segmenter_found_none_of_it() -> None:
    from types import SimpleNamespace

    from analysis.types import ImageVolume
    from node.evaluate import missed_slices

    volume = ImageVolume(hu=np.zeros((4, 20, 20), np.float32), spacing_mm=(2.0, 1.0, 1.0),
                         affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    truth = np.zeros((4, 20, 20), bool)
    truth[0:3, 5:15, 2:14] = True  # 1.2 cm2 per slice on slices 0-2
    truth[3, 0, 0] = True  # a 1 mm2 sliver: does not count as holding lung
    final = truth.copy()
    final[1] = False  # missed on slice 1
    cnn = np.zeros_like(truth)
    cnn[:, 5:15, 14:20] = True  # lung, in the wrong place: no overlap
    empty = np.zeros_like(truth)
    result = SimpleNamespace(masks={LUNG_LEFT: final, LUNG_RIGHT: empty},
                             candidates={"cnn": {LUNG_LEFT: cnn, LUNG_RIGHT: empty}})
    out = missed_slices(result, {LUNG_LEFT: truth, LUNG_RIGHT: empty}, volume)  # type: ignore[arg-type]
    assert out[LUNG_LEFT] == {"slices": 3, "final": 1, "cnn": 3}
    assert out[LUNG_RIGHT] == {"slices": 0, "final": 0, "cnn": 0}
