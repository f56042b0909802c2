"""Patient data stays private: owner-only files and folders, and no patient name, ID or
birth date in the log at INFO, through receiving, analysing and refusing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom

from node.ingest.storage import InstanceStore
from tests.conftest import NodeProcess, make_series, require_tool

NAME, PATIENT_ID, BIRTH = "Secretname^Jane", "PID-7731-SECRET", "19640229"
CLASSICAL = json.dumps([{"name": "ct", "match": {"modality": "CT"},
                         "pipeline": "ct-body-lungs-classical"}])


def phi_series(folder: Path) -> list[Path]:
    """A series with patient data, and header values the encoders must clean up (which
    the node logs about, without the values)."""
    series = make_series(folder, slices=6, patient_id=PATIENT_ID, patient_name=NAME)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = BIRTH
        ds.PatientSex = "Secretname"  # not M/F/O: a warning, which must not quote it
        ds.save_as(path)
    return list(series.paths)


def wait_analysed(node: NodeProcess, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        studies = node.studies()
        if studies and studies[0]["status"] == "analyzed":
            return node.study(studies[0]["study_instance_uid"])
        time.sleep(0.3)
    raise AssertionError(f"study not analysed:\n{node.log()}")


def modes_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_files_are_owner_only_and_the_log_holds_no_patient_data(tmp_path: Path,
                                                               make_node: Any) -> None:
    require_tool("storescu")
    node = make_node(stable_age_s=1.0, extra_env={"PACSNODE__ROUTES": CLASSICAL,
                                                  "PACSNODE__LOGGING__LEVEL": "INFO"})
    paths = phi_series(tmp_path / "ct")
    node.storescu(*paths)
    detail = wait_analysed(node)
    assert detail["patient_id"] == PATIENT_ID  # the audit view shows it, on purpose
    [series] = detail["series"]
    assert series["analysis"]["status"] == "done", series["analysis"]

    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700
    modes = modes_under(node.data_dir)
    kinds = {Path(name).parts[0] for name in modes}
    assert {"studies", "results", "incoming", "pacsnode.db"} <= kinds, kinds
    assert any(name.endswith("preview.png") for name in modes)
    assert any(name.endswith("-wal") for name in modes)
    wrong = {name: f"{mode:04o}" for name, mode in modes.items()
             if mode != (0o700 if (node.data_dir / name).is_dir() else 0o600)}
    assert not wrong, wrong

    log = node.log()
    assert "INFO" in log and "Patient's Sex is not M/F/O" in log
    for secret in (NAME, "Secretname", PATIENT_ID, BIRTH):
        assert secret not in log, f"{secret!r} is in the node's log"


def test_modes_can_be_widened_for_a_group_but_never_for_everyone(tmp_path: Path) -> None:
    def serve(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "serve"], capture_output=True, text=True,
            timeout=60, env={"PATH": "/usr/bin:/bin", "PACSNODE__NODE__PORT": "1",
                             "PACSNODE__STORAGE__DATA_DIR": str(tmp_path / "var"), **env})

    for key, value in (("FILE_MODE", "0644"), ("DIR_MODE", "0755"), ("FILE_MODE", "0400")):
        result = serve(**{f"PACSNODE__STORAGE__{key}": value})
        assert result.returncode == 2 and f"storage.{key.lower()}" in result.stderr, result.stderr
    assert not (tmp_path / "var").exists()  # refused before anything was created


def test_the_inflated_working_copy_is_owner_only_and_leaves_nothing(tmp_path: Path) -> None:
    """A deflated dataset is inflated into a scratch file in ``incoming`` to be checked:
    patient data, so ``storage.file_mode`` whatever the umask, and gone once closed
    (nothing to clean up after a crash either: it has no name from the start)."""
    store = InstanceStore(tmp_path / "var", file_mode=0o640)
    umask = os.umask(0o077)  # would make it 0600 unless the mode is set explicitly
    try:
        with store.scratch() as scratch:
            scratch.write(b"inflated patient data")
            assert stat.S_IMODE(os.fstat(scratch.fileno()).st_mode) == 0o640
            assert list(store.incoming.iterdir()) == []
    finally:
        os.umask(umask)
    assert list(store.incoming.iterdir()) == []
