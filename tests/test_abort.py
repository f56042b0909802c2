"""A sender that aborts in the middle of an instance leaves nothing behind.

The node indexes an instance of a known series as soon as the elements before its
Pixel Data arrive (so that only the fsync and link remain after the last fragment);
when the rest never comes, that row must go again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.conftest import NodeProcess, make_series, query, require_tool


def _encoded(path: Path) -> bytes:
    encoded = encode(pydicom.dcmread(path), is_implicit_vr=False, is_little_endian=True)
    assert encoded is not None
    return encoded


@dataclass
class HalfSent:
    """A C-STORE whose request and first half of its dataset are on the wire."""

    assoc: Association
    rest: list[bytes]  # the P-DATA-TF PDUs not sent yet

    def finish(self) -> None:
        """Send the rest (the response is not read here: the node's database says what it
        stored) and release."""
        for fragment in self.rest:
            self.assoc.dul.send_pdu(fragment)
        time.sleep(1.0)  # for the node to store it and answer
        self.assoc.release()


def _send_half(node: NodeProcess, path: Path) -> HalfSent:
    """Send a C-STORE request and the first half of its dataset's PDUs, then pause: the
    elements before Pixel Data are all in the first PDU, the pixels still to come."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="HALFSENDER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, max_pdu=16384)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(_encoded(path))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    fragments = list(message.encode_msg(context_id, 16384))
    assert len(fragments) > 4
    half = len(fragments) // 2
    for fragment in fragments[:half]:
        assoc.dul.send_pdu(fragment)
    return HalfSent(assoc, fragments[half:])


_INSTANCE = ("select i.file_path, a.calling_ae, a.instances_stored from instances i "
             "join associations a on a.id = i.association_fk where i.sop_instance_uid = :uid")
_OUTCOME = "select outcome, instances_stored from associations where calling_ae = :ae"


def _poll(node: NodeProcess, sql: str, done: Callable[[list[dict[str, Any]]], bool],
          timeout: float = 10, **params: Any) -> list[dict[str, Any]]:
    """The rows of ``sql`` once ``done`` accepts them, or the last rows after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        rows = query(node.db_url, sql, **params)
        if done(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_abort_mid_instance_takes_the_early_row_back(make_node: Any, tmp_path: Path) -> None:
    require_tool("storescu")
    node = make_node()
    series = make_series(tmp_path / "s", slices=3, size=256)
    node.storescu(series.paths[0])  # the series is known: its next instances index early
    uid = series.sop_instance_uids[1]
    half = _send_half(node, series.paths[1])

    # While the pixels are still arriving, the instance's row is committed (and counted
    # on the association) though its file does not exist yet.
    rows = _poll(node, _INSTANCE, bool, uid=uid)
    assert rows == [{"file_path": f"studies/{series.study_instance_uid}/"
                                  f"{series.series_instance_uid}/{uid}.dcm",
                     "calling_ae": "HALFSENDER", "instances_stored": 1}], "no early row"
    assert not (node.data_dir / rows[0]["file_path"]).exists()

    half.assoc.abort()
    _poll(node, _OUTCOME, lambda r: bool(r) and r[0]["outcome"] == "aborted", ae="HALFSENDER")
    # The DUL thread takes the row back, the association's thread closes its record:
    # in no fixed order, so wait for the row to go too.
    assert _poll(node, _INSTANCE, lambda r: not r, uid=uid) == []
    assert query(node.db_url, _OUTCOME, ae="HALFSENDER") == [
        {"outcome": "aborted", "instances_stored": 0}]
    (study,) = node.studies()
    assert study["instances"] == 1, study
    assert not list((node.data_dir / "incoming").iterdir())
    stored = list((node.data_dir / "studies").rglob("*.dcm"))
    assert [p.stem for p in stored] == [series.sop_instance_uids[0]]
    detail = node.study(series.study_instance_uid)
    (assoc,) = [a for a in detail["associations"] if a["calling_ae"] == "STORESCU"]
    assert assoc["instances_of_this_study"] == 1

    # The same instance sent whole afterwards is stored and indexed as new.
    node.storescu(series.paths[1])
    (study,) = node.studies()
    assert study["instances"] == 2


def test_a_study_that_went_quiet_during_a_slow_instance_is_reopened(
    make_node: Any, tmp_path: Path
) -> None:
    """The early row restarts the quiet period when the transfer begins; an instance
    still arriving after study.stable_age_s reopens the study when it completes, and the
    series, analysed meanwhile without that instance's file, is analysed again."""
    require_tool("storescu")
    routes = json.dumps([{"name": "body", "match": {"modality": "CT"}, "pipeline": "ct-body"}])
    node = make_node(stable_age_s=1.0, extra_env={"PACSNODE__ROUTES": routes})
    series = make_series(tmp_path / "s", slices=2, size=256)
    node.storescu(series.paths[0])
    half = _send_half(node, series.paths[1])
    time.sleep(6.0)  # longer than study.stable_age_s: the study goes quiet meanwhile
    half.finish()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        study = node.study(series.study_instance_uid)
        analysis = study["series"][0]["analysis"]
        if study["status"] == "analyzed" and analysis and analysis["status"] == "done":
            break
        time.sleep(0.3)
    transitions = [(e["from"], e["to"]) for e in study["events"]]
    assert ("analyzed", "receiving") in transitions, transitions
    assert study["instances"] == 2
    jobs = study["series"][0]["jobs"]
    assert jobs[-1]["status"] == "done" and jobs[-1]["instances"] == 2, jobs
