"""A requestor that writes its PDUs by hand, for the tests of what a hostile peer sends.

pynetdicom, as a client, only sends well-formed messages; these tests need PDVs in the
wrong place, PDUs cut short and datasets streamed in pieces, so the A-ASSOCIATE-RQ and
the P-DATA-TF PDUs are encoded here from PS3.8 9.3 and the command sets from PS3.7
9.3.1, over a plain socket.
"""

from __future__ import annotations

import socket
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2"
COMMAND = 0x01  # message control header: a command fragment (else dataset)
LAST = 0x02  # the last fragment of its command or dataset
_PDU = struct.Struct(">BBL")
_PDV = struct.Struct(">LBB")


def _uid_item(item_type: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    return struct.pack(">BBH", item_type, 0, len(raw)) + raw


def associate_rq(called: str, calling: str, contexts: dict[int, tuple[str, str]],
                 max_pdu: int = 16384, *more_syntaxes: str) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts``: {context ID: (SOP class, syntax)},
    each with ``more_syntaxes`` too."""
    items = [_uid_item(0x10, APPLICATION_CONTEXT)]
    for context_id, (abstract, syntax) in contexts.items():
        sub = _uid_item(0x30, abstract) + b"".join(
            _uid_item(0x40, uid) for uid in (syntax, *more_syntaxes))
        items.append(struct.pack(">BBHB3x", 0x20, 0, len(sub) + 4, context_id) + sub)
    user = struct.pack(">BBHL", 0x51, 0, 4, max_pdu) + _uid_item(0x52, PYDICOM_IMPLEMENTATION_UID)
    items.append(struct.pack(">BBH", 0x50, 0, len(user)) + user)
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + b"".join(items))
    return _PDU.pack(0x01, 0, len(body)) + body


def pdv(context_id: int, control: int, data: bytes | memoryview) -> bytes:
    """One PDV item: its length, presentation context ID, control header and data."""
    return _PDV.pack(len(data) + 2, context_id, control) + bytes(data)


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU carrying ``pdvs``."""
    body = b"".join(pdvs)
    return _PDU.pack(0x04, 0, len(body)) + body


def encode_command(**elements: object) -> bytes:
    """A command set (Implicit VR Little Endian) with its group length first."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = _implicit(ds)
    length = Dataset()
    length.CommandGroupLength = len(body)
    return _implicit(length) + body


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """The command set of a C-STORE-RQ with a dataset (PS3.7 9.3.1.1)."""
    return encode_command(AffectedSOPClassUID=sop_class, CommandField=0x0001,
                          MessageID=message_id, Priority=0, CommandDataSetType=0x0000,
                          AffectedSOPInstanceUID=sop_instance)


def _implicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    return fp.getvalue()


def fragments(data: bytes | memoryview, size: int) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start : start + size]


@dataclass
class RawAssociation:
    """An established association over a plain socket (see :meth:`open`)."""

    sock: socket.socket
    accepted: set[int]  # the context IDs the node accepted
    max_pdu: int  # the largest P-DATA-TF body the node accepts (0: unlimited)

    @classmethod
    def open(cls, port: int, called: str, calling: str,
             contexts: dict[int, tuple[str, str]], timeout: float = 60) -> RawAssociation:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(associate_rq(called, calling, contexts))
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x02:
            sock.close()
            raise AssertionError(f"association not accepted: PDU type 0x{pdu_type:02X}")
        accepted, max_pdu = _parse_ac(body)
        return cls(sock, accepted, max_pdu)

    def send(self, *pdus: bytes) -> None:
        self.sock.sendall(b"".join(pdus))

    def send_dataset(self, context_id: int, pieces: Iterable[bytes | memoryview]) -> None:
        """Each piece as one dataset PDV in its own PDU; the last is flagged last."""
        previous: bytes | memoryview | None = None
        for piece in pieces:
            if previous is not None:
                self.send(p_data(pdv(context_id, 0x00, previous)))
            previous = piece
        assert previous is not None
        self.send(p_data(pdv(context_id, LAST, previous)))

    def response(self) -> Dataset:
        """The next command set the node sends (a C-STORE-RSP or C-ECHO-RSP)."""
        command = b""
        while True:
            pdu_type, body = read_pdu(self.sock)
            assert pdu_type == 0x04, f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}"
            for _, control, data in split(body):
                assert control & COMMAND, "a response with a dataset"
                command += data
                if control & LAST:
                    return read_dataset(BytesIO(command), True, True)

    def echo(self, context_id: int, message_id: int = 99) -> int:
        """C-ECHO (on a Verification context); returns its status."""
        command = encode_command(AffectedSOPClassUID="1.2.840.10008.1.1", CommandField=0x0030,
                                 MessageID=message_id, CommandDataSetType=0x0101)
        self.send(p_data(pdv(context_id, COMMAND | LAST, command)))
        return int(self.response().Status)

    def release(self) -> None:
        self.send(_PDU.pack(0x05, 0, 4) + bytes(4))
        pdu_type, _ = read_pdu(self.sock)
        assert pdu_type == 0x06, f"expected A-RELEASE-RP, got PDU type 0x{pdu_type:02X}"
        self.sock.close()

    def read_until_closed(self) -> list[int]:
        """The types of the PDUs the node sends until it closes the connection."""
        types = []
        while True:
            try:
                pdu_type, _ = read_pdu(self.sock)
            except (ConnectionError, EOFError):
                return types
            types.append(pdu_type)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(sock, 6)
    pdu_type, _, length = _PDU.unpack(header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def split(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The (context ID, control header, data) of each PDV of a P-DATA-TF body."""
    offset = 0
    while offset < len(body):
        length, context_id, control = _PDV.unpack_from(body, offset)
        yield context_id, control, body[offset + 6 : offset + 4 + length]
        offset += 4 + length


def _parse_ac(body: bytes) -> tuple[set[int], int]:
    """The accepted context IDs and the maximum length of an A-ASSOCIATE-AC body."""
    accepted: set[int] = set()
    max_pdu = 0
    offset = 68  # protocol version, reserved, AE titles (echoed), reserved
    while offset < len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, offset)
        value = body[offset + 4 : offset + 4 + length]
        if item_type == 0x21 and value[2] == 0:  # presentation context, result: accept
            accepted.add(value[0])
        elif item_type == 0x50:
            sub = 0
            while sub < len(value):
                sub_type, _, sub_length = struct.unpack_from(">BBH", value, sub)
                if sub_type == 0x51:
                    max_pdu = struct.unpack_from(">L", value, sub + 4)[0]
                sub += 4 + sub_length
        offset += 4 + length
    return accepted, max_pdu
