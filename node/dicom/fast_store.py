"""A direct path for C-STORE requests through the DUL thread.

pynetdicom turns every P-DATA-TF PDU into objects, walks its state machine, rebuilds
the DIMSE message in a buffer, builds a C-STORE primitive (validating each UID), hands
it to the association thread, and sends the response back through two queues. For a
CT series that Python work cost more than storing the instance. Here a P-DATA-TF PDU
that begins a C-STORE request (a complete command in its first PDV) is taken off that
path: its dataset fragments go to the store handler as they arrive (so the file is
written while the rest is still on the wire), the instance is finished in the DUL
thread, and the C-STORE response is written straight to the socket.

Everything else (association negotiation, C-ECHO, release, abort, fragmented command
sets, unknown contexts) goes through pynetdicom unchanged. PS3.8 9.3.5 (P-DATA-TF) and
PS3.7 9.3.1 (C-STORE) define the encodings used here.

Tracks pynetdicom 3.0.4 (pinned in pyproject.toml): it is called from that version's
DUL read loop (see :mod:`node.dicom.reactor`) and reads the association's accepted
presentation contexts from its private ``_accepted_cx``, as of that version; to refuse
a dataset over node.max_instance_mb on pynetdicom's own path it reads and drops that
version's message in progress (``DIMSEServiceProvider.message``, a ``C_STORE_RQ`` once
its command set is decoded) after handling the DUL's queued events.
"""

from __future__ import annotations

import logging
import queue
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom.dimse_messages import C_STORE_RQ

from node.dicom.codec import Command, decode_command, store_response
from node.ingest.header import too_large_comment

log = logging.getLogger(__name__)

_PDV = struct.Struct(">LBB")  # item length, presentation context ID, message control header
_PDU = struct.Struct(">BBL")  # type, reserved, length

_COMMAND = 0x01  # message control header bit 0: command (else dataset)
_LAST = 0x02  # bit 1: last fragment
C_STORE = 0x0001  # command field of a C-STORE-RQ
NO_DATASET = 0x0101
OUT_OF_RESOURCES = 0xA700

class IncomingStore(Protocol):
    """The receiving side of one C-STORE: fed fragments, then finished or aborted."""

    def write(self, fragment: memoryview) -> None: ...

    def finish(self) -> tuple[int, str]:
        """Returns (status, error comment)."""
        ...

    def abort(self) -> None: ...


class RefusedStore:
    """An instance refused before its dataset ended: the rest is read and dropped, and
    the refusal answered after the last fragment."""

    def __init__(self, status: int, comment: str) -> None:
        self.status = status
        self.comment = comment

    def write(self, fragment: memoryview) -> None:
        pass

    def finish(self) -> tuple[int, str]:
        return self.status, self.comment

    def abort(self) -> None:
        pass


#: (association, transfer syntax UID, command) -> the receiver of its dataset
StoreHandler = Callable[[object, str, Command], IncomingStore]


class ProtocolError(Exception):
    """The peer broke the P-DATA rules; the association must be aborted."""


def split_pdvs(body: memoryview) -> list[tuple[int, int, memoryview]]:
    """The (context ID, control header, data) of each PDV item of a P-DATA-TF body."""
    items = []
    offset = 0
    while offset < len(body):
        if offset + _PDV.size > len(body):
            raise ProtocolError("truncated PDV item header")
        length, context_id, control = _PDV.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise ProtocolError("PDV item length does not fit the PDU")
        items.append((context_id, control, body[offset + _PDV.size : end]))
        offset = end
    return items


def p_data_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying a whole command set as its last fragment."""
    pdv = _PDV.pack(len(command) + 2, context_id, _COMMAND | _LAST) + command
    return _PDU.pack(0x04, 0x00, len(pdv)) + pdv


@dataclass
class _Message:
    context_id: int
    command: Command
    incoming: IncomingStore


class FastStore:
    """Per-association state of the direct C-STORE path (lives in the DUL thread)."""

    def __init__(self, handler: StoreHandler) -> None:
        self.handler = handler
        self._message: _Message | None = None
        # A command set split over several PDVs went to pynetdicom; until its last
        # fragment passes, a command PDV does not start a new message.
        self._command_pending = False

    def offer(self, assoc: object, body: memoryview) -> bytes | None:
        """Take a P-DATA-TF PDU body if it belongs to the direct path.

        Returns ``None`` when pynetdicom must process the PDU, else the bytes to send
        back (a C-STORE-RSP PDU once the request is complete, or ``b""``).

        Raises
        ------
        ProtocolError
            When the PDU breaks the P-DATA rules; the instance in progress, if any, is
            dropped (the association is to be aborted).
        """
        try:
            pdvs = split_pdvs(body)
        except ProtocolError:
            self.abandon()
            raise
        if self._message is None:
            message = self._start(assoc, pdvs)
            if message is None:
                self._track_command(pdvs)
                return None
            self._message = message
            pdvs = pdvs[1:]
        return self._gather(assoc, pdvs)

    def refuse_over_limit(self, dul: Any, body: bytearray) -> bytes | None:
        """A C-STORE dataset on pynetdicom's path went over node.max_instance_mb with
        this P-DATA-TF ``body``: answer it 0xA700, as this path does, and keep the
        association.

        pynetdicom's partial message is dropped, and the rest of the dataset, from
        ``body`` on, is gathered here by an instance already refused, which discards
        its PDVs and is answered after the last. Returns what :meth:`offer` would, or
        ``None`` when the message is no C-STORE-RQ with a complete command set, or
        breaks the P-DATA rules (then the association is to be aborted).
        """
        message = _gathered_message(dul)
        if not isinstance(message, C_STORE_RQ) or message.context_id is None:
            return None
        try:
            command = decode_command(message.encoded_command_set.getvalue())
        except ValueError:
            return None
        dul.assoc.dimse.message = None  # frees what pynetdicom gathered
        comment = too_large_comment(dul.max_message_part)
        log.warning("refused instance %s from %r: 0x%04X %s", command.affected_sop_instance_uid,
                    dul.assoc.requestor.ae_title, OUT_OF_RESOURCES, comment)
        self._message = _Message(message.context_id, command,
                                 RefusedStore(OUT_OF_RESOURCES, comment))
        try:
            return self._gather(dul.assoc, split_pdvs(memoryview(body)))
        except ProtocolError as exc:
            log.error("aborting association: %s", exc)
            return None

    def _start(self, assoc: object, pdvs: list[tuple[int, int, memoryview]]) -> _Message | None:
        if self._command_pending or not pdvs:
            return None
        context_id, control, data = pdvs[0]
        if control & (_COMMAND | _LAST) != _COMMAND | _LAST:
            return None
        if any(ctx != context_id or ctrl & _COMMAND for ctx, ctrl, _ in pdvs[1:]):
            return None
        context = getattr(assoc, "_accepted_cx", {}).get(context_id)
        if context is None:
            return None
        try:
            command = decode_command(data)
        except ValueError:  # an odd command set: let pynetdicom deal with it
            return None
        eligible = (
            command.command_field == C_STORE
            and command.command_data_set_type != NO_DATASET
            and command.affected_sop_class_uid == context.abstract_syntax
        )
        if not eligible:
            return None
        incoming = self.handler(assoc, str(context.transfer_syntax[0]), command)
        return _Message(context_id, command, incoming)

    def _track_command(self, pdvs: list[tuple[int, int, memoryview]]) -> None:
        for _, control, _ in pdvs:
            if control & _COMMAND:
                self._command_pending = not control & _LAST

    def _gather(self, assoc: object, pdvs: list[tuple[int, int, memoryview]]) -> bytes:
        message = self._message
        assert message is not None
        for index, (context_id, control, data) in enumerate(pdvs):
            if context_id != message.context_id or control & _COMMAND:
                self.abandon()
                raise ProtocolError("PDV of another message inside a C-STORE dataset")
            if control & _LAST and index != len(pdvs) - 1:
                self.abandon()
                raise ProtocolError("PDVs after the last fragment of a C-STORE dataset")
            message.incoming.write(data)
            if control & _LAST:
                self._message = None
                status, comment = message.incoming.finish()
                return p_data_pdu(message.context_id, store_response(message.command, status, comment))
        return b""

    def abandon(self) -> None:
        """The association ended (or broke the protocol) in the middle of a C-STORE."""
        if self._message is not None:
            self._message.incoming.abort()
            self._message = None


def _gathered_message(dul: Any) -> Any:
    """pynetdicom's message in progress, once every PDU read before this one has reached
    it: their events, queued before this PDU's, are handled first, in order, as the DUL
    loop would (it handles one event per PDU read, so there is rarely one left)."""
    while not dul._recv_pdu.empty():
        try:
            event = dul.event_queue.get(block=False)
        except queue.Empty:
            break
        dul.state_machine.do_action(event)
    return dul.assoc.dimse.message
