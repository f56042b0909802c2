"""Storage Commitment against a real Orthanc: a result counts as delivered only once the
PACS reports it safe, and one the PACS does not hold is sent again.

Orthanc sends its report (N-EVENT-REPORT) on a new association to the modality it
knows under the calling AE title (``DicomModalities``). It first runs with that entry
pointing at a port where nothing listens, so no report can reach the node; then again,
on the same storage and ports, pointing at the node's listener.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeProcess, free_port, require_tool
from tests.orthanc import Orthanc, free_ports
from tests.test_outbox import destination, of_study, outbox_node, send_study
from tests.test_return_to_pacs import wait_until


class CommittingOrthanc:
    """An Orthanc whose report goes to ``report_port`` (restartable on its storage)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = tuple(free_ports(2))
        self.server: Orthanc | None = None

    def start(self, report_port: int) -> Orthanc:
        self.stop()
        self.server = Orthanc.start(self.folder, ports=self.ports, extra_config={
            "DicomModalities": {"PACSNODE": ["PACSNODE", "127.0.0.1", report_port]}})
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[CommittingOrthanc]:
    require_tool("Orthanc", "storescu")
    server = CommittingOrthanc(tmp_path / "orthanc")
    yield server
    server.stop()


def committing_node(make_node: Any, pacs: CommittingOrthanc,
                    db_url: str | None = None) -> NodeProcess:
    return outbox_node(make_node, [destination("pacs", pacs.ports[1], storage_commitment=True)],
                       db_url,
                       PACSNODE__DELIVERY__COMMITMENT_TIMEOUT_S="2")


def stored_unconfirmed(node: NodeProcess, orthanc: Orthanc, study: str) -> list[dict[str, Any]]:
    """Wait until Orthanc holds both results while the node still waits for its word."""
    wait_until(lambda: (c := orthanc.modalities_of_study(study)).get("SEG") and c.get("SR"),
               90, f"the results in Orthanc\n{node.log()[-3000:]}")
    return list(wait_until(
        lambda: (d := of_study(node, study)) and all(
            x["status"] == "awaiting_commitment" and x["commitment_requests"] >= 2
            for x in d) and d, 30, f"requests asked again\n{node.log()[-3000:]}"))


def test_delivered_only_once_the_pacs_reports_it(make_node: Any, pacs: CommittingOrthanc,
                                                 tmp_path: Path) -> None:
    orthanc = pacs.start(report_port=free_port())  # its report reaches nobody
    node = committing_node(make_node, pacs)
    study = send_study(node, tmp_path / "ct")
    waiting = stored_unconfirmed(node, orthanc, study)
    # Stored, yet not delivered: no report came; asked again after
    # delivery.commitment_timeout_s, each time under a new Transaction UID.
    assert all(d["sent_at"] and d["committed_at"] is None for d in waiting)
    summary = [s for s in node.studies() if s["study_instance_uid"] == study][0]["results"]
    assert summary["deliveries"] == {"awaiting_commitment": 2}

    pacs.start(report_port=node.port)
    found = wait_until(lambda: (d := of_study(node, study, "--history"))
                       and all(x["status"] == "committed" for x in d) and d, 30,
                       f"the commitment\n{node.log()[-3000:]}")
    for item in found:
        assert item["attempts"] == 1 and item["committed_at"] and item["last_error"] == ""
        reasons = [e["reason"] for e in item["events"]]
        assert any("had no report within delivery.commitment_timeout_s" in r for r in reasons)
        assert "ORTHANC committed to storing it" in reasons[-1]


def test_an_instance_the_pacs_does_not_hold_is_sent_again(
        db_url: str, make_node: Any, pacs: CommittingOrthanc, tmp_path: Path) -> None:
    orthanc = pacs.start(report_port=free_port())
    node = committing_node(make_node, pacs, db_url)
    study = send_study(node, tmp_path / "ct")
    stored_unconfirmed(node, orthanc, study)
    seg = next(s for s in orthanc.series_of_study(study) if s["MainDicomTags"]["Modality"] == "SEG")
    orthanc.delete(f"/instances/{seg['Instances'][0]}")
    assert orthanc.modalities_of_study(study) == {"SR": 1}

    orthanc = pacs.start(report_port=node.port)
    found = wait_until(lambda: (d := of_study(node, study, "--history"))
                       and all(x["status"] == "committed" for x in d) and d, 60,
                       f"the SEG sent again and committed\n{node.log()[-3000:]}")
    by_kind = {d["kind"]: d for d in found}
    assert by_kind["sr"]["attempts"] == 1
    assert by_kind["seg"]["attempts"] == 2  # the report said 0x0112: sent again
    assert any("Storage Commitment failed at ORTHANC: 0x0112 (no such object instance)"
               in e["reason"] and e["to"] == "pending" for e in by_kind["seg"]["events"])
    # The same instance again, not a new one.
    assert orthanc.modalities_of_study(study) == {"SEG": 1, "SR": 1}
    seg = next(s for s in orthanc.series_of_study(study) if s["MainDicomTags"]["Modality"] == "SEG")
    tags = orthanc.get(f"/instances/{seg['Instances'][0]}/simplified-tags")
    assert tags["SOPInstanceUID"] == by_kind["seg"]["sop_instance_uid"]
