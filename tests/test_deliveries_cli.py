"""``pacsnode deliveries`` and ``pacsnode resend``: what operators see and do.

Deliveries to a PACS that is down fail (a short ``delivery.max_age_h``); an operator
lists them, is told plainly what a bad resend lacks, resends them once the PACS is
back, and finds them in it with the resend in their history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import require_tool
from tests.orthanc import Orthanc, free_ports
from tests.test_outbox import deliveries, destination, of_study, outbox_node, send_study
from tests.test_return_to_pacs import wait_until


def test_operators_list_and_resend_failed_deliveries(db_url: str, make_node: Any,
                                                     tmp_path: Path) -> None:
    require_tool("storescu", "Orthanc")
    http_port, dicom_port = free_ports(2)
    node = outbox_node(make_node, [destination("pacs", dicom_port)], db_url,
                       PACSNODE__DELIVERY__MAX_AGE_H="0.0005")
    study = send_study(node, tmp_path / "ct")
    failed = wait_until(lambda: (d := of_study(node, study, "--status", "failed"))
                        and len(d) == 2 and d, 90, f"failed deliveries\n{node.log()[-3000:]}")
    node.stop()

    listed = deliveries(node, "--status", "failed", "--destination", "pacs")
    assert sorted(d["id"] for d in listed["deliveries"]) == sorted(d["id"] for d in failed)
    assert {d["kind"] for d in failed} == {"seg", "sr"}
    for item in failed:
        assert item["study_instance_uid"] == study and item["circuit"] in ("closed", "open")
        assert "cannot connect" in item["last_error"] and item["next_attempt_at"] is None
    assert listed["destinations"][0]["name"] == "pacs"
    assert deliveries(node, "--destination", "elsewhere")["deliveries"] == []
    table = node.cli("deliveries").stdout
    assert "destination pacs: circuit" in table and "failed" in table and "LAST ERROR" in table

    seg = next(d for d in failed if d["kind"] == "seg")
    for args, message in [
        ((), "say which deliveries to resend"),
        (("999999",), "no delivery with id 999999"),
        ((str(seg["id"]), "--study", study), "give one of"),
        (("--study", "1.2.3.4"), "no study with Study Instance UID 1.2.3.4"),
        (("--destination", "elsewhere", "--status", "failed"), "no destination named 'elsewhere'"),
        (("--destination", "pacs", "--status", "committed"),
         "no deliveries to 'pacs' with status committed"),
    ]:
        result = node.cli("resend", *args, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert {d["status"] for d in of_study(node, study)} == {"failed"}  # nothing changed

    orthanc = Orthanc.start(tmp_path / "orthanc", ports=(http_port, dicom_port))
    try:
        node.extra_env["PACSNODE__DELIVERY__MAX_AGE_H"] = "72"
        out = node.cli("resend", str(seg["id"]), "--reason", "PACS back").stdout
        assert out.startswith("1 deliveries queued")
        again = next(d for d in of_study(node, study) if d["id"] == seg["id"])
        assert again["status"] == "pending" and again["attempts"] == 0
        assert "1 deliveries queued" in node.cli("resend", "--destination", "pacs",
                                                 "--status", "failed").stdout
        node.start()
        wait_until(lambda: (c := orthanc.modalities_of_study(study)).get("SEG")
                   and c.get("SR"), 60, f"the resent results\n{node.log()[-3000:]}")
        done = wait_until(lambda: (d := of_study(node, study, "--history"))
                          and all(x["status"] == "sent" for x in d) and d, 30, "sent")
    finally:
        orthanc.stop()
    history = next(d for d in done if d["id"] == seg["id"])["events"]
    resent = [e for e in history if e["reason"].startswith("resent by an operator")]
    assert len(resent) == 1 and resent[0]["from"] == "failed" and resent[0]["to"] == "pending"
    assert resent[0]["reason"].endswith(": PACS back")
    assert all(d["attempts"] == 1 for d in done)
    assert json.loads(node.cli("study", study, "--json").stdout)["destinations"][0]["state"] \
        == "closed"
