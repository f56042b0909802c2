"""The DICOM listener: C-ECHO, C-STORE and Storage Commitment reports over pynetdicom.

Handlers are thin: they translate pynetdicom events into calls on the
:class:`~node.ingest.ingestor.Ingestor` and the :class:`~node.ingest.associations.AssociationLog`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from db.tables import AssociationOutcome
from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.audit import atna
from node.config import NodeConfig
from node.dicom.access import CallingAEPolicy
from node.dicom.codec import Command
from node.dicom.reactor import FastRequestHandler
from node.dicom.status import StoreStatus
from node.dicom.tls import TLSAssociationServer, peer_subject, server_context
from node.ingest.associations import AssociationLog
from node.ingest.ingestor import Incoming, Ingestor, StoreRequest, StoreResult

log = logging.getLogger(__name__)

# Per-association state kept on the Association object itself: pynetdicom runs each
# association in its own thread and drops the object when it ends.
_ASSOC_ID = "_pacsnode_association_id"
# The address an association was admitted under (counted in StorageSCP._admitted).
_ADMITTED = "_pacsnode_admitted_from"


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm: without it each small DIMSE response waits ~40 ms."""
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_ae(config: NodeConfig) -> AE:
    """An AE accepting Verification and every storage SOP class in every transfer syntax
    pynetdicom knows (uncompressed, deflate, RLE, JPEG, JPEG-LS, JPEG 2000, HTJ2K)."""
    ae = AE(ae_title=config.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.require_called_aet = True
    ae.maximum_pdu_size = config.max_pdu
    ae.maximum_associations = config.max_associations
    ae.network_timeout = config.network_timeout_s
    # The acceptor's ACSE timeout is its ARTIM timer: how long a connection may take to
    # send its A-ASSOCIATE-RQ (pynetdicom closes it then).
    ae.acse_timeout = config.association_timeout_s
    ae.dimse_timeout = config.network_timeout_s
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    # A PACS sends its Storage Commitment report (N-EVENT-REPORT) on an association of
    # its own, proposing the SCP role for itself (PS3.4 J.3.3): accept whichever roles
    # it proposes.
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    return ae


class ListenError(OSError):
    """A listener's port cannot be bound; the message names the key to change."""


#: Records a Storage Commitment report: (event type, event information, the reporting
#: AE title) -> the N-EVENT-REPORT status to answer.
CommitmentHandler = Callable[[int, Dataset, str], int]


class StorageSCP:
    """Binds the event handlers and runs the listener in background threads.

    ``commitments`` records the Storage Commitment reports PACS send back
    (:class:`node.workflow.commitment.CommitmentReports`); without it they are refused.
    """

    def __init__(self, config: NodeConfig, ingestor: Ingestor, audit: AssociationLog,
                 policy: CallingAEPolicy, commitments: CommitmentHandler | None = None) -> None:
        self.config = config
        self.ingestor = ingestor
        self.audit = audit
        self.policy = policy
        self.commitments = commitments
        # Associations admitted per requestor address (node.max_associations_per_host).
        self._admitted: dict[str, int] = {}
        self._admitted_lock = threading.Lock()
        self.ae = make_ae(config)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: TLSAssociationServer | None = None
        self._in_flight = _InFlight()
        #: The TLS listener's port, once started (None without ``node.tls``).
        self.tls_port: int | None = None

    @property
    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
        ]

    def start(self) -> tuple[str, int]:
        """Start listening on ``node.port`` (unless ``node.plain_listener: false``) and on
        ``node.tls.port`` with TLS; returns the plain listener's (host, port), or the TLS
        one's without a plain listener.

        Raises
        ------
        node.config.ConfigError
            A TLS certificate, key or CA file cannot be loaded.
        ListenError
            A port cannot be bound.
        """
        context = server_context(self.config.tls) if self.config.tls else None
        host, port = self.config.host, 0
        if self.config.plain_listener:
            self._server = self._serve(self.config.port, ThreadedAssociationServer, None)
            port = int(self._server.server_address[1])
            log.info("listening as %s on %s:%s", self.config.ae_title, host, port)
        if self.config.tls is not None:
            self._tls_server = self._serve(self.config.tls.port, TLSAssociationServer, context)
            self._tls_server.on_tls_refused = self._on_tls_refused  # type: ignore[attr-defined]
            self.tls_port = int(self._tls_server.server_address[1])
            log.info("listening as %s on %s:%s with DICOM TLS (client certificate %s)",
                     self.config.ae_title, host, self.tls_port,
                     "required" if self.config.tls.require_client_certificate else "optional")
        return str(host), port or int(self.tls_port or 0)

    def _serve(self, port: int, server_class: type[ThreadedAssociationServer],
               context: ssl.SSLContext | None) -> ThreadedAssociationServer:
        try:
            server = self.ae.make_server(
                (self.config.host, port),
                evt_handlers=self.handlers,
                server_class=server_class,
                request_handler=FastRequestHandler,
                ssl_context=context,
            )
        except OSError as exc:
            key = "node.tls.port" if context is not None else "node.port"
            raise ListenError(f"cannot listen on {self.config.host}:{port} "
                              f"({exc.strerror or exc}); set {key} to a free port") from None
        set_nodelay(server.socket)
        server.on_association_end = self._on_end  # type: ignore[attr-defined]
        server.fast_store_handler = self._fast_store  # type: ignore[attr-defined]
        server.max_instance_bytes = self.config.max_instance_mb << 20  # type: ignore[attr-defined]
        self.ae._servers.append(server)
        threading.Thread(
            target=server.serve_forever, name=f"dicom-listener-{port}", daemon=True
        ).start()
        return server

    def reload(self, policy: CallingAEPolicy, context: ssl.SSLContext | None) -> None:
        """Who may associate from now on, and (when given) the TLS listener's new
        certificates; associations already established keep what they had."""
        self.policy = policy
        if context is not None and self._tls_server is not None:
            self._tls_server.ssl_context = context

    def stop_listening(self) -> None:
        """Accept no new connections; established associations go on."""
        servers, self._server, self._tls_server = (self._server, self._tls_server), None, None
        for server in servers:
            if server is not None:
                server.shutdown()  # pynetdicom's: also closes it and forgets it

    def drain(self, timeout_s: float) -> bool:
        """Finish the C-STOREs in flight, refusing new ones (0xA700: the sender keeps
        them and sends them again, to us after the restart or to another receiver);
        True if all finished within ``timeout_s``."""
        self.stop_listening()
        self._in_flight.drain(timeout_s)
        return self._in_flight.count == 0

    def stop(self) -> None:
        """Stop listening and abort the associations still open."""
        self.ae.shutdown()

    # -- handlers -------------------------------------------------------------

    @staticmethod
    def _on_connect(event: evt.Event) -> None:
        set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)

    def _on_requested(self, event: evt.Event) -> None:
        """Record the association before it is accepted: the direct C-STORE path may
        serve its first request as soon as the A-ASSOCIATE-AC is out."""
        assoc = event.assoc
        requestor = assoc.requestor
        primitive = requestor.primitive
        # Not yet copied to requestor.ae_title at this point: read the request itself.
        calling = str(primitive.calling_ae_title).strip() if primitive else ""
        called = str(primitive.called_ae_title).strip() if primitive else ""
        try:
            row = self.audit.open(calling, called, requestor.address, requestor.port,
                                  **_transport(assoc))
        except SQLAlchemyError:
            log.exception("could not record association from %s", calling)
            row = None
        setattr(assoc, _ASSOC_ID, row)
        if reason := self.policy.refusal(calling, requestor.address):
            # Rejected-permanent, by the service user: calling AE title not recognised.
            _reject(assoc, 0x01, 0x01, 0x03)
            self._record_rejection(assoc, calling, reason)
            return
        log.info("association %s from %s (%s:%s)", row, calling, requestor.address, requestor.port)
        if self._over_host_limit(assoc):
            self._reject_busy_host(assoc, calling)

    def _over_host_limit(self, assoc: Association) -> bool:
        """Admit the association under its requestor's address, unless that address
        has node.max_associations_per_host admitted already; counted until it ends.

        Checked and counted under one lock: associations negotiating at the same time
        must not all pass the check. Connections that have not sent their request do
        not count (they are bounded by node.association_timeout_s and
        node.max_associations): a peer's own hung connections must not lock it out.
        """
        address = assoc.requestor.address
        with self._admitted_lock:
            admitted = self._admitted.get(address, 0)
            if admitted >= self.config.max_associations_per_host:
                return True
            self._admitted[address] = admitted + 1
        setattr(assoc, _ADMITTED, address)
        return False

    def _reject_busy_host(self, assoc: Association, calling: str) -> None:
        # Rejected-transient, service provider (presentation), local limit exceeded: the
        # peer may retry later. pynetdicom then skips negotiation (is_rejected is set).
        _reject(assoc, 0x02, 0x03, 0x02)
        self._record_rejection(assoc, calling, (
            f"{self.config.max_associations_per_host} associations from this host are "
            "established already (node.max_associations_per_host)"))

    def _on_rejected(self, event: evt.Event) -> None:
        """Associations pynetdicom rejects while negotiating (our called AE title)."""
        primitive = event.assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive else ""
        called = str(primitive.called_ae_title).strip() if primitive else ""
        reason = (f"called AE title {called!r} is not ours ({self.config.ae_title})"
                  if called != self.config.ae_title else "refused while negotiating")
        self._record_rejection(event.assoc, calling, reason)

    def _record_rejection(self, assoc: Association, calling: str, reason: str) -> None:
        # AE titles and addresses only: no patient data is known, or logged, here.
        log.warning("rejected association from %s (%s): %s", calling,
                    assoc.requestor.address, reason)
        atna.security_alert_association(calling, assoc.requestor.address, reason)
        row = getattr(assoc, _ASSOC_ID, None)
        setattr(assoc, _ASSOC_ID, None)
        if row is not None:
            try:
                self.audit.close(row, AssociationOutcome.REJECTED, reason)
            except SQLAlchemyError:
                log.exception("could not record rejected association")

    def _on_tls_refused(self, address: tuple[str, int], error: BaseException) -> None:
        """A connection to the TLS port whose handshake failed: no association."""
        if isinstance(error, (ssl.SSLEOFError, ConnectionError)) or (
                isinstance(error, OSError) and not isinstance(error, (ssl.SSLError, TimeoutError))):
            # Closed before (or during) the hello: a port check, not a peer to audit.
            log.debug("connection from %s closed during the TLS handshake", address[0])
            return
        reason = f"TLS handshake failed: {_tls_reason(error)}"
        log.warning("refused connection from %s:%s: %s", address[0], address[1], reason)
        atna.security_alert_association("", address[0], reason)
        try:
            row = self.audit.open("", "", address[0], address[1], tls=True)
            self.audit.close(row, AssociationOutcome.REJECTED, reason)
        except SQLAlchemyError:
            log.exception("could not record the refused TLS connection")

    @staticmethod
    def _on_echo(event: evt.Event) -> int:
        return 0x0000

    def _on_event_report(self, event: evt.Event) -> tuple[int, None]:
        """A Storage Commitment report; recorded by ``commitments``. 0x0112 (no such
        SOP instance) for an event of another SOP class, or without ``commitments``."""
        request = event.request
        if self.commitments is None or request.AffectedSOPClassUID != StorageCommitmentPushModel:
            return 0x0112, None
        return self.commitments(int(request.EventTypeID), event.event_information,
                                str(event.assoc.requestor.ae_title).strip()), None

    def _on_store(self, event: evt.Event) -> Dataset:
        """C-STOREs that pynetdicom delivers (those the direct path passed on)."""
        request = event.request
        status, comment = self._store(
            event.assoc,
            str(event.context.transfer_syntax),
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            request.DataSet.getbuffer(),  # type: ignore[union-attr]
        )
        response = Dataset()
        response.Status = status
        if comment:
            response.ErrorComment = comment
        return response

    def _fast_store(self, assoc: Association, transfer_syntax: str,
                    command: Command) -> _FastIncoming | _Refused:
        """C-STOREs taken by the direct path in node/fast_store.py."""
        if not self._in_flight.enter():
            return _Refused()
        return _FastIncoming(
            self._in_flight,
            self.ingestor.begin(
                self._request(
                    assoc,
                    transfer_syntax,
                    command.affected_sop_class_uid,
                    command.affected_sop_instance_uid,
                )
            )
        )

    def _store(
        self,
        assoc: Association,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: bytes | memoryview,
    ) -> tuple[int, str]:
        request = self._request(assoc, transfer_syntax, sop_class_uid, sop_instance_uid)
        if not self._in_flight.enter():
            return _Refused().finish()
        try:
            return _answer(self.ingestor.receive(request, dataset))
        finally:
            self._in_flight.leave()

    @staticmethod
    def _request(
        assoc: Association, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str
    ) -> StoreRequest:
        return StoreRequest(
            transfer_syntax=transfer_syntax,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            calling_ae=assoc.requestor.ae_title,
            association_id=getattr(assoc, _ASSOC_ID, None),
        )

    def _on_end(self, assoc: Association) -> None:
        address = getattr(assoc, _ADMITTED, None)
        if address is not None:
            setattr(assoc, _ADMITTED, None)
            with self._admitted_lock:
                left = self._admitted[address] - 1
                if left:
                    self._admitted[address] = left
                else:
                    del self._admitted[address]
        row = getattr(assoc, _ASSOC_ID, None)
        if row is None:
            return
        if assoc.is_released:
            outcome = AssociationOutcome.RELEASED
        elif assoc.is_aborted:
            outcome = AssociationOutcome.ABORTED
        else:
            outcome = AssociationOutcome.CLOSED
        try:
            self.audit.close(row, outcome)
        except SQLAlchemyError:
            log.exception("could not close association record %s", row)
        atna.instances_received(row, assoc.requestor.ae_title, assoc.requestor.address)


def _transport(assoc: Association) -> dict[str, Any]:
    """Whether the association came over TLS, and whose certificate it showed."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    tls = isinstance(sock, ssl.SSLSocket)
    return {"tls": tls, "peer_certificate": peer_subject(sock) if tls else ""}


def _tls_reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no handshake within node.association_timeout_s"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"client certificate refused ({error.verify_message or error.reason})"
    if isinstance(error, ssl.SSLError):
        return _TLS_REASONS.get(error.reason or "", str(error.reason or error))
    return str(error)


# OpenSSL's reasons for the handshake failures an administrator meets most.
_TLS_REASONS = {
    "WRONG_VERSION_NUMBER": "not TLS (a plain DICOM connection to the TLS port?)",
    "HTTP_REQUEST": "not TLS (an HTTP request)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        "the client sent no certificate (node.tls.require_client_certificate)",
    "CERTIFICATE_VERIFY_FAILED":
        "client certificate not signed by node.tls.ca_certificates",
    "UNSUPPORTED_PROTOCOL": "the client offered only TLS older than 1.2",
    "NO_SHARED_CIPHER": "no cipher in common (BCP 195 allows ECDHE/DHE with AES-GCM or ChaCha20)",
}


def _reject(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """A-ASSOCIATE-RJ from an EVT_REQUESTED handler, as pynetdicom's own rejections do
    it: wait until the DUL has sent it, else pynetdicom may shut the connection first
    and the peer sees it close with no answer."""
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()


def _answer(result: StoreResult) -> tuple[int, str]:
    return int(result.status), result.error_comment if result.status.is_failure else ""


class _InFlight:
    """C-STOREs being received; once draining, no new one is let in."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._changed = threading.Condition()

    def enter(self) -> bool:
        with self._changed:
            if self.draining:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self.count -= 1
            self._changed.notify_all()

    def drain(self, timeout_s: float) -> None:
        with self._changed:
            self.draining = True
            self._changed.wait_for(lambda: self.count == 0, timeout_s)


class _FastIncoming:
    """Adapts :class:`~node.ingest.ingestor.Incoming` to what node/fast_store.py expects."""

    def __init__(self, in_flight: _InFlight, incoming: Incoming) -> None:
        self._in_flight = in_flight
        self._incoming = incoming
        self.write = incoming.write

    def finish(self) -> tuple[int, str]:
        try:
            return _answer(self._incoming.finish())
        finally:
            self._in_flight.leave()

    def abort(self) -> None:
        try:
            self._incoming.abort()
        finally:
            self._in_flight.leave()


class _Refused:
    """A C-STORE that arrives while the node drains: read, dropped, answered 0xA700."""

    def write(self, fragment: memoryview) -> None:
        pass

    def finish(self) -> tuple[int, str]:
        return int(StoreStatus.OUT_OF_RESOURCES), "node is shutting down; send it again later"

    def abort(self) -> None:
        pass
