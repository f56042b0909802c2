"""DICOM client side: C-ECHO, C-STORE of files, and Storage Commitment requests to a
peer (a PACS, or this node).

Files are sent as they are on disk (pynetdicom reads the encoded dataset without
decoding it), so the receiver gets the same bytes in the same transfer syntax.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    Verification,
)
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.dicom.tls import ClientTLS, handshake_failure

log = logging.getLogger(__name__)

_chunked_lock = threading.Lock()
_chunked_users = 0


@contextmanager
def sending_files_as_stored() -> Iterator[None]:
    """While inside, ``send_c_store(path)`` sends a file's encoded bytes as they are on
    disk, never decoded and re-encoded by pydicom (this needs a presentation context in
    exactly the file's transfer syntax, which :func:`send_files` proposes).

    pynetdicom 3.0 offers this only as the module switch
    ``_config.STORE_SEND_CHUNKED_DATASET``, read at each ``send_c_store``; it is on
    only while some sender is inside this block (counted, so concurrent senders do
    not switch it off under each other), not for the whole process from an import.
    """
    global _chunked_users
    with _chunked_lock:
        if _chunked_users == 0:
            _config.STORE_SEND_CHUNKED_DATASET = True
        _chunked_users += 1
    try:
        yield
    finally:
        with _chunked_lock:
            _chunked_users -= 1
            if _chunked_users == 0:
                _config.STORE_SEND_CHUNKED_DATASET = False

# A requestor may propose at most 128 presentation contexts (PS3.8 9.3.2.2: odd IDs 1-255).
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    ae_title: str
    calling_ae: str = "PACSNODE_SCU"
    #: DICOM TLS: the peer's certificate is verified against the CA, and its host name
    #: or IP address against the certificate's subjectAltName.
    tls: ClientTLS | None = None
    #: How long the TCP connection, and then the answer to our A-ASSOCIATE-RQ, may
    #: each take (a peer that accepts the connection and stays silent costs this much).
    connect_timeout_s: float = 60.0

    def associate(self, ae: AE, handlers: list[tuple[Any, Any]] | None = None,
                  ) -> tuple[Association, ssl.SSLContext | None]:
        """Request an association from ``ae`` (over TLS if configured); the context is
        returned so a failed handshake can be explained (:func:`_refusal`)."""
        context = self.tls.context() if self.tls is not None else None
        tls_args = (context, self.host) if context is not None else None
        ae.connection_timeout = ae.acse_timeout = self.connect_timeout_s
        return ae.associate(self.host, self.port, ae_title=self.ae_title,
                            tls_args=tls_args, evt_handlers=handlers or []), context


@dataclass(frozen=True)
class SendFailure:
    path: str
    reason: str


@dataclass
class SendSummary:
    sent: int = 0
    failures: list[SendFailure] = field(default_factory=list)
    #: DICOMDIR index files: part of a DICOM folder, not instances to send.
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _client_ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.dimse_timeout = ae.network_timeout = 60
    ae.connection_timeout = ae.acse_timeout = peer.connect_timeout_s
    return ae


def echo(peer: Peer) -> int:
    """C-ECHO the peer; returns the DIMSE status, raises ConnectionError if unreachable."""
    ae = _client_ae(peer)
    ae.add_requested_context(Verification)
    assoc, context = peer.associate(ae)
    if not assoc.is_established:
        raise ConnectionError(_refusal(peer, assoc, context))
    try:
        status = assoc.send_c_echo()
        if not status:
            raise ConnectionError(f"no C-ECHO response from {peer.ae_title}@{peer.host}:{peer.port}")
        return int(status.Status)
    finally:
        assoc.release()


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files under the given files and folders, in a stable order."""
    for item in paths:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: str
    transfer_syntax: str


def inspect_file(path: Path) -> _Item:
    """What sending ``path`` needs: its SOP class and transfer syntax (from its meta).

    Raises
    ------
    InvalidDicomError, OSError, ValueError, EOFError
        Not a readable DICOM Part 10 file.
    """
    return _inspect(path)


def _inspect(path: Path) -> _Item:
    dataset = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    meta = dataset.file_meta
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or dataset.get("SOPClassUID", ""))
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if not sop_class or not transfer_syntax:
        raise InvalidDicomError("no SOP Class UID or Transfer Syntax UID in its file meta")
    return _Item(path, sop_class, transfer_syntax)


def send_files(
    paths: Iterable[str | Path],
    peer: Peer,
    progress: Callable[[Path, bool], None] | None = None,
) -> SendSummary:
    """C-STORE every DICOM file under ``paths`` to ``peer``.

    Files that are not DICOM Part 10 files, and instances the peer refuses, are
    reported in the summary with the reason; they never stop the rest.
    """
    summary = SendSummary()
    items: list[_Item] = []
    for path in iter_files(paths):
        try:
            item = _inspect(path)
            if item.sop_class_uid == MediaStorageDirectoryStorage:
                summary.skipped.append(str(path))
                if progress:
                    progress(path, True)
                continue
            items.append(item)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            summary.failures.append(SendFailure(str(path), f"not a readable DICOM file: {exc}"))
            if progress:
                progress(path, False)
    with sending_files_as_stored():
        for batch in _batches(items):
            _send_batch(batch, peer, summary, progress)
    return summary


def _batches(items: list[_Item]) -> Iterator[list[_Item]]:
    """Split items so each association needs at most 128 presentation contexts
    (one per SOP class and transfer syntax)."""
    by_context: dict[tuple[str, str], list[_Item]] = {}
    for item in items:
        by_context.setdefault((item.sop_class_uid, item.transfer_syntax), []).append(item)
    keys = list(by_context)
    for start in range(0, len(keys), _MAX_CONTEXTS):
        yield [item for key in keys[start : start + _MAX_CONTEXTS] for item in by_context[key]]


def _send_batch(
    items: list[_Item],
    peer: Peer,
    summary: SendSummary,
    progress: Callable[[Path, bool], None] | None,
) -> None:
    ae = _client_ae(peer)
    # One context per (SOP class, transfer syntax) with that syntax alone: an
    # acceptor offered several syntaxes in one context picks its own preference,
    # and the file would have to be re-encoded (or could not be sent at all).
    pairs = dict.fromkeys((item.sop_class_uid, item.transfer_syntax) for item in items)
    ae.requested_contexts = [build_context(sop_class, [ts]) for sop_class, ts in pairs]

    assoc, context = peer.associate(ae)
    if not assoc.is_established:
        reason = _refusal(peer, assoc, context)
        for item in items:
            summary.failures.append(SendFailure(str(item.path), reason))
            if progress:
                progress(item.path, False)
        return
    try:
        for position, item in enumerate(items):
            ok, reason = _store_one(assoc, item)
            if ok:
                summary.sent += 1
            else:
                summary.failures.append(SendFailure(str(item.path), reason))
            if progress:
                progress(item.path, ok)
            if not assoc.is_established:
                reason = "association ended by the peer"
                for rest in items[position + 1 :]:
                    summary.failures.append(SendFailure(str(rest.path), reason))
                    if progress:
                        progress(rest.path, False)
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _store_one(assoc: object, item: _Item) -> tuple[bool, str]:
    ok, reason, _answered = _store_answer(assoc, item)
    return ok, reason


def _store_answer(assoc: object, item: _Item) -> tuple[bool, str, bool]:
    """(stored, the reason if not, whether the peer answered at all)."""
    try:
        status = assoc.send_c_store(item.path)  # type: ignore[attr-defined]
    except Exception as exc:  # pynetdicom raises several types for unsendable files
        return False, str(exc).splitlines()[0], False
    if not status:
        return False, "no response (connection lost, or timed out)", False
    code = int(status.Status)
    # A warning (0xB000 coercion, 0xB007 mismatch, 0xB006 elements discarded...)
    # still means the peer stored the instance.
    if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
        return True, "", True
    comment = status.get("ErrorComment", "")
    return False, f"status 0x{code:04X}{': ' + str(comment) if comment else ''}", True


def _refusal(peer: Peer, assoc: object, context: ssl.SSLContext | None = None) -> str:
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if failure := handshake_failure(context):
        return f"TLS handshake with {where} failed: {failure}"
    if getattr(assoc, "is_rejected", False):
        return f"association rejected by {where} (check the called AE title)"
    if peer.tls is not None:
        return (f"cannot associate with {where} over TLS (connection refused, or the peer "
                "ended the handshake: a peer that requires a client certificate needs ours, "
                "and must trust the CA that signed it)")
    return f"cannot connect to {where} (connection refused, or the association request aborted)"


class StoreAssociation:
    """An established association on which files are sent one by one."""

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        #: C-STOREs the peer answered, with any status: it is up, whatever it thought
        #: of the instance.
        self.answered = 0

    @property
    def established(self) -> bool:
        return bool(self._assoc.is_established)

    def store(self, item: _Item) -> tuple[bool, str]:
        """C-STORE one file as it is on disk; (stored, the reason if not)."""
        if not self.established:
            return False, "association ended by the peer"
        if not any(cx.abstract_syntax == item.sop_class_uid
                   and cx.transfer_syntax[0] == item.transfer_syntax
                   for cx in self._assoc.accepted_contexts):
            # The peer answered, in the negotiation: it takes no such instance.
            self.answered += 1
            return False, (f"the peer accepted no presentation context for SOP class "
                           f"{item.sop_class_uid} in transfer syntax {item.transfer_syntax}")
        ok, reason, answered = _store_answer(self._assoc, item)
        self.answered += answered
        return ok, reason


@contextmanager
def store_association(items: list[_Item], peer: Peer) -> Iterator[StoreAssociation]:
    """An association to ``peer`` proposing one context per (SOP class, transfer syntax)
    of ``items`` (at most 128), released at the end.

    Raises
    ------
    ConnectionError
        The peer cannot be reached or refused the association (the message says why).
    """
    pairs = dict.fromkeys((item.sop_class_uid, item.transfer_syntax) for item in items)
    if len(pairs) > _MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts; at most {_MAX_CONTEXTS}")
    ae = _client_ae(peer)
    ae.requested_contexts = [build_context(sop_class, [ts]) for sop_class, ts in pairs]
    assoc, context = peer.associate(ae)
    if not assoc.is_established:
        raise ConnectionError(_refusal(peer, assoc, context))
    with sending_files_as_stored():
        try:
            yield StoreAssociation(assoc)
        finally:
            if assoc.is_established:
                assoc.release()


#: A Storage Commitment report that arrives on our own association: (event type,
#: event information, the reporting AE title) -> the N-EVENT-REPORT status to answer.
ReportHandler = Callable[[int, Dataset, str], int]


class CommitmentRefused(Exception):
    """The peer was reached but did not take the Storage Commitment request."""


def request_commitment(peer: Peer, transaction_uid: str, references: list[tuple[str, str]],
                       on_report: ReportHandler | None = None) -> None:
    """Ask ``peer`` to commit to storing the instances ``(SOP class, SOP instance UID)``
    (N-ACTION-RQ, Storage Commitment Push Model, action type 1).

    The answer comes later as an N-EVENT-REPORT: most PACS open a new association to
    our listener for it; one sent on this association while it is open goes to
    ``on_report``.

    Raises
    ------
    ConnectionError
        The peer cannot be reached or refused the association.
    CommitmentRefused
        It does not support the SOP class, did not answer, or refused the request.
    """
    ae = _client_ae(peer)
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, _report_handler(on_report))] if on_report else []
    assoc, context = peer.associate(ae, handlers)
    if not assoc.is_established:
        raise ConnectionError(_refusal(peer, assoc, context))
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        if not any(cx.abstract_syntax == StorageCommitmentPushModel
                   for cx in assoc.accepted_contexts):
            raise CommitmentRefused(f"{where} does not accept Storage Commitment Push Model")
        status, _reply = assoc.send_n_action(
            _commitment_request(transaction_uid, references), 1,
            StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status:
        raise CommitmentRefused(f"no answer to the Storage Commitment request from {where}")
    code = int(status.Status)
    if code_to_category(code) not in (STATUS_SUCCESS, STATUS_WARNING):
        raise CommitmentRefused(f"Storage Commitment request refused by {where}: "
                                f"status 0x{code:04X}")


def _commitment_request(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    request = Dataset()
    request.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    request.ReferencedSOPSequence = items
    return request


def _report_handler(on_report: ReportHandler) -> Callable[[Any], tuple[int, None]]:
    def handle(event: Any) -> tuple[int, None]:
        return on_report(int(event.request.EventTypeID), event.event_information,
                         str(event.assoc.acceptor.ae_title).strip()), None
    return handle
