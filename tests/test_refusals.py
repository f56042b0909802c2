"""What the node refuses, and what a refusal must not do.

Hostile UIDs, unparseable or incomplete datasets and requests that contradict their
dataset are answered with a failure status and an Error Comment, leave nothing on
disk or in the database, and neither the association nor the node goes down.
Duplicates are answered Success and stored once.

The crafted instances are sent with pynetdicom as a client. With
``STORE_SEND_CHUNKED_DATASET`` pynetdicom sends the bytes that follow the file meta
of a Part 10 file exactly as they are, and takes the C-STORE request's Affected SOP
Class/Instance UID from the file meta, so a test controls both independently.
"""

from __future__ import annotations

import socket
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, text

from tests.conftest import NodeProcess, make_series, require_tool

# pydicom warns when it reads the hostile UIDs of the crafted files (on purpose).
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")

# The statuses of node/status.py, spelled out: the tests pin the wire values.
SUCCESS = 0x0000
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
MISSING_ATTRIBUTE = 0xC001
INVALID_UID = 0xC002

HOSTILE_UIDS = {
    "traversal": "1.2.3/../../../etc",
    "dotdot": "..",
    "trailing-dot": "1.2.3.",
    "65-digits": "1" * 65,
}
# Names a hostile UID would give a file or folder if it reached the file system.
HOSTILE_NAMES = {"etc", "etc.dcm", "..dcm", "1.2.3.", "1.2.3..dcm", "1" * 65, "1" * 65 + ".dcm"}
DB_FILES = {"pacsnode.db", "pacsnode.db-wal", "pacsnode.db-shm", "pacsnode.db-journal"}


# -- crafting ---------------------------------------------------------------------


def instance(study: str, series: str, sop: str | None = None, **overrides: Any) -> Dataset:
    """A small, valid CT instance; ``overrides`` set (or, with ``None``, drop) attributes."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "REFUSE1"
    ds.Modality = "CT"
    ds.PatientName = "Refusal^Test"
    ds.PatientID = "REFUSE-001"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hostile values are the point here
        for keyword, value in overrides.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset) -> bytes:
    """The dataset in Explicit VR Little Endian, whatever its values."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    return fp.getvalue()


def write_part10(
    path: Path,
    dataset: bytes,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """A Part 10 file: valid file meta followed by ``dataset`` bytes as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_file_meta_info(fp, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fp.getvalue() + dataset)
    return path


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length field."""
    declared = len(value) if length is None else length
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", declared) + value


# -- sending ----------------------------------------------------------------------


@pytest.fixture
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's dataset bytes untouched (see the module doc)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def associate(node: NodeProcess, calling: str = "REFUSALS", *contexts: tuple[str, str]) -> Association:
    """An association, opened with a C-ECHO.

    The echo is answered by pynetdicom's association thread, after the node recorded
    the association row; C-STOREs sent before that may not be counted on it (see
    test_every_instance_is_counted_on_its_association). Here the counts are tested
    for what the node does with each refusal, so the race is kept out.
    """
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    wanted = contexts or ((CTImageStorage, ExplicitVRLittleEndian),)
    for sop_class, syntax in wanted:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, f"association refused:\n{node.log()}"
    if assoc.dul.socket and assoc.dul.socket.socket:  # no ~40 ms Nagle stall per message
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    echo = assoc.send_c_echo()
    assert echo and echo.Status == SUCCESS
    return assoc


def store(assoc: Association, what: Dataset | Path) -> tuple[int, str]:
    """C-STORE and return (status, error comment); fails the test on no response."""
    if isinstance(what, Dataset):
        what.file_meta = FileMetaDataset()
        what.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    status = assoc.send_c_store(what)
    assert status, "no C-STORE response (association lost?)"
    return int(status.Status), str(status.get("ErrorComment", ""))


# -- observing --------------------------------------------------------------------


def tree(root: Path, exclude: Path | None = None) -> set[Path]:
    """Every file and folder under ``root``, without ``exclude`` and what is under it."""
    found = set()
    for path in root.rglob("*"):
        if exclude is not None and (path == exclude or path.is_relative_to(exclude)):
            continue
        found.add(path)
    return found


def stored_files(node: NodeProcess) -> set[Path]:
    studies = node.data_dir / "studies"
    return {p for p in studies.rglob("*") if p.is_file()} if studies.exists() else set()


def expected_file(node: NodeProcess, study: str, series: str, sop: str) -> Path:
    return node.data_dir / "studies" / study / series / f"{sop}.dcm"


def assert_no_stray_files(node: NodeProcess, tmp_path: Path, before: set[Path],
                          expected: set[Path]) -> None:
    """Nothing new outside data_dir, and inside it only the DB and the expected files."""
    assert tree(tmp_path, exclude=node.data_dir) == before
    assert stored_files(node) == expected
    top = {p.name for p in node.data_dir.iterdir()}
    assert top <= {"studies", "incoming"} | DB_FILES, top
    incoming = node.data_dir / "incoming"  # staged copies are dropped once answered
    assert not incoming.exists() or list(incoming.iterdir()) == []
    names = {p.name for p in tmp_path.rglob("*")}
    assert not names & HOSTILE_NAMES, names & HOSTILE_NAMES


def association_rows(node: NodeProcess) -> dict[str, dict[str, Any]]:
    """The association rows by calling AE title, read from the node's database once
    every association is closed (the node closes a row just after the release)."""
    engine = create_engine(node.db_url)
    try:
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(text(
                    "SELECT calling_ae, instances_stored, instances_duplicate, "
                    "instances_failed, outcome FROM associations ORDER BY id"))]
            if all(r["outcome"] != "open" for r in rows) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        engine.dispose()
    by_ae: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["calling_ae"] not in by_ae, f"two associations from {row['calling_ae']}"
        by_ae[row["calling_ae"]] = row
    return by_ae


def refusals_logged(node: NodeProcess) -> list[str]:
    return [line for line in node.log().splitlines() if ": refused instance " in line]


# -- hostile UIDs -----------------------------------------------------------------


def test_hostile_uids_are_refused_and_write_nothing(
    node: NodeProcess, tmp_path: Path, raw_send: None
) -> None:
    study, series = generate_uid(), generate_uid()
    crafted = tmp_path / "crafted"
    sends: list[tuple[str, Path, Dataset]] = []
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        for name, payload in HOSTILE_UIDS.items():
            hostile = instance(study, series, **{attribute: payload})
            # The request carries the hostile UID too where pynetdicom lets it (at most
            # 64 characters); otherwise it names a valid UID and only the dataset is
            # hostile.
            if attribute == "SOPInstanceUID":
                request_sop = payload if len(payload) <= 64 else generate_uid()
            else:
                request_sop = str(hostile.SOPInstanceUID)
            path = write_part10(crafted / f"{attribute}-{name}.dcm", encode(hostile),
                                CTImageStorage, request_sop)
            sends.append((f"{attribute}={name}", path, instance(study, series)))
    before = tree(tmp_path, exclude=node.data_dir)

    answers: dict[str, tuple[int, bool, bool, int]] = {}
    assoc = associate(node, "HOSTILE")
    try:
        for case, path, valid in sends:
            status, comment = store(assoc, path)
            attribute = case.split("=")[0]
            # Each refusal is followed by a valid instance on the same association.
            after = store(assoc, valid)[0] if assoc.is_established else -1
            answers[case] = (status, attribute in comment, assoc.is_established, after)
    finally:
        if assoc.is_established:
            assoc.release()
    # (status, ErrorComment names the attribute, association alive, next instance)
    assert answers == {case: (INVALID_UID, True, True, SUCCESS) for case, _, _ in sends}

    expected = {expected_file(node, study, series, str(v.SOPInstanceUID)) for _, _, v in sends}
    assert_no_stray_files(node, tmp_path, before, expected)
    studies = node.studies()
    assert [s["study_instance_uid"] for s in studies] == [study]
    assert studies[0]["instances"] == len(sends)
    assert [s["series_instance_uid"] for s in studies[0]["series"]] == [series]
    assert len(refusals_logged(node)) == len(sends)
    row = association_rows(node)["HOSTILE"]
    assert (row["instances_stored"], row["instances_duplicate"], row["instances_failed"]) == (
        len(sends), 0, len(sends))
    assert row["outcome"] == "released"


# -- unparseable, incomplete and contradicted datasets -----------------------------


def _unterminated_sequence(study: str, series: str, sop: str) -> bytes:
    """A valid header followed by an undefined-length sequence that never ends."""
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + element(0x0008, 0x0100, b"SH", b"CODE")
    return encode(instance(study, series, sop, PixelData=None)) + (
        struct.pack("<HH", 0x0040, 0x0275) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF) + item
    )


def _short_pixel_data(study: str, series: str, sop: str) -> bytes:
    """Pixel Data claiming 1 MiB (so long that the whole-dataset check skips it by seek)
    of which 600 KB arrive."""
    head = encode(instance(study, series, sop, Rows=512, Columns=1024, PixelData=None))
    return head + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 1 << 20) + bytes(600_000)


def _unterminated_encapsulated(study: str, series: str, sop: str) -> bytes:
    """Encapsulated Pixel Data (undefined length) whose last fragment is cut short and
    whose sequence delimiter never comes: pydicom only warns about it."""
    head = encode(instance(study, series, sop, PixelData=None))
    item = b"\xfe\xff\x00\xe0"
    return (head + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
            + item + struct.pack("<L", 0) + item + struct.pack("<L", 100_000) + bytes(90_000))


# name: (request SOP class, transfer syntax, dataset bytes from (study, series, request
# SOP instance UID), statuses accepted, what the Error Comment must mention)
MALFORMED: dict[str, tuple[str, str, Any, set[int], str]] = {
    "unterminated-sequence": (
        CTImageStorage, ExplicitVRLittleEndian, _unterminated_sequence,
        {CANNOT_UNDERSTAND}, "parsed"),
    "short-pixel-data": (
        CTImageStorage, ExplicitVRLittleEndian, _short_pixel_data,
        {CANNOT_UNDERSTAND}, "truncated"),
    "unterminated-encapsulated-pixel-data": (
        CTImageStorage, ExplicitVRLittleEndian, _unterminated_encapsulated,
        {CANNOT_UNDERSTAND}, "parsed"),
    "not-a-deflate-stream": (
        CTImageStorage, DeflatedExplicitVRLittleEndian,
        lambda st, se, sop: b"\x00\x01 this is no deflate stream",
        {CANNOT_UNDERSTAND}, "parsed"),
    # pydicom reads arbitrary bytes as (nonsense) elements, so plain garbage may come
    # out as "no SOP Class UID" rather than "cannot understand": both are refusals.
    "text-garbage": (
        CTImageStorage, ExplicitVRLittleEndian,
        lambda st, se, sop: b"this is not a DICOM data set! " * 8,
        {CANNOT_UNDERSTAND, MISSING_ATTRIBUTE}, ""),
    "no-SOPInstanceUID": (
        CTImageStorage, ExplicitVRLittleEndian,
        lambda st, se, sop: encode(instance(st, se, sop, SOPInstanceUID=None)),
        {MISSING_ATTRIBUTE}, "SOPInstanceUID"),
    "no-StudyInstanceUID": (
        CTImageStorage, ExplicitVRLittleEndian,
        lambda st, se, sop: encode(instance(st, se, sop, StudyInstanceUID=None)),
        {MISSING_ATTRIBUTE}, "StudyInstanceUID"),
    "empty-SeriesInstanceUID": (
        CTImageStorage, ExplicitVRLittleEndian,
        lambda st, se, sop: encode(instance(st, se, sop, SeriesInstanceUID="")),
        {MISSING_ATTRIBUTE}, "SeriesInstanceUID"),
    # The request's Affected SOP Instance UID (from the file meta) names another one.
    "SOPInstanceUID-differs": (
        CTImageStorage, ExplicitVRLittleEndian,
        lambda st, se, sop: encode(instance(st, se, generate_uid())),
        {DATASET_MISMATCH}, "SOPInstanceUID"),
    # The request says MR Image Storage, the dataset CT Image Storage.
    "SOPClassUID-differs": (
        MRImageStorage, ExplicitVRLittleEndian,
        lambda st, se, sop: encode(instance(st, se, sop)),
        {DATASET_MISMATCH}, "SOPClassUID"),
}


def test_malformed_datasets_are_refused(node: NodeProcess, tmp_path: Path, raw_send: None) -> None:
    study, series = generate_uid(), generate_uid()
    sends: list[tuple[str, Path, Dataset]] = []
    for case, (sop_class, syntax, make, _, _) in MALFORMED.items():
        sop = generate_uid()
        path = write_part10(tmp_path / "crafted" / f"{case}.dcm", make(study, series, sop),
                            sop_class, sop, syntax)
        sends.append((case, path, instance(study, series)))
    before = tree(tmp_path, exclude=node.data_dir)

    problems: list[str] = []
    assoc = associate(node, "MALFORMED", (CTImageStorage, ExplicitVRLittleEndian),
                      (CTImageStorage, DeflatedExplicitVRLittleEndian),
                      (MRImageStorage, ExplicitVRLittleEndian))
    try:
        for case, path, valid in sends:
            _, _, _, accepted, mentions = MALFORMED[case]
            status, comment = store(assoc, path)
            if status not in accepted:
                problems.append(f"{case}: status 0x{status:04X} ({comment!r}), expected "
                                + " or ".join(f"0x{code:04X}" for code in sorted(accepted)))
            if not comment or mentions not in comment:
                problems.append(f"{case}: Error Comment {comment!r} does not mention {mentions!r}")
            if not assoc.is_established:
                problems.append(f"{case}: the association ended")
                break
            # Each refusal is followed by a valid instance on the same association.
            after, _ = store(assoc, valid)
            if after != SUCCESS:
                problems.append(f"{case}: the next valid instance got 0x{after:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    assert not problems, "\n".join(problems)

    expected = {expected_file(node, study, series, str(v.SOPInstanceUID)) for _, _, v in sends}
    assert_no_stray_files(node, tmp_path, before, expected)
    studies = node.studies()
    assert [(s["study_instance_uid"], s["instances"]) for s in studies] == [(study, len(sends))]
    refused = refusals_logged(node)
    assert len(refused) == len(sends), refused
    row = association_rows(node)["MALFORMED"]
    assert (row["instances_stored"], row["instances_duplicate"], row["instances_failed"]) == (
        len(sends), 0, len(sends))

    # A new association from another client is served as usual.
    require_tool("storescu")
    later = instance(study, series)
    node.storescu(write_part10(tmp_path / "later.dcm", encode(later), CTImageStorage,
                               str(later.SOPInstanceUID)))
    assert expected_file(node, study, series, str(later.SOPInstanceUID)).is_file()


def test_truncated_element_is_refused(sqlite_node: NodeProcess, tmp_path: Path,
                                      raw_send: None) -> None:
    study, _series, sop = generate_uid(), generate_uid(), generate_uid()
    header = encode(instance(study, "9.9", sop, PixelData=None))  # Series UID is last
    cut = header.index(b"\x20\x00\x0e\x00UI")
    # (0020,000E) claims 1000 bytes; only 7 follow: the data set ends mid-value.
    truncated = header[:cut] + element(0x0020, 0x000E, b"UI", b"1.2.3.4", length=1000)
    path = write_part10(tmp_path / "crafted" / "truncated.dcm", truncated, CTImageStorage, sop)
    assoc = associate(sqlite_node, "TRUNCATE")
    try:
        status, comment = store(assoc, path)
    finally:
        assoc.release()
    assert status == CANNOT_UNDERSTAND, (hex(status), comment, stored_files(sqlite_node))
    assert stored_files(sqlite_node) == set()


# -- duplicates -------------------------------------------------------------------


def test_duplicate_is_success_and_stored_once(node: NodeProcess) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    original = instance(study, series, sop)

    first = associate(node, "DUP_FIRST")
    try:
        assert store(first, instance(study, series, sop)) == (SUCCESS, "")
        assert store(first, instance(study, series, sop)) == (SUCCESS, "")  # same association
    finally:
        first.release()
    second = associate(node, "DUP_SECOND")
    try:
        assert store(second, instance(study, series, sop)) == (SUCCESS, "")  # another one
    finally:
        second.release()

    path = expected_file(node, study, series, sop)
    assert stored_files(node) == {path}  # one file, no .tmp left behind
    stored = dcmread(path)
    assert stored.SOPInstanceUID == sop
    assert stored.PixelData == original.PixelData
    assert stored.file_meta.SourceApplicationEntityTitle == "DUP_FIRST"  # the first kept

    studies = node.studies()
    assert [(s["study_instance_uid"], s["instances"]) for s in studies] == [(study, 1)]
    detail = node.study(study)
    assert [(a["calling_ae"], a["instances_of_this_study"], a["outcome"])
            for a in detail["associations"]] == [("DUP_FIRST", 1, "released")]
    rows = association_rows(node)
    counts = {ae: (r["instances_stored"], r["instances_duplicate"], r["instances_failed"])
              for ae, r in rows.items()}
    assert counts == {"DUP_FIRST": (1, 1, 0), "DUP_SECOND": (0, 1, 0)}
    assert refusals_logged(node) == []


# -- association records ------------------------------------------------------------


def test_every_instance_is_counted_on_its_association(node: NodeProcess, tmp_path: Path) -> None:
    """storescu sends its first C-STORE right after the association is accepted."""
    require_tool("storescu")
    associations = 16
    series = make_series(tmp_path / "ct", slices=associations, size=16)
    for number, path in enumerate(series.paths):
        node.storescu(path, calling=f"SCU{number:02d}")
    rows = association_rows(node)
    stored = {ae: row["instances_stored"] for ae, row in rows.items()}
    assert stored == {f"SCU{number:02d}": 1 for number in range(associations)}
    detail = node.study(series.study_instance_uid)
    assert sorted((a["calling_ae"], a["instances_of_this_study"])
                  for a in detail["associations"]) == [
        (f"SCU{number:02d}", 1) for number in range(associations)]
