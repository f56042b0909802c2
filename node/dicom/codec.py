"""Byte-level encoders for the few small, fixed DICOM structures on the ingest path.

Encoding a File Meta group or a C-STORE response through pydicom Dataset objects cost
more CPU than storing the instance; these structures have a handful of fixed elements,
so they are written directly here. tests/test_codec.py checks every function against
pydicom's own encoding, byte for byte.

Tracks the DIMSE command encoding of pynetdicom 3.0.4 (pinned in pyproject.toml) and
pydicom 3.0: the responses must be what ``pynetdicom.dimse_messages`` would send.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_EXPLICIT_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_EXPLICIT_LONG = struct.Struct("<HH2s2xL")  # group, element, VR, reserved, 32-bit length
_IMPLICIT = struct.Struct("<HHL")  # group, element, 32-bit length
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


def _pad(value: str, vr: str) -> bytes:
    """Even-length value: UIDs pad with NUL, text with a space (PS3.5 6.2)."""
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


def file_meta_group(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    source_ae: str,
) -> bytes:
    """The File Meta Information group (0002,eeee), Explicit VR Little Endian (PS3.10 7.1)."""
    elements = [
        _EXPLICIT_LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
    ]
    for element, vr, value in (
        (0x0002, "UI", sop_class_uid),
        (0x0003, "UI", sop_instance_uid),
        (0x0010, "UI", transfer_syntax),
        (0x0012, "UI", implementation_class_uid),
        (0x0013, "SH", implementation_version_name),
        (0x0016, "AE", source_ae),
    ):
        if value:
            raw = _pad(value, vr)
            elements.append(_EXPLICIT_SHORT.pack(0x0002, element, vr.encode(), len(raw)) + raw)
    body = b"".join(elements)
    return _EXPLICIT_SHORT.pack(0x0002, 0x0000, b"UL", 4) + _UL.pack(len(body)) + body


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a DIMSE request command set the ingest path needs."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    command_data_set_type: int


def decode_command(data: bytes | memoryview) -> Command:
    """Read a command set (Implicit VR Little Endian, PS3.7 6.3.1).

    Raises
    ------
    ValueError
        If the elements do not fit the bytes.
    """
    view = memoryview(data)
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(view):
        if offset + 8 > len(view):
            raise ValueError("truncated command element")
        group, element, length = _IMPLICIT.unpack_from(view, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(view):
            raise ValueError("malformed command set")
        values[element] = bytes(view[offset : offset + length])
        offset += length

    def text(element: int) -> str:
        return values.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    def number(element: int) -> int:
        raw = values.get(element)
        if raw is None or len(raw) != 2:
            raise ValueError(f"command element (0000,{element:04X}) missing or not US")
        return int(_US.unpack(raw)[0])

    return Command(
        command_field=number(0x0100),
        message_id=number(0x0110),
        affected_sop_class_uid=text(0x0002),
        affected_sop_instance_uid=text(0x1000),
        command_data_set_type=number(0x0800),
    )


def store_response(command: Command, status: int, comment: str = "") -> bytes:
    """The C-STORE-RSP command set answering ``command`` (PS3.7 9.3.1.2)."""
    elements = []
    for element, vr, value in (
        (0x0002, "UI", command.affected_sop_class_uid),
        (0x0100, "US", 0x8001),
        (0x0120, "US", command.message_id),
        (0x0800, "US", 0x0101),  # no dataset follows
        (0x0900, "US", status),
        (0x0902, "LO", comment[:64]),
        (0x1000, "UI", command.affected_sop_instance_uid),
    ):
        if vr == "US":
            raw = _US.pack(int(value))
        elif value:
            raw = _pad(str(value), vr)
        else:
            continue
        elements.append(_IMPLICIT.pack(0x0000, element, len(raw)) + raw)
    body = b"".join(elements)
    return _IMPLICIT.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body
