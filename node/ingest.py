"""The receive path: parse -> validate -> store (fsync) -> index (commit) -> answer.

Independent of the network layer so that it can be driven by the SCP, by tests, and
later by DICOMweb STOW. Success is returned only when the file is durable on disk and
its row is committed; any failure to make the instance safe answers *Out of
Resources* so the sender keeps it and retries.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydicom.uid import UID
from sqlalchemy.exc import SQLAlchemyError

from db.models import utcnow
from node.audit import AssociationLog
from node.header import HeaderError, InstanceHeader, extract_header, parse_header
from node.index import InstanceIndex
from node.status import StoreStatus
from node.storage import (
    InstanceStore,
    StagedFile,
    StagingWriter,
    StorageError,
    file_meta_bytes,
)

log = logging.getLogger(__name__)

# Error Comment (0000,0902) is LO: at most 64 characters.
_COMMENT_MAX = 64


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """What a C-STORE request says, before its dataset arrives."""

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae: str = ""
    association_id: int | None = None


@dataclass(frozen=True, slots=True)
class StoreResult:
    status: StoreStatus
    comment: str = ""
    duplicate: bool = False

    @property
    def error_comment(self) -> str:
        return self.comment[:_COMMENT_MAX]


class Ingestor:
    """Makes received instances safe and indexed."""

    def __init__(
        self,
        store: InstanceStore,
        index: InstanceIndex,
        audit: AssociationLog | None = None,
        workers: int = 64,
    ) -> None:
        self.store = store
        self.index = index
        self.audit = audit
        # Each request may hold two workers, one waiting for the other: ``workers``
        # must be at least twice the number of concurrent associations.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")

    def begin(self, request: StoreRequest) -> Incoming:
        """Start receiving an instance; its file is written as its fragments arrive."""
        for keyword, uid in (("SOPClassUID", request.sop_class_uid),
                             ("SOPInstanceUID", request.sop_instance_uid)):
            if not UID(uid).is_valid:
                refusal = StoreResult(
                    StoreStatus.INVALID_UID, f"{keyword} is not a valid DICOM UID: {uid[:40]!r}"
                )
                return Incoming(self, request, None, refusal)
        # The file needs nothing from the header (its meta comes from the request), so
        # it is written while the dataset arrives and fsync'ed while it is parsed.
        writer = self.store.open_staging()
        writer.write(
            file_meta_bytes(
                request.sop_class_uid,
                request.sop_instance_uid,
                request.transfer_syntax,
                request.calling_ae,
            )
        )
        return Incoming(self, request, writer, None)

    def receive(self, request: StoreRequest, dataset: bytes | memoryview) -> StoreResult:
        """Store an instance whose whole dataset has arrived."""
        incoming = self.begin(request)
        incoming.write(dataset)
        return incoming.finish()

    def _finish(self, incoming: Incoming) -> StoreResult:
        request = incoming.request
        result = incoming.refusal or self._store(incoming)
        if result.status.is_failure:
            log.warning(
                "refused instance %s from %r: 0x%04X %s",
                request.sop_instance_uid,
                request.calling_ae,
                result.status,
                result.comment,
            )
        if request.association_id is not None and (result.duplicate or result.status.is_failure):
            self._count(request.association_id, result)
        return result

    def _store(self, incoming: Incoming) -> StoreResult:
        assert incoming.writer is not None
        dataset = incoming.dataset()
        size = incoming.writer.size
        staging = self._pool.submit(incoming.writer.seal)
        try:
            return self._index(incoming.request, dataset, staging, size)
        finally:
            self._tidy(staging)

    def _index(
        self, request: StoreRequest, dataset: bytes, staging: Future[StagedFile], size: int
    ) -> StoreResult:
        try:
            header = extract_header(parse_header(dataset, request.transfer_syntax))
        except HeaderError as exc:
            return StoreResult(exc.status, exc.reason)
        mismatch = _mismatch(header, request)
        if mismatch:
            return StoreResult(StoreStatus.DATASET_MISMATCH, mismatch)
        relative = self.store.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        # Linking the file into place and its folder's fsync run in a worker while the
        # rows are written and committed; Success waits for both. A crash between the
        # commit and the link leaves a row without its file for an instance that was
        # never acknowledged: the sender's retry restores the file (see _duplicate),
        # and the next start removes such rows (InstanceIndex.drop_unfiled).
        placing = self._pool.submit(self._place, staging, relative)
        try:
            new = self.index.record(
                header,
                relative.as_posix(),
                size,
                request.transfer_syntax,
                request.association_id,
                utcnow(),
            )
        except SQLAlchemyError as exc:
            if _succeeded(placing):
                self.store.remove(relative)  # no row was committed for it
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"database failed: {_short(exc)}")
        if not new:
            return self._duplicate(placing, relative)
        try:
            if not placing.result():
                # A file without a row, left by a crash between placing and commit:
                # the sender is resending the instance, and our copy replaces it.
                self.store.publish(staging.result(), relative)
        except StorageError as exc:
            self._unrecord(header.sop_instance_uid, request.association_id)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}")
        return StoreResult(StoreStatus.SUCCESS)

    def _unrecord(self, sop_instance_uid: str, association_id: int | None) -> None:
        """Take back the row of an instance whose file could not be made safe."""
        try:
            self.index.forget(sop_instance_uid, association_id)
        except SQLAlchemyError:
            # The row stays without its file; a resend restores the file, and a row of
            # an unacknowledged instance is what the operator sees in the log.
            log.exception("could not remove the row of unsaved instance %s", sop_instance_uid)

    def _place(self, staging: Future[StagedFile], relative: PurePosixPath) -> bool:
        return self.store.place(staging.result(), relative)

    def _duplicate(self, placing: Future[bool], relative: PurePosixPath) -> StoreResult:
        """The instance is indexed already: keep its file (placing never replaces one),
        or, if the file had gone missing, the copy just placed."""
        try:
            if _succeeded(placing):
                log.warning("restored the missing file of indexed instance %s", relative.name)
            else:
                # The file may have been linked a moment ago by a concurrent association
                # that has not answered yet: make its folder entry durable before we do.
                self.store.sync_folder(relative)
        except StorageError as exc:
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}")
        return StoreResult(StoreStatus.SUCCESS, "duplicate", duplicate=True)

    def _tidy(self, staging: Future[StagedFile]) -> None:
        """Drop the staged copy unless it was filed (then its name is gone anyway)."""
        try:
            self.store.discard(staging.result())
        except StorageError:
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _count(self, association_id: int, result: StoreResult) -> None:
        if self.audit is None:
            return
        try:
            self.audit.count(
                association_id, duplicate=result.duplicate, failed=result.status.is_failure
            )
        except SQLAlchemyError:
            log.exception("could not count a refused instance on association %s", association_id)


class Incoming:
    """One instance being received (see :meth:`Ingestor.begin`)."""

    def __init__(
        self,
        ingestor: Ingestor,
        request: StoreRequest,
        writer: StagingWriter | None,
        refusal: StoreResult | None,
    ) -> None:
        self.ingestor = ingestor
        self.request = request
        self.writer = writer
        self.refusal = refusal
        self._fragments: list[bytes | memoryview] = []

    def write(self, fragment: bytes | memoryview) -> None:
        """Take the next piece of the encoded dataset."""
        self._fragments.append(fragment)
        if self.writer is not None:
            self.writer.write(fragment)

    def dataset(self) -> bytes:
        data = b"".join(self._fragments)
        self._fragments = [data]
        return data

    def finish(self) -> StoreResult:
        """The dataset is complete: make it safe and indexed, or refuse it."""
        return self.ingestor._finish(self)

    def abort(self) -> None:
        """The association ended mid-instance: nothing was acknowledged, drop it."""
        if self.writer is not None:
            self.writer.discard()


def _mismatch(header: InstanceHeader, request: StoreRequest) -> str:
    if request.sop_instance_uid and header.sop_instance_uid != request.sop_instance_uid:
        return "SOPInstanceUID differs from the C-STORE request's"
    if request.sop_class_uid and header.sop_class_uid != request.sop_class_uid:
        return "SOPClassUID differs from the C-STORE request's"
    return ""


def _succeeded(future: Future[bool]) -> bool:
    try:
        return future.result()
    except StorageError:
        return False


def _short(exc: SQLAlchemyError) -> str:
    original = getattr(exc, "orig", None)
    return str(original or exc).splitlines()[0]
