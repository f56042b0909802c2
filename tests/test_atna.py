"""IHE ATNA audit messages (DICOM PS3.15 A.5) from a real node to a local syslog
collector over UDP, TCP and TLS, each message's XML checked against the schema's
structure and its content against what happened."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PACSNODE, free_port, require_tool
from tests.syslog_listener import (
    SyslogListener,
    check_audit_message,
    objects,
    participants,
)
from tests.web_helpers import add_user, logged_in, login

SCRIPTS = Path(__file__).resolve().parents[1] / "deploy" / "tls"
PATIENT = "PHANTOM-001"  # what tests.conftest.make_series writes


def _node(make_node: Any, listener: SyslogListener, **syslog: Any) -> Any:
    config = {"host": "127.0.0.1", "port": listener.port, "transport": listener.transport,
              **syslog}
    return make_node(extra_env={"PACSNODE__AUDIT__SYSLOG": json.dumps(config),
                                "PACSNODE__AUDIT__ENTERPRISE_SITE_ID": "TEST HOSPITAL"})


@pytest.fixture
def udp() -> Any:
    listener = SyslogListener("udp").start()
    yield listener
    listener.close()


def test_udp_messages_for_what_happened(make_node: Any, udp: SyslogListener,
                                        ct_series: Any) -> None:
    require_tool("storescu")
    node = _node(make_node, udp)
    start = udp.wait_for("110100")
    assert start.xml.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    assert start.priority == 85 and start.msgid == "IHE+RFC-3881" and start.app == "pacsnode"
    source = start.xml.find("AuditSourceIdentification")
    assert source.get("AuditSourceID").startswith("PACSNODE@")
    assert source.get("AuditEnterpriseSiteID") == "TEST HOSPITAL"

    node.storescu(*ct_series.paths, calling="CT_ROOM_1")
    received = udp.wait_for("110104", EventActionCode="C").xml
    (study,) = objects(received, "110180")
    assert study.get("ParticipantObjectID") == ct_series.study_instance_uid
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert sop.get("UID") == "1.2.840.10008.5.1.4.1.1.2"
    assert sop.get("NumberOfInstances") == str(len(ct_series.paths))
    (patient,) = objects(received, "2")
    assert patient.get("ParticipantObjectID") == PATIENT
    who = participants(received)
    assert [(p["UserID"], p["role"], p["UserIsRequestor"]) for p in who] == [
        ("CT_ROOM_1", "110153", "true"), ("PACSNODE", "110152", "false")]
    assert who[0]["NetworkAccessPointID"] == "127.0.0.1"

    node.storescu(ct_series.paths[0], called="NOT_US", check=False)
    alert = udp.wait_for("110113").xml
    assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    detail = alert.find("ParticipantObjectIdentification/ParticipantObjectDetail")
    assert "NOT_US" in base64.b64decode(detail.get("value")).decode()
    assert udp.messages[-1].priority == 84  # warning

    add_user(node, "qa", "auditor")
    login(node.web_url, "qa", "not the password")
    failed = udp.wait_for("110114", EventOutcomeIndicator="4").xml
    assert participants(failed)[0]["UserID"] == "qa"
    session = logged_in(node.web_url, "qa")
    udp.wait_for("110114", EventOutcomeIndicator="0")
    session.get(f"{node.web_url}/api/studies", params={"patient_id": PATIENT},
                timeout=10)
    searched = udp.wait_for("110112").xml
    query = searched.find("ParticipantObjectIdentification/ParticipantObjectQuery").text
    assert json.loads(base64.b64decode(query)) == {"patient_id": PATIENT}
    session.get(f"{node.web_url}/studies/{ct_series.study_instance_uid}", timeout=10)
    viewed = udp.wait_for("110103").xml
    assert objects(viewed, "110180")[0].get("ParticipantObjectID") == \
        ct_series.study_instance_uid

    node.stop()
    stop = udp.wait_for("110100", timeout=5, EventActionCode="E")
    assert stop is not None
    stopped = [m for m in udp.messages if m.xml.find("EventIdentification/EventTypeCode") is
               not None and m.xml.find("EventIdentification/EventTypeCode").get("csd-code")
               == "110121"]
    assert len(stopped) == 1
    for message in udp.messages:
        check_audit_message(message.xml)
    # Patient data goes to the repository only, never to the node's log.
    assert PATIENT not in node.log()


def test_tcp_octet_counting(make_node: Any, ct_series: Any) -> None:
    require_tool("storescu")
    listener = SyslogListener("tcp").start()
    try:
        node = _node(make_node, listener)
        listener.wait_for("110100")
        node.storescu(ct_series.paths[0], calling="SOMEONE", called="WRONG", check=False)
        check_audit_message(listener.wait_for("110113").xml)
    finally:
        listener.close()


def test_tls_to_the_repository(make_node: Any, tmp_path: Path) -> None:
    require_tool("openssl")
    pki = tmp_path / "pki"
    for args in (["make-ca.sh", str(pki)], ["make-cert.sh", str(pki), "repository"]):
        subprocess.run([str(SCRIPTS / args[0]), *args[1:]], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "repository.pem", pki / "repository.key")
    listener = SyslogListener("tls", context=context).start()
    try:
        _node(make_node, listener, ca_certificates=str(pki / "ca.pem"))
        check_audit_message(listener.wait_for("110100").xml)
    finally:
        listener.close()


def test_tls_needs_the_ca_named_by_its_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE")}
    env["PACSNODE__AUDIT__SYSLOG"] = '{"host": "repository.example"}'
    result = subprocess.run([*PACSNODE, "studies"], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "audit.syslog: transport tls needs ca_certificates" in result.stderr


SEG, COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


def test_results_delivered_and_not_delivered(make_node: Any, udp: SyslogListener,
                                             tmp_path: Path) -> None:
    """Instances Transferred (action R) for the SEG and SR a real Orthanc stored, and one
    with a failure outcome and the reason for a destination that refused the connection."""
    require_tool("storescu", "Orthanc")
    from tests.orthanc import Orthanc
    from tests.test_outbox import destination, outbox_node, send_study

    orthanc = Orthanc.start(tmp_path / "orthanc")
    try:
        closed = free_port()
        node = outbox_node(make_node, [destination("pacs", orthanc.dicom_port),
                                       destination("down", closed)],
                           PACSNODE__AUDIT__SYSLOG=json.dumps(
                               {"host": "127.0.0.1", "port": udp.port, "transport": "udp"}))
        study = send_study(node, tmp_path / "in")
        sent = udp.wait_for("110104", timeout=120, EventActionCode="R",
                            EventOutcomeIndicator="0").xml
        failed = udp.wait_for("110104", timeout=60, EventActionCode="R",
                              EventOutcomeIndicator="4").xml
    finally:
        orthanc.stop()
    for message, peer_port in ((sent, orthanc.dicom_port), (failed, closed)):
        check_audit_message(message)
        (obj,) = objects(message, "110180")
        assert obj.get("ParticipantObjectID") == study
        assert objects(message, "2")[0].get("ParticipantObjectID") == PATIENT
        who = participants(message)
        # The node sends (requestor, source role); the destination's AE receives.
        assert [(p["UserID"], p["role"], p["UserIsRequestor"]) for p in who] == [
            ("ORTHANC", "110152", "false"), ("PACSNODE", "110153", "true")]
    classes = {s.get("UID"): s.get("NumberOfInstances")
               for s in objects(sent, "110180")[0].iter("SOPClass")}
    assert classes == {SEG: "1", COMPREHENSIVE_3D_SR: "1"}, classes
    reason = failed.find("EventIdentification/EventOutcomeDescription").text
    assert reason and "refused" in reason.lower(), reason
