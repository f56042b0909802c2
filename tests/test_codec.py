"""node/codec.py against pydicom's own encoders, byte for byte."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info

from node.dicom.codec import Command, decode_command, file_meta_group, store_response

UIDS = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12345678901234567890123456789"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance"), UIDS)
@pytest.mark.parametrize("source_ae", ["STORESCU", "ODD_AE", ""])
def test_file_meta_matches_pydicom(sop_class: str, sop_instance: str, source_ae: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "PACSNODE_0.1.0"
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    expected = BytesIO()
    write_file_meta_info(expected, meta, enforce_standard=True)
    ours = file_meta_group(sop_class, sop_instance, "1.2.840.10008.1.2.4.50",
                           "1.2.826.0.1.3680043.8.498.1", "PACSNODE_0.1.0", source_ae)
    assert ours == expected.getvalue()


def _implicit(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_dataset(buffer, ds)
    body = buffer.getvalue()
    group = Dataset()
    group.CommandGroupLength = len(body)
    head = DicomBytesIO()
    head.is_little_endian = True
    head.is_implicit_VR = True
    write_dataset(head, group)
    return head.getvalue() + body


@pytest.mark.parametrize(("sop_class", "sop_instance"), UIDS)
def test_decode_store_request_from_pydicom(sop_class: str, sop_instance: str) -> None:
    rq = Dataset()
    rq.AffectedSOPClassUID = sop_class
    rq.CommandField = 0x0001
    rq.MessageID = 7
    rq.Priority = 0
    rq.CommandDataSetType = 0x0000
    rq.AffectedSOPInstanceUID = sop_instance
    rq.MoveOriginatorApplicationEntityTitle = "MOVER"
    command = decode_command(_implicit(rq))
    assert command == Command(0x0001, 7, sop_class, sop_instance, 0x0000)


@pytest.mark.parametrize(("sop_class", "sop_instance"), UIDS)
@pytest.mark.parametrize(("status", "comment"), [(0x0000, ""), (0xC002, "SOPInstanceUID is not valid")])
def test_store_response_matches_pydicom(sop_class: str, sop_instance: str, status: int, comment: str) -> None:
    rsp = Dataset()
    rsp.AffectedSOPClassUID = sop_class
    rsp.CommandField = 0x8001
    rsp.MessageIDBeingRespondedTo = 7
    rsp.CommandDataSetType = 0x0101
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    rsp.AffectedSOPInstanceUID = sop_instance
    ours = store_response(Command(0x0001, 7, sop_class, sop_instance, 0), status, comment)
    assert ours == _implicit(rsp)
    decoded = read_dataset(BytesIO(ours), is_implicit_VR=True, is_little_endian=True)
    assert decoded.Status == status


def test_decode_refuses_truncated_command() -> None:
    with pytest.raises(ValueError):
        decode_command(b"\x00\x00\x00\x01\x10\x00\x00\x00abc")
    with pytest.raises(ValueError):
        decode_command(b"")  # no CommandField
