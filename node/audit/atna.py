"""IHE ATNA audit messages to an audit record repository, the node's one emitter.

Other modules call it in one line; every call returns at once (the message is built
and sent by a background thread, so a slow or absent repository never holds up a
C-STORE or a page), and does nothing when ``audit.syslog`` is unset::

    from node.audit import atna
    atna.start(settings, engine, "serve")      # Application Start
    atna.security_alert_association("CT9", "10.0.0.9", reason)
    atna.stop()                                # Application Stop, then the queue drains

Transport (``audit.syslog``): RFC 5424 syslog messages (facility authpriv, MSGID
``IHE+RFC-3881``, the XML as the UTF-8 message) over UDP (RFC 5426, one per datagram),
TCP (RFC 6587 octet counting) or TLS (RFC 5425, verifying the repository's
certificate). A repository that is down loses the messages of that time, with a
warning in the log; the queue is bounded so memory is.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from node.audit import messages as m

log = logging.getLogger(__name__)

_QUEUE_MAX = 10_000
#: authpriv (10) * 8 + notice (5); security alerts are sent at warning (4).
_PRI_NOTICE, _PRI_WARNING = 85, 84
_BOM = "\ufeff".encode()

Builder = Callable[[m.Source], ET.Element | None]


class _Emitter:
    """The background thread, its queue and its connection to the repository."""

    def __init__(self, settings: Any, engine: Any, process: str) -> None:
        self.config = settings.audit.syslog
        host = socket.gethostname()
        self.source = m.Source(
            source_id=settings.audit.source_id or f"{settings.node.ae_title}@{host}",
            site_id=settings.audit.enterprise_site_id, ae_title=settings.node.ae_title,
            host=host, process=f"pacsnode {process} (pid {os.getpid()})")
        self.engine = engine
        self.hostname = host
        self.queue: queue.Queue[tuple[int, Builder] | None] = queue.Queue(_QUEUE_MAX)
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="atna", daemon=True)
        self._thread.start()

    def put(self, builder: Builder, priority: int = _PRI_NOTICE) -> None:
        try:
            self.queue.put_nowait((priority, builder))
        except queue.Full:
            log.warning("ATNA queue full (audit.syslog unreachable?): an audit message "
                        "was dropped")

    def close(self, timeout: float = 5.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            priority, builder = item
            try:
                message = builder(self.source)
                if message is not None:
                    self._send(self._frame(priority, m.to_bytes(message)))
            except Exception as exc:  # never let one message end the thread
                log.warning("ATNA message not sent to %s:%s (%s): %s", self.config.host,
                            self.config.port, self.config.transport, exc)
                self._drop_connection()

    def _frame(self, priority: int, xml: bytes) -> bytes:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        header = f"<{priority}>1 {stamp} {self.hostname} pacsnode {os.getpid()} IHE+RFC-3881 - "
        return header.encode() + _BOM + xml

    def _send(self, payload: bytes) -> None:
        if self.config.transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, (self.config.host, self.config.port))
            return
        framed = f"{len(payload)} ".encode() + payload
        for attempt in (1, 2):  # a connection the repository closed is opened once more
            try:
                self._connection().sendall(framed)
                return
            except OSError:
                self._drop_connection()
                if attempt == 2:
                    raise

    def _connection(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.config.host, self.config.port), timeout=10)
            if self.config.transport == "tls":
                sock = self._tls_context().wrap_socket(sock, server_hostname=self.config.host)
            self._sock = sock
        return self._sock

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.config.ca_certificates))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.config.certificate is not None:
            context.load_cert_chain(str(self.config.certificate), str(self.config.private_key))
        return context

    def _drop_connection(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


_emitter: _Emitter | None = None
_lock = threading.Lock()


def start(settings: Any, engine: Any, process: str = "serve") -> None:
    """Start sending (if ``audit.syslog`` is set) and report the Application Start."""
    global _emitter
    with _lock:
        if _emitter is not None:
            _emitter.close()
        _emitter = _Emitter(settings, engine, process) if settings.audit.syslog else None
    _put(lambda source: m.application_activity(source, started=True))


def stop() -> None:
    """Report the Application Stop, send what is queued and stop the thread."""
    global _emitter
    _put(lambda source: m.application_activity(source, started=False))
    with _lock:
        emitter, _emitter = _emitter, None
    if emitter is not None:
        emitter.close()


def _put(builder: Builder, priority: int = _PRI_NOTICE) -> None:
    emitter = _emitter
    if emitter is not None:
        emitter.put(builder, priority)


# -- the events, one call each ------------------------------------------------------


def instances_received(association_id: int | None, calling_ae: str, address: str) -> None:
    """An association ended: the studies it stored (read from the database)."""
    if association_id is None:
        return

    def build(source: m.Source) -> ET.Element | None:
        from node.audit.lookup import studies_of_association

        studies = studies_of_association(_engine(), association_id)
        if not studies:
            return None
        return m.instances_transferred(source, studies, received=True, peer_ae=calling_ae,
                                       peer_address=address)
    _put(build)


def instances_delivered(delivery_ids: list[int], destination: Any, error: str = "") -> None:
    """Results were sent to a destination (``error``: they were not)."""
    if not delivery_ids:
        return

    def build(source: m.Source) -> ET.Element | None:
        from node.audit.lookup import studies_of_deliveries

        studies = studies_of_deliveries(_engine(), delivery_ids)
        return m.instances_transferred(
            source, studies, received=False, peer_ae=destination.ae_title,
            peer_address=destination.host, outcome=m.MINOR_FAILURE if error else m.SUCCESS,
            outcome_text=error[:500])
    _put(build)


def user_login(user: str, client: str, success: bool, reason: str = "") -> None:
    _put(lambda source: m.user_authentication(source, user, client, success=success,
                                              reason=reason))


def user_logout(user: str, client: str) -> None:
    _put(lambda source: m.user_authentication(source, user, client, login=False))


def query(user: str, client: str, parameters: dict[str, Any]) -> None:
    _put(lambda source: m.query(source, user, client, parameters))


def study_accessed(user: str, client: str, study_uid: str) -> None:
    def build(source: m.Source) -> ET.Element | None:
        from node.audit.lookup import study_object

        return m.instances_accessed(source, user, client, study_object(_engine(), study_uid))
    _put(build)


def export(user: str, client: str, study_uid: str, what: str) -> None:
    def build(source: m.Source) -> ET.Element | None:
        from node.audit.lookup import study_object

        return m.export(source, user, client, study_object(_engine(), study_uid), what)
    _put(build)


def security_alert_association(calling_ae: str, address: str, reason: str) -> None:
    """A rejected association or a failed DICOM TLS handshake."""
    _put(lambda source: m.security_alert(
        source, m.NODE_AUTHENTICATION, reason, offender=calling_ae, address=address,
        resource=f"dicom://{source.host}/{source.ae_title}"), _PRI_WARNING)


def security_alert_user(user: str, client: str, reason: str, locked: bool = False) -> None:
    """A locked account (``locked``) or an action the user's role does not allow."""
    kind = m.USER_SECURITY_CHANGED if locked else m.RESTRICTED_FUNCTION
    _put(lambda source: m.security_alert(source, kind, reason, offender=user, address=client,
                                         resource=f"pacsnode-web://{source.host}"),
         _PRI_WARNING)


def _engine() -> Any:
    emitter = _emitter
    if emitter is None or emitter.engine is None:
        raise RuntimeError("no database for the audit message")
    return emitter.engine
