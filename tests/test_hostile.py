"""Memory is bounded by the configuration, never by what a peer claims.

Real sockets against a real node: PDU lengths beyond the limits are aborted before
anything is allocated, slow negotiators are closed, one host cannot take every
association, and oversized or deflate-bomb datasets are refused with 0xA700.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import NodeProcess, dcmtk_env, query, require_tool
from tests.raw_peer import (
    COMMAND,
    LAST,
    RawAssociation,
    associate_rq,
    fragments,
    p_data,
    pdv,
    read_pdu,
    store_command,
)
from tests.test_refusals import (
    associate,
    association_rows,
    encode,
    instance,
    raw_send,  # noqa: F401  (a fixture)
    store,
    write_part10,
)

_CLAIM = 0xFFFFFFF0  # ~4 GiB
OUT_OF_RESOURCES = 0xA700
# Presentation contexts of the raw associations: {context ID: (SOP class, syntax)}.
_CT = {1: (CTImageStorage, ExplicitVRLittleEndian)}
_TWO = {**_CT, 3: (MRImageStorage, ExplicitVRLittleEndian)}


def _node(make_node: Any, **keys: str) -> NodeProcess:
    env = {f"PACSNODE__NODE__{key.upper()}": value for key, value in keys.items()}
    return make_node(extra_env=env)


def _rss_kb(node: NodeProcess, field: str = "VmRSS") -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """All bytes the node sends until it closes the connection, and how long it took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    received = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def _connect(node: NodeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=10)


def _echoscu(node: NodeProcess, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-v", "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )


def _deflate_bomb(inflated: int) -> bytes:
    """A deflated CT dataset whose Pixel Data (OB, all zeros) inflates to ``inflated``."""
    ds = instance(generate_uid(), generate_uid(), PixelData=None)
    head = encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(head)]
    zeros = bytes(1 << 20)
    for _ in range(inflated >> 20):
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    return b"".join(parts)


def _send_bomb(node: NodeProcess, tmp_path: Path, inflated: int) -> tuple[int, str]:
    bomb = _deflate_bomb(inflated)
    sop = generate_uid()
    path = write_part10(tmp_path / "bomb.dcm", bomb, CTImageStorage, sop,
                        DeflatedExplicitVRLittleEndian)
    assoc = associate(node, "BOMBER", (CTImageStorage, DeflatedExplicitVRLittleEndian))
    try:
        return store(assoc, path)
    finally:
        assoc.release()


def _assert_nothing_staged(node: NodeProcess) -> None:
    incoming = node.data_dir / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []


def _assert_nothing_kept(node: NodeProcess) -> None:
    _assert_nothing_staged(node)
    assert query(node.db_url, "select count(*) as n from instances")[0]["n"] == 0


def test_oversized_negotiation_pdu_is_aborted_at_once(make_node: Any) -> None:
    node = _node(make_node)
    for pdu_type in (0x01, 0x04):  # an A-ASSOCIATE-RQ, or a P-DATA before association
        with _connect(node) as sock:
            sock.sendall(struct.pack(">BBL", pdu_type, 0, _CLAIM))
            received, took = _read_until_closed(sock, 10)
        assert received[:1] == b"\x07", received  # A-ABORT, then closed
        assert took < 5
    assert "claims 4294967280 bytes" in node.log()


def test_oversized_p_data_after_association_is_aborted(make_node: Any) -> None:
    node = _node(make_node, max_pdu="16384")
    ae = AE(ae_title="BIGPDU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    # One byte over what we negotiated: the body is never read.
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 16384 + 1))
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert association_rows(node)["BIGPDU"]["outcome"] == "aborted"
    assert _echoscu(node).returncode == 0  # the node goes on


def test_slow_negotiator_is_closed_after_the_timeout(make_node: Any) -> None:
    node = _node(make_node, association_timeout_s="1")
    with _connect(node) as silent, _connect(node) as stalled:
        stalled.sendall(b"\x01\x00\x00")  # half a PDU header, then nothing
        _, took_silent = _read_until_closed(silent, 15)
        _, took_stalled = _read_until_closed(stalled, 15)
    assert 0.5 < took_silent < 5
    assert took_stalled < 5


def test_per_host_limit_rejects_transient(make_node: Any) -> None:
    require_tool("echoscu")
    node = _node(make_node, max_associations_per_host="2")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title=node.ae_title) for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    refused = _echoscu(node, "THIRD")
    assert refused.returncode != 0
    output = (refused.stdout + refused.stderr).lower()
    assert "rejected transient" in output and "local limit exceeded" in output, output
    held.pop().release()
    time.sleep(0.3)
    assert _echoscu(node, "FOURTH").returncode == 0
    held.pop().release()
    rows = query(node.db_url,
                 "select outcome, reason from associations where calling_ae = 'THIRD'")
    assert rows == [{"outcome": "rejected", "reason": "2 associations from this host are "
                     "established already (node.max_associations_per_host)"}]


def test_per_host_limit_holds_for_simultaneous_requests(make_node: Any,
                                                        postgres_url: str) -> None:
    """Rounds of 30 A-ASSOCIATE-RQs from one host arriving at once, 8 allowed: the check
    and the count are one step, so no more than 8 are accepted. On PostgreSQL, where
    recording the associations does not queue them one by one (SQLite's write lock
    does); 127 presentation contexts each make the negotiation after the check take a
    while."""
    node = make_node(db_url=postgres_url,
                     extra_env={"PACSNODE__NODE__MAX_ASSOCIATIONS_PER_HOST": "8"})
    contexts = {2 * n + 1: (context.abstract_syntax, ALL_TRANSFER_SYNTAXES[0])
                for n, context in enumerate(StoragePresentationContexts[:127])}
    for round_ in range(2):
        requests = [associate_rq(node.ae_title, f"RUSH{round_}-{n:02d}", contexts, 16384,
                                 *ALL_TRANSFER_SYNTAXES[1:10]) for n in range(30)]
        assert _rush(node, requests) == 8
        _wait_all_closed(node)  # the released ones are counted out before their row closes
    assert _echoscu(node).returncode == 0


def _wait_all_closed(node: NodeProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while query(node.db_url, "select count(*) as n from associations "
                "where outcome = 'open'")[0]["n"] and time.monotonic() < deadline:
        time.sleep(0.05)


def _rush(node: NodeProcess, requests: list[bytes]) -> int:
    """Send the requests at once, each on its own connection; returns how many were
    accepted (those are released), checking the others were rejected for the limit."""
    rushing = [_connect(node) for _ in requests]
    try:
        for sock, request in zip(rushing, requests):
            sock.sendall(request)
        answers = [read_pdu(sock) for sock in rushing]
        accepted = [sock for sock, (pdu_type, _) in zip(rushing, answers) if pdu_type == 0x02]
        # The others: A-ASSOCIATE-RJ, rejected-transient, local limit exceeded.
        assert [body[1:4] for pdu_type, body in answers if pdu_type != 0x02] == [
            b"\x02\x03\x02"] * (len(requests) - len(accepted))
        for sock in accepted:  # A-RELEASE-RQ, A-RELEASE-RP
            sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))
            assert read_pdu(sock)[0] == 0x06
        return len(accepted)
    finally:
        for sock in rushing:
            sock.close()


def test_instance_over_max_instance_mb_is_refused(make_node: Any) -> None:
    node = _node(make_node, max_instance_mb="1")
    ds = instance(generate_uid(), generate_uid(), Rows=1024, Columns=1024,
                  PixelData=bytes(2 << 20))
    ds.file_meta = None
    assoc = associate(node, "TOOBIG")
    try:
        status, comment = store(assoc, ds)
        assert status == OUT_OF_RESOURCES
        assert "node.max_instance_mb" in comment
        small = instance(generate_uid(), generate_uid())
        assert store(assoc, small)[0] == 0x0000  # the association goes on
    finally:
        assoc.release()
    assert query(node.db_url, "select count(*) as n from instances")[0]["n"] == 1
    incoming = node.data_dir / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []


@pytest.mark.usefixtures("raw_send")
def test_deflate_bomb_is_refused(make_node: Any, tmp_path: Path) -> None:
    node = _node(make_node, max_instance_mb="8")
    status, comment = _send_bomb(node, tmp_path, 64 << 20)
    assert status == OUT_OF_RESOURCES, comment
    assert "inflated dataset over node.max_instance_mb (8 MiB)" == comment
    _assert_nothing_kept(node)


@pytest.mark.usefixtures("raw_send")
def test_memory_budget_under_hostile_input(make_node: Any, tmp_path: Path) -> None:
    """16 connections claiming ~4 GiB PDUs and a 1 GiB deflate bomb: the node's memory
    stays within 300 MB of where it was, and it goes on serving."""
    require_tool("storescu", "echoscu")
    node = _node(make_node, max_instance_mb="64")
    assert _echoscu(node).returncode == 0
    before = _rss_kb(node)
    hostile = [_connect(node) for _ in range(16)]
    try:
        for number, sock in enumerate(hostile):
            pdu_type = 0x04 if number % 2 else 0x01
            sock.sendall(struct.pack(">BBL", pdu_type, 0, _CLAIM))
        status, comment = _send_bomb(node, tmp_path, 1 << 30)
        assert status == OUT_OF_RESOURCES, comment
        ds = instance(generate_uid(), generate_uid())
        path = write_part10(tmp_path / "ok.dcm", encode(ds), ds.SOPClassUID,
                            ds.SOPInstanceUID, ExplicitVRLittleEndian)
        node.storescu(path)
        assert _echoscu(node).returncode == 0
    finally:
        for sock in hostile:
            sock.close()
    peak = _rss_kb(node, "VmHWM")
    after = _rss_kb(node)
    print(f"RSS before {before} kB, after {after} kB, peak {peak} kB "
          f"(peak growth {(peak - before) / 1024:.1f} MB)")
    assert peak - before < 300 * 1024
    assert query(node.db_url, "select count(*) as n from instances")[0]["n"] == 1


def test_fallback_path_is_bounded_too(make_node: Any) -> None:
    """A command set split over PDVs sends its C-STORE through pynetdicom, which gathers
    the dataset in memory: at node.max_instance_mb the node drops it, discards the rest
    and answers 0xA700, as on the direct path; the association goes on."""
    node = _node(make_node, max_instance_mb="1")
    assoc = RawAssociation.open(node.port, node.ae_title, "FALLBACK",
                                {**_CT, 3: (Verification, "1.2.840.10008.1.2")})
    big = instance(generate_uid(), generate_uid(), Rows=1024, Columns=576,
                   PixelData=bytes(1024 * 576 * 2))
    small = instance(generate_uid(), generate_uid())
    answers = []
    for message_id, ds in enumerate((big, small), start=1):
        command = store_command(CTImageStorage, ds.SOPInstanceUID, message_id)
        assoc.send(p_data(pdv(1, COMMAND, command[:40])), p_data(pdv(1, COMMAND | LAST,
                                                                       command[40:])))
        assoc.send_dataset(1, fragments(encode(ds), 16000))
        response = assoc.response()
        answers.append((response.MessageIDBeingRespondedTo, response.Status,
                        response.get("ErrorComment", "")))
        if message_id == 1:
            assert assoc.echo(3) == 0x0000
    assoc.release()
    assert answers == [(1, OUT_OF_RESOURCES, "dataset over node.max_instance_mb (1 MiB)"),
                       (2, 0x0000, "")]
    assert f"refused instance {big.SOPInstanceUID} from 'FALLBACK': 0xA700" in node.log()
    assert association_rows(node)["FALLBACK"]["outcome"] == "released"
    rows = query(node.db_url, "select sop_instance_uid from instances")
    assert rows == [{"sop_instance_uid": small.SOPInstanceUID}]
    _assert_nothing_staged(node)


# -- streamed to the staging file, never held in memory ------------------------------

_SIDE = 10240  # rows and columns: 200 MiB of 16-bit Pixel Data


def _big_head(study: str, series: str, sop: str) -> tuple[bytes, int]:
    """The elements of a CT instance up to its Pixel Data header, and the pixels' size."""
    pixels = _SIDE * _SIDE * 2
    ds = instance(study, series, sop, Rows=_SIDE, Columns=_SIDE, PixelData=None)
    return encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels), pixels


def _send_big(node: NodeProcess, calling: str, study: str, series: str) -> tuple[str, int, bytes]:
    """C-STORE a 200 MiB instance, streamed in PDUs of the node's maximum length;
    returns its SOP Instance UID, the status, and its dataset's first bytes."""
    sop = generate_uid()
    head, pixels = _big_head(study, series, sop)
    assoc = RawAssociation.open(node.port, node.ae_title, calling, _CT, timeout=300)
    step = assoc.max_pdu - 6  # a PDV's header: item length, context ID, control
    zeros = memoryview(bytes(step))

    def pieces() -> Any:
        yield head
        for start in range(0, pixels, step):
            yield zeros[: min(step, pixels - start)]

    assoc.send(p_data(pdv(1, COMMAND | LAST, store_command(CTImageStorage, sop))))
    assoc.send_dataset(1, pieces())
    status = int(assoc.response().Status)
    assoc.release()
    return sop, status, head


def _dataset_part(path: Path) -> tuple[int, bytes]:
    """A stored file's dataset size, and its first bytes, after preamble and file meta."""
    with path.open("rb") as fp:
        fp.seek(128 + 4 + 8)  # preamble, DICM, the (0002,0000) UL element's header
        meta_end = 128 + 4 + 12 + struct.unpack("<L", fp.read(4))[0]
        fp.seek(meta_end)
        return path.stat().st_size - meta_end, fp.read(4096)


def test_large_instances_are_streamed_to_disk(make_node: Any) -> None:
    """Four associations at once, 200 MiB of Pixel Data each, with the default
    node.max_instance_mb: the node's memory grows by far less than what it holds."""
    require_tool("echoscu")
    node = _node(make_node)
    assert _echoscu(node).returncode == 0
    before = _rss_kb(node)
    study = generate_uid()
    with ThreadPoolExecutor(4) as pool:
        sent = list(pool.map(lambda n: _send_big(node, f"BIG{n}", study, generate_uid()),
                             range(4)))
    peak = _rss_kb(node, "VmHWM")
    print(f"RSS before {before} kB, peak {peak} kB (growth {(peak - before) / 1024:.1f} MB "
          "for 800 MiB received)")
    assert [status for _, status, _ in sent] == [0x0000] * 4
    assert peak - before < 150 * 1024
    sizes = {row["sop_instance_uid"]: row["file_size"] for row in query(
        node.db_url, "select sop_instance_uid, file_size from instances")}
    assert set(sizes) == {sop for sop, _, _ in sent}
    stored = list((node.data_dir / "studies").rglob("*.dcm"))
    assert len(stored) == 4
    for path in stored:
        head = next(h for sop, _, h in sent if sop == path.stem)
        size, first = _dataset_part(path)
        assert size == len(head) + _SIDE * _SIDE * 2
        assert first[: len(head)] == head
        assert sizes[path.stem] == path.stat().st_size
    _assert_nothing_staged(node)


# -- PDUs that break the rules ------------------------------------------------------

def _begin_store(node: NodeProcess, calling: str) -> tuple[RawAssociation, str, bytes]:
    """A raw association with a C-STORE on the direct path whose dataset has begun
    arriving (its staging file exists); returns it, the SOP Instance UID and the
    dataset bytes not sent yet."""
    assoc = RawAssociation.open(node.port, node.ae_title, calling, _TWO)
    assert assoc.accepted == {1, 3}
    sop = generate_uid()
    data = encode(instance(generate_uid(), generate_uid(), sop, Rows=256, Columns=256,
                           PixelData=bytes(256 * 256 * 2)))
    assoc.send(p_data(pdv(1, COMMAND | LAST, store_command(CTImageStorage, sop)),
                      pdv(1, 0x00, data[:8192])))
    incoming = node.data_dir / "incoming"
    deadline = time.monotonic() + 10
    while not (incoming.is_dir() and list(incoming.iterdir())):
        assert time.monotonic() < deadline, "no staging file"
        time.sleep(0.02)
    return assoc, sop, data[8192:]


def _assert_aborted(node: NodeProcess, assoc: RawAssociation, calling: str) -> None:
    """The node sent an A-ABORT and closed; nothing of the instance remains."""
    assert assoc.read_until_closed() == [0x07]
    assert association_rows(node)[calling]["outcome"] == "aborted"
    _assert_nothing_kept(node)
    assert _echoscu(node).returncode == 0  # the node goes on


@pytest.mark.parametrize("intruder", ["other-context", "command"])
def test_a_pdv_of_another_message_inside_a_dataset_aborts(make_node: Any,
                                                          intruder: str) -> None:
    """PS3.8 9.3.1: no fragment of another message until the current one is complete."""
    node = _node(make_node)
    assoc, sop, rest = _begin_store(node, "INTERLEAVE")
    if intruder == "other-context":
        intruding = pdv(3, 0x00, rest[:4096])
    else:
        intruding = pdv(1, COMMAND | LAST, store_command(CTImageStorage, generate_uid(), 2))
    assoc.send(p_data(intruding, pdv(1, LAST, rest)))
    _assert_aborted(node, assoc, "INTERLEAVE")
    assert "PDV of another message inside a C-STORE dataset" in node.log()


def test_a_p_data_cut_short_by_the_peer_leaves_nothing(make_node: Any) -> None:
    """A P-DATA-TF header claims 10000 bytes, 100 follow, then the connection closes."""
    node = _node(make_node)
    assoc, _, rest = _begin_store(node, "CUTSHORT")
    body = pdv(1, LAST, rest[:9994])
    assoc.send(struct.pack(">BBL", 0x04, 0, len(body)) + body[:100])
    assoc.sock.close()
    rows = {}
    deadline = time.monotonic() + 10
    while rows.get("outcome") in (None, "open") and time.monotonic() < deadline:
        rows = association_rows(node)["CUTSHORT"]
    assert rows["outcome"] == "aborted"
    _assert_nothing_kept(node)
    assert "PDU shorter than announced (100 of 10000 bytes)" in node.log()


def test_a_pdv_longer_than_its_pdu_aborts(make_node: Any) -> None:
    node = _node(make_node)
    assoc, _, rest = _begin_store(node, "LONGPDV")
    item = pdv(1, 0x00, rest[:100])
    lying = struct.pack(">L", 5000) + item[4:]  # the item claims 5000 bytes of 102
    assoc.send(p_data(lying))
    _assert_aborted(node, assoc, "LONGPDV")
    assert "PDV item length does not fit the PDU" in node.log()


@pytest.mark.parametrize("layout", ["a-pdu-per-fragment", "command-end-with-dataset"])
def test_a_command_set_split_over_pdvs_is_stored(make_node: Any, layout: str) -> None:
    """A command set in two PDVs is pynetdicom's to gather (the direct path takes only
    whole ones): the instance is stored byte for byte and answered Success."""
    node = _node(make_node)
    assoc = RawAssociation.open(node.port, node.ae_title, "SPLITCMD", _CT)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = encode(instance(study, series, sop, Rows=64, Columns=64,
                           PixelData=bytes(range(256)) * 32))
    command = store_command(CTImageStorage, sop)
    head, tail = pdv(1, COMMAND, command[:40]), pdv(1, COMMAND | LAST, command[40:])
    if layout == "a-pdu-per-fragment":
        assoc.send(p_data(head), p_data(tail))
        assoc.send_dataset(1, fragments(data, 3000))
    else:
        assoc.send(p_data(head), p_data(tail, pdv(1, 0x00, data[:3000])))
        assoc.send_dataset(1, fragments(data[3000:], 3000))
    response = assoc.response()
    assert (response.Status, response.MessageIDBeingRespondedTo,
            response.AffectedSOPInstanceUID) == (0x0000, 1, sop)
    assert assoc.echo(1) == 0x0000  # the association goes on
    assoc.release()
    path = node.data_dir / "studies" / study / series / f"{sop}.dcm"
    size, _ = _dataset_part(path)
    assert size == len(data) and path.read_bytes()[-len(data):] == data
    assert query(node.db_url, "select sop_instance_uid from instances") == [
        {"sop_instance_uid": sop}]
    _assert_nothing_staged(node)
