"""Event-driven reactors for pynetdicom's acceptor side.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms
whenever the socket has no complete data, and the association thread sleeps 1 ms
between checks for a decoded DIMSE message. A 512 KB CT slice arrives in dozens of
PDUs, so those sleeps, not the work, dominated our ingest time (a plain pynetdicom
SCP measured 0.18x of DCMTK's storescp; see docs/benchmarks.md). Here the same loops
block instead: the DUL thread in ``select()`` on the socket and a wake-up pipe, the
association thread on an event set when a message or a release/abort arrives. The state
machine, PDU decoding and DIMSE handling are pynetdicom's own, unchanged.

Tracks pynetdicom 3.0.4 (pinned in pyproject.toml): the loop bodies follow
``DULServiceProvider.run_reactor`` and ``Association._run_reactor`` of that version (MIT
licence). Before moving the pin, diff those two methods against the new release.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import struct
import threading
from copy import copy
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.dicom.fast_store import _LAST, FastStore, ProtocolError, split_pdvs

log = logging.getLogger(__name__)

# Upper bound on a blocking wait: timers (ARTIM, idle, kill flags) are checked at least
# this often.
_MAX_WAIT_S = 0.02
_RECV_CHUNK = 256 * 1024

# A PDU's length is the peer's claim: it is checked against these before a byte of its
# body is allocated. An A-ASSOCIATE-RQ with 128 presentation contexts of a dozen
# transfer syntaxes each is ~40 KB; nothing before the association needs more.
NEGOTIATION_PDU_MAX = 64 * 1024
# With node.max_pdu 0 ("unlimited", as announced to the peer) a P-DATA-TF is still
# refused beyond this: no peer we know sends larger ones, and 32 associations of it
# stay within 512 MiB.
UNLIMITED_PDU_CAP = 16 * 1024 * 1024
# A-ABORT reason (service-provider source, PS3.8 9.3.8): invalid PDU parameter value.
_INVALID_PARAMETER = 0x06


def p_data_limit(max_pdu: int) -> int:
    """The largest P-DATA-TF body (the PDU length field) accepted for ``node.max_pdu``.

    The maximum length we negotiate bounds the P-DATA-TF variable field, i.e. the
    PDU without its 6-byte header (PS3.8 D.1).
    """
    return max_pdu if max_pdu > 0 else UNLIMITED_PDU_CAP


class _SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that sets an event whenever something is put on it."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake.set()


class FastSocket(AssociationSocket):
    """Reads whole PDUs with large ``recv_into`` calls instead of 4 KB pieces."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            count = sock.recv_into(view[read:], min(nr_bytes - read, _RECV_CHUNK))
            if not count:
                # Same contract as pynetdicom: a short read means the peer closed, and
                # the DUL turns it into Evt17.
                return buffer[:read]
            read += count
        return buffer


class FastDUL(DULServiceProvider):
    """DUL provider whose reactor blocks on the socket instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._fast: FastStore | None = None
        # Set by FastRequestHandler from the configuration (see p_data_limit).
        self.max_p_data = UNLIMITED_PDU_CAP
        self.max_message_part = 1 << 62
        # Bytes of the message part pynetdicom is gathering in memory (fallback path).
        self._fallback_bytes = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _read_pdu_data(self) -> None:
        """Read one PDU; C-STORE data goes to the direct path, the rest to pynetdicom.

        Error handling follows pynetdicom's ``_read_pdu_data``: a short read is Evt17
        (connection closed), an unknown or undecodable PDU Evt19.
        """
        sock = self.socket
        assert sock is not None
        try:
            header = sock.recv(6)
            if len(header) < 6:
                self.event_queue.put("Evt17")
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in range(0x01, 0x08):
                log.error("unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")
                return
            limit = self._pdu_limit(pdu_type)
            if length > limit:
                self._refuse(f"PDU type 0x{pdu_type:02X} claims {length} bytes, over {limit}")
                return
            body = sock.recv(length)
        except TimeoutError:
            # A peer that stops in the middle of a PDU must not hold the thread forever.
            self._refuse("peer stalled in the middle of a PDU")
            return
        if len(body) != length:
            log.error("PDU shorter than announced (%s of %s bytes)", len(body), length)
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x01 and sock.socket is not None:
            # Negotiation is over once the request is in: from now on a stalled read
            # waits for the network timeout instead (see FastRequestHandler).
            sock.socket.settimeout(self.assoc.network_timeout)
        if pdu_type == 0x04 and self.state_machine.current_state == "Sta6":
            fast = self._fast_store()
            if fast is not None:
                try:
                    reply = fast.offer(self.assoc, memoryview(body))
                except ProtocolError as exc:  # its instance is dropped already
                    self._refuse(str(exc))
                    return
                if reply is not None:
                    if reply:
                        sock.send(reply)
                    return
        if pdu_type == 0x04 and self._fallback_over_limit(body):
            fast = self._fast_store()
            reply = None if fast is None else fast.refuse_over_limit(self, body)
            if reply is None:
                self._refuse(
                    f"message part over {self.max_message_part} bytes (node.max_instance_mb)"
                )
                return
            self._fallback_bytes = 0  # the rest of that dataset takes the direct path
            if reply:
                sock.send(reply)
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            log.error("unable to decode the received PDU: %s", exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _pdu_limit(self, pdu_type: int) -> int:
        if pdu_type == 0x04 and self.state_machine.current_state != "Sta2":
            return self.max_p_data
        return NEGOTIATION_PDU_MAX

    def _fallback_over_limit(self, body: bytearray) -> bool:
        """pynetdicom gathers a message's command or dataset in memory until its last
        fragment: bound that by node.max_instance_mb too (a C-STORE over it is answered
        0xA700 by FastStore.refuse_over_limit, anything else aborted)."""
        self._fallback_bytes += len(body)
        if self._fallback_bytes > self.max_message_part:
            return True
        try:
            if any(control & _LAST for _, control, _ in split_pdvs(memoryview(body))):
                self._fallback_bytes = 0
        except ProtocolError:
            pass  # pynetdicom's decoder refuses it (Evt19)
        return False

    def _refuse(self, reason: str) -> None:
        """A-ABORT and close at once, without reading (or allocating) the rest."""
        log.warning("aborting association: %s", reason)
        sock = self.socket
        assert sock is not None
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = _INVALID_PARAMETER
        try:
            sock.send(abort_pdu.encode())
        except OSError:
            pass  # the peer may be gone already; closing is what matters
        # close() queues Evt17: the state machine issues A-P-ABORT to the association
        # (recorded aborted) or, before one was established, just ends.
        sock.close()

    def _fast_store(self) -> FastStore | None:
        if self._fast is None:
            handler = getattr(self.assoc._server, "fast_store_handler", None)
            if handler is None:
                return None
            self._fast = FastStore(handler)
        return self._fast

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._poke()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\x00")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake-up is pending anyway) or already closed

    def _wait(self) -> None:
        """Block until the socket is readable, a primitive is queued, or a timeout."""
        assoc_socket = self.socket
        sock = assoc_socket.socket if assoc_socket is not None else None
        watch: list[Any] = [self._wake_r]
        if sock is not None and assoc_socket is not None and assoc_socket._is_connected:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            if sock.fileno() >= 0:
                watch.append(sock)
        try:
            ready, _, _ = select.select(watch, [], [], _MAX_WAIT_S)
        except (OSError, ValueError):
            return  # socket closed under us: the next loop reports Evt17
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def run_reactor(self) -> None:
        try:
            self._run()
        finally:
            if self._fast is not None:
                self._fast.abandon()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _run(self) -> None:
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("exception in the DUL reactor, aborting association")
                log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if self.socket is not None:
                    self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait()
                continue
            self.state_machine.do_action(event)


class FastAssociation(Association):
    """Association whose acceptor loop waits on an event rather than sleeping 1 ms."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._wake = threading.Event()
        self.dul = FastDUL(self)
        # The setters put these on the DUL's ARTIM and idle timers; re-apply them to
        # the new DUL (else ARTIM stays at the DUL's built-in 30 s, the idle at 60 s).
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self.dul.to_user_queue = _SignallingQueue(self._wake)
        self.dimse.msg_queue = _SignallingQueue(self._wake)

    def kill(self) -> None:
        super().kill()
        self._wake.set()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            # pynetdicom fires EVT_RELEASED and EVT_CONN_CLOSE from different threads in
            # no fixed order; this runs once, when the association is over for good.
            on_end = getattr(self._server, "on_association_end", None)
            if on_end is not None:
                on_end(self)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._wake.wait(_MAX_WAIT_S)
            self._wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            # Serve every message already decoded before checking release/abort, so
            # that a release queued behind a C-STORE never overtakes it.
            while not self._kill:
                context_id, msg = self.dimse.get_msg(block=False)
                if not msg:
                    break
                self._serve_request(msg, context_id)  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _copy_context(context: PresentationContext) -> PresentationContext:
    """A per-association copy of a supported context.

    pynetdicom deep-copies all ~170 contexts for every association (~40 ms here);
    a context only holds strings, flags and a list of UIDs, so a shallow copy with
    its own list is equivalent.
    """
    copied = copy(context)
    copied._transfer_syntax = list(context._transfer_syntax)
    return copied


class FastRequestHandler(RequestHandler):
    """Creates :class:`FastAssociation` acceptors with a :class:`FastSocket`.

    Mirrors ``RequestHandler._create_association`` of pynetdicom 3.0. On the TLS
    listener (:class:`node.dicom.tls.TLSAssociationServer`) it first completes the TLS
    handshake, in this connection's thread.
    """

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket) and not self._handshake(self.request):
            return
        super().handle()

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """Shake hands within the association timeout; a failure closes the connection
        before any DICOM is read (a plain TCP peer on this port gets nothing)."""
        sock.settimeout(self.ae.acse_timeout)
        try:
            sock.do_handshake()
            return True
        except (ssl.SSLError, OSError) as exc:
            on_refused = getattr(self.server, "on_tls_refused", None)
            if on_refused is not None:
                on_refused(self.client_address, exc)
            try:
                sock.close()
            except OSError:
                pass
            return False

    def _create_association(self) -> Association:
        assoc = FastAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        # Until the A-ASSOCIATE-RQ is in, a read stalled mid-PDU gives up after the
        # association timeout (ARTIM covers a peer that sends nothing at all).
        self.request.settimeout(self.ae.acse_timeout)
        assoc.set_socket(FastSocket(assoc, client_socket=self.request))
        assert isinstance(assoc.dul, FastDUL)
        assoc.dul.max_p_data = p_data_limit(self.ae.maximum_pdu_size)
        assoc.dul.max_message_part = getattr(self.server, "max_instance_bytes", 1 << 62)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = [_copy_context(cx) for cx in self.server.contexts]
        assoc.requestor.address_info = self.remote

        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
