"""The outbox through real processes: a sender per destination, the circuit breaker, the
age limit, and a crash between sending and recording.

Results come from the node's own analysis of a small generated CT (the classical
``ct-body`` pipeline: quick, no TensorFlow); destinations are a real Orthanc, a port
where nothing listens, a socket that accepts connections and never answers, and an
interceptor (pynetdicom, in this process) that passes C-STOREs on to Orthanc.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from tests.conftest import NodeProcess, free_port, require_tool
from tests.orthanc import Orthanc, free_ports
from tests.test_return_to_pacs import wait_until
from tests.web_helpers import add_user, logged_in

ROUTES = json.dumps([{"name": "ct", "match": {"modality": "CT"}, "pipeline": "ct-body"}])
SPEC = PhantomSpec(slices=12, rows=64, columns=64, pixel_spacing_mm=6.0, seed=5)


def destination(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port, **extra}


def outbox_node(make_node: Any, destinations: list[dict[str, Any]], db_url: str | None = None,
                **env: str) -> NodeProcess:
    return make_node(db_url=db_url, stable_age_s=1.0, extra_env={
        "PACSNODE__ROUTES": ROUTES,
        "PACSNODE__DESTINATIONS": json.dumps(destinations),
        "PACSNODE__DELIVERY__RETRY_INITIAL_S": "0.5",
        "PACSNODE__DELIVERY__RETRY_JITTER": "0",
        **env,
    })


def send_study(node: NodeProcess, folder: Path, seed: int = 5) -> str:
    spec = PhantomSpec(**{**SPEC.__dict__, "seed": seed})
    series = write_ct_series(make_phantom(spec), folder)
    node.storescu(*series.paths)
    return series.study_instance_uid


def deliveries(node: NodeProcess, *args: str) -> dict[str, Any]:
    return dict(json.loads(node.cli("deliveries", "--json", *args).stdout))


def of_study(node: NodeProcess, study: str, *args: str) -> list[dict[str, Any]]:
    return list(deliveries(node, "--study", study, *args)["deliveries"])


def circuit(node: NodeProcess, name: str) -> dict[str, Any]:
    return next(c for c in deliveries(node)["destinations"] if c["name"] == name)


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel accepts connections that nobody ever reads or answers: an
    A-ASSOCIATE-RQ to it waits until the requestor gives up."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield int(server.getsockname()[1])
    server.close()


def test_a_silent_destination_delays_no_other(make_node: Any, orthanc: Orthanc,
                                              silent_port: int, tmp_path: Path) -> None:
    require_tool("storescu")
    # The silent one first: a single sender would try it first, and wait the whole
    # connect timeout before Orthanc's turn.
    node = outbox_node(make_node, [destination("silent", silent_port),
                                   destination("orthanc", orthanc.dicom_port)],
                       PACSNODE__DELIVERY__CONNECT_TIMEOUT_S="30")
    study = send_study(node, tmp_path / "ct")
    wait_until(lambda: (c := orthanc.modalities_of_study(study)).get("SEG") and c.get("SR"),
               90, f"the results in Orthanc\n{node.log()[-3000:]}")
    found = wait_until(lambda: (d := of_study(node, study, "--destination", "orthanc"))
                       and all(x["status"] == "sent" for x in d) and d, 20, "sent")
    job = node.study(study)["series"][0]["analysis"]
    # Sent within seconds of the job's end, while the silent destination still holds its
    # first association request (30 s).
    assert max((at(d["sent_at"]) - at(job["finished_at"])).total_seconds()
               for d in found) < 10
    silent = of_study(node, study, "--destination", "silent")
    assert {d["status"] for d in silent} <= {"sending", "pending"}
    assert all(d["sent_at"] is None for d in silent)
    # Once the timeout has passed, the silent one's error says what happened.
    failed = wait_until(lambda: [d for d in of_study(node, study, "--destination", "silent")
                                 if d["last_error"]], 60, "the silent destination's error")
    assert "cannot connect" in failed[0]["last_error"]


def test_circuit_opens_probes_and_the_backlog_flows(make_node: Any, tmp_path: Path) -> None:
    require_tool("storescu", "Orthanc")
    http_port, dicom_port = free_ports(2)
    node = outbox_node(make_node, [destination("late", dicom_port)],
                       PACSNODE__DELIVERY__BREAKER_FAILURES="3",
                       PACSNODE__DELIVERY__RETRY_MAX_S="2")
    first = send_study(node, tmp_path / "ct0", seed=0)
    opened = wait_until(lambda: (c := circuit(node, "late"))["state"] != "closed" and c,
                        90, f"the circuit to open\n{node.log()[-3000:]}")
    assert opened["consecutive_failures"] == 3 and "cannot connect" in opened["last_error"]
    assert opened["next_probe_at"] is not None
    second = send_study(node, tmp_path / "ct1", seed=1)  # results while the circuit is open
    wait_until(lambda: len(of_study(node, second)) == 2, 60, "the second study's results")
    # While open, one probe per interval: the oldest delivery alone is tried again.
    wait_until(lambda: circuit(node, "late")["consecutive_failures"] >= 5, 30, "probes")
    seg, sr = sorted(of_study(node, first), key=lambda d: d["id"])
    assert seg["attempts"] >= 5 and sr["attempts"] == 3, (seg, sr)
    assert [d["attempts"] for d in of_study(node, second)] == [0, 0]
    # The dashboard shows the open circuit, its failures and its error to a viewer.
    add_user(node, "view", "viewer")
    web = logged_in(node.web_url, "view")
    shown = web.get(f"{node.web_url}/api/dashboard", timeout=10).json()
    assert shown["circuits"]["late"]["state"] in ("open", "half-open"), shown
    assert shown["deliveries"]["late"]["pending"] >= 2
    row = _dashboard_row(web.get(f"{node.web_url}/", timeout=10).text, "late")
    assert ("open" in row or "half-open" in row) and "cannot connect" in row, row

    orthanc = Orthanc.start(tmp_path / "orthanc", ports=(http_port, dicom_port))
    try:
        for study in (first, second):
            wait_until(lambda: (c := orthanc.modalities_of_study(study)).get("SEG")
                       and c.get("SR"), 30, "the backlog in Orthanc")
        wait_until(lambda: {d["status"] for s in (first, second) for d in of_study(node, s)}
                   == {"sent"}, 20, "all sent")
        closed = circuit(node, "late")
        assert closed["state"] == "closed" and closed["consecutive_failures"] == 0
        # Once the probe got through, the backlog went at once: one attempt each.
        assert sorted(d["attempts"] for d in of_study(node, second)) == [1, 1]
        assert [d["attempts"] for d in of_study(node, first) if d["id"] == sr["id"]] == [4]
        row = _dashboard_row(web.get(f"{node.web_url}/", timeout=10).text, "late")
        assert ">closed<" in row and "cannot connect" not in row, row
    finally:
        orthanc.stop()


def _dashboard_row(page: str, name: str) -> str:
    """The dashboard's table row of one destination."""
    assert page.count('id="destinations"') == 1, f"{len(page)} characters, table repeated"
    table = page[page.index('id="destinations"'):]
    rows = [r for r in table.split("<tr>") if f">{name}</a>" in r]
    assert rows, table[:2000]
    return rows[0].split("</tr>")[0]


def test_a_delivery_fails_after_max_age_with_its_last_error(db_url: str, make_node: Any,
                                                            tmp_path: Path) -> None:
    require_tool("storescu")
    # 3.6 s, and a port where nothing listens (connection refused).
    node = outbox_node(make_node, [destination("gone", free_port())], db_url,
                       PACSNODE__DELIVERY__MAX_AGE_H="0.001")
    study = send_study(node, tmp_path / "ct")
    found = wait_until(lambda: (d := of_study(node, study, "--history"))
                       and all(x["status"] == "failed" for x in d) and d, 90,
                       f"the deliveries to fail\n{node.log()[-3000:]}")
    for item in found:
        assert "delivery.max_age_h" in item["last_error"]
        assert "cannot connect" in item["last_error"]
        assert item["events"][-1]["to"] == "failed"
        assert item["attempts"] >= 1
    listed = node.cli("deliveries", "--status", "failed").stdout
    assert "circuit" in listed and found[0]["sop_instance_uid"][-20:] in listed


class Interceptor:
    """A C-STORE SCP that passes every instance on to Orthanc (REST), and kills the node
    on the first SEG after passing it on but before answering: the node has sent the
    instance and dies before it can record that."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.node: NodeProcess | None = None
        self.received: list[tuple[str, str, bytes]] = []  # (modality, SOP UID, dataset)
        self._lock = threading.Lock()
        ae = AE("ORTHANC")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        dataset = event.dataset
        with self._lock:
            first_seg = dataset.Modality == "SEG" and not any(
                m == "SEG" for m, _, _ in self.received)
            self.received.append((str(dataset.Modality), str(dataset.SOPInstanceUID),
                                  bytes(event.request.DataSet.getvalue())))
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.orthanc.http_port}/instances",
            data=bytes(event.encoded_dataset()))
        urllib.request.urlopen(request, timeout=30).read()
        if first_seg and self.node is not None:
            self.node.kill()
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_a_crash_between_send_and_record_resends_the_same_instance(
        make_node: Any, orthanc: Orthanc, tmp_path: Path) -> None:
    require_tool("storescu")
    interceptor = Interceptor(orthanc)
    try:
        node = outbox_node(make_node, [destination("pacs", interceptor.port)],
                           PACSNODE__JOBS__LEASE_S="2")
        interceptor.node = node
        study = send_study(node, tmp_path / "ct")
        wait_until(lambda: node.proc is not None and node.proc.poll() is not None, 90,
                   f"the node to be killed mid-send\n{node.log()[-3000:]}")
        node.start()  # a new process: it takes over the dead one's deliveries
        found = wait_until(lambda: (d := of_study(node, study, "--history"))
                           and all(x["status"] == "sent" for x in d) and d, 60,
                           f"the deliveries resent\n{node.log()[-3000:]}")
    finally:
        interceptor.stop()
    results = {r["kind"]: r["sop_instance_uid"]
               for r in node.study(study)["series"][0]["analysis"]["results"]}
    modalities = [m for m, _, _ in interceptor.received]
    # SEG before SR, each time; the SEG twice: sent, crash, sent again.
    assert modalities == ["SEG", "SEG", "SR"], modalities
    (_, first_uid, first), (_, again_uid, again) = interceptor.received[:2]
    assert first_uid == again_uid == results["seg"] and first == again  # the same bytes
    assert interceptor.received[2][1] == results["sr"]
    assert orthanc.modalities_of_study(study) == {"SEG": 1, "SR": 1}
    by_id = sorted(found, key=lambda d: d["id"])
    assert [d["attempts"] for d in by_id] == [2, 2]
    assert any("sending the same file again" in e["reason"] for e in by_id[0]["events"])


def test_a_pacs_that_refuses_the_seg_is_up_and_the_sr_waits(make_node: Any,
                                                          tmp_path: Path) -> None:
    """A PACS that takes no SEG answers all the same: its circuit stays closed, the SEG
    backs off alone with the reason, and its SR is never sent before it."""
    require_tool("storescu")
    ae = AE("ORTHANC")
    ae.supported_contexts = [cx for cx in AllStoragePresentationContexts
                             if cx.abstract_syntax != "1.2.840.10008.5.1.4.1.1.66.4"]
    stored: list[str] = []
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: stored.append(event.dataset.Modality) or 0x0000)])
    try:
        node = outbox_node(make_node, [destination("no-seg", server.server_address[1])],
                           PACSNODE__DELIVERY__BREAKER_FAILURES="2")
        study = send_study(node, tmp_path / "ct")
        seg = wait_until(lambda: (d := [x for x in of_study(node, study) if x["kind"] == "seg"])
                         and d[0]["attempts"] >= 3 and d[0], 60,
                         f"the SEG tried again\n{node.log()[-3000:]}")
        sr = next(x for x in of_study(node, study) if x["kind"] == "sr")
    finally:
        server.shutdown()
    assert "accepted no presentation context for SOP class 1.2.840.10008.5.1.4.1.1.66.4" \
        in seg["last_error"] and seg["status"] in ("pending", "sending")
    # Each round claims the SR with its SEG (one association for both), so it may be
    # seen "sending" mid-round; it is never tried while its SEG is not stored.
    assert sr["status"] in ("pending", "sending") and sr["attempts"] == 0 and stored == []
    assert circuit(node, "no-seg")["state"] == "closed"
