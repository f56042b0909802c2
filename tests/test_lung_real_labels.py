"""Real training series for the lungs U-Net, labelled by the reference procedure (with the
hand-checked corrections) or by the classical pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.corrections import Correction, Corrections
from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from analysis.slice_grid import GridSpec
from analysis.training import lung_data
from node.cli import main

SPEC = PhantomSpec(slices=6, rows=128, columns=128, pixel_spacing_mm=2.8, trachea=True,
                   stomach_gas=False, bowel_gas=False, arms=False)
GRID = GridSpec(size=64, pixel_spacing_mm=8.0, hu_window=(-1000.0, 600.0), pad_hu=-1000.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real") / "chest"
    write_ct_series(make_phantom(SPEC), path)
    return path


def _uid(folder: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(next(p for p in sorted(folder.rglob("*")) if p.is_file())).SeriesInstanceUID)


@pytest.mark.parametrize("labels", lung_data.REAL_LABELS)
def test_real_series_get_body_and_both_lungs(folder: Path, labels: str) -> None:
    slices, records = lung_data.real_slices([folder], GRID, labels=labels)
    assert len(slices) == SPEC.slices
    assert records[0]["labels"] == labels and records[0]["slices"] == SPEC.slices
    classes = set(np.unique(slices.y).tolist())
    assert classes == {0, 1, 2, 3}, classes


def test_reference_labels_follow_the_hand_checked_corrections(folder: Path) -> None:
    uid = _uid(folder)
    no_lung = Corrections("x", uid, False, source="no-lung.json")
    slices, records = lung_data.real_slices([folder], GRID, corrections={uid: no_lung})
    assert records[0]["corrections"] == "no-lung.json"
    assert set(np.unique(slices.y).tolist()) == {0, 1}  # the lungs are body now
    relabel = Corrections("x", uid, True, source="swap.json", corrections=(
        Correction("erase", slices=(0, SPEC.slices), rows=(0, SPEC.rows),
                   columns=(0, SPEC.columns), labels=("lung_left",)),))
    slices, _ = lung_data.real_slices([folder], GRID, corrections={uid: relabel})
    assert 2 not in np.unique(slices.y) and 3 in np.unique(slices.y)


def test_unknown_labels_are_refused(folder: Path) -> None:
    with pytest.raises(ValueError, match="labels must be one of reference, classical"):
        lung_data.real_slices([folder], GRID, labels="manual")


def test_train_cli_names_a_bad_corrections_file(folder: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code = main(["train", "--task", "lungs", "--out", str(tmp_path / "m"), "--real",
                 str(folder), "--corrections", str(bad), "--epochs", "1", "--volumes", "1"])
    assert code != 0
    assert "--corrections" in capsys.readouterr().err
    code = main(["train", "--task", "lungs", "--out", str(tmp_path / "m"), "--real",
                 str(folder), "--corrections", str(tmp_path / "absent"), "--epochs", "1"])
    assert code != 0
    assert "absent: no such file or folder" in capsys.readouterr().err


def test_evaluate_refuses_a_model_that_is_not_configured(folder: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", str(folder), "--model", "mine"])
    assert code != 0
    assert "--model 'mine': not in the configuration's models (none configured)" in (
        capsys.readouterr().err)


def test_training_module_names_the_bad_field_of_a_corrections_file(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.training.lungs import main as train_main

    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "pacsnode.reference-corrections/1", "series_instance_uid": "1.2",'
                   ' "lung": "yes", "checked": "by eye"}')
    code = train_main(["--out", str(tmp_path / "m"), "--real", str(folder),
                       "--corrections", str(bad), "--epochs", "1", "--volumes", "1"])
    assert code == 2
    assert "bad.json: lung: must be bool, got str" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_training_module_applies_the_corrections_and_the_card_says_so(
        folder: Path, tmp_path: Path) -> None:
    import json

    from analysis.corrections import SCHEMA
    from analysis.training.lungs import main as train_main

    fixes = tmp_path / "fixes.json"
    fixes.write_text(json.dumps({"schema": SCHEMA, "series_instance_uid": _uid(folder),
                                 "lung": False, "checked": "test: no lung"}))
    out = tmp_path / "m"
    code = train_main(["--out", str(out), "--real", str(folder), "--corrections", str(fixes),
                       "--epochs", "1", "--volumes", "2", "--slice-size", "64",
                       "--eval-volumes", "1"])
    assert code == 0
    real = json.loads((out / "card.json").read_text())["training"]["real"]
    assert real["series"][0]["corrections"] == str(fixes)
    assert real["labels"].startswith("reference procedure")
