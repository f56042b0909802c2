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

from sqlalchemy.exc import SQLAlchemyError

from db.models import utcnow
from node.audit import AssociationLog
from node.header import HeaderError, InstanceHeader, extract_header, parse_header
from node.index import InstanceIndex
from node.status import StoreStatus
from node.storage import InstanceStore, StagedFile, StorageError, file_meta_bytes

log = logging.getLogger(__name__)

# Error Comment (0000,0902) is LO: at most 64 characters.
_COMMENT_MAX = 64


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One instance as received: its dataset bytes in the negotiated transfer syntax."""

    dataset: bytes | memoryview
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
    file_path: str | None = None

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
        workers: int = 8,
    ) -> None:
        self.store = store
        self.index = index
        self.audit = audit
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")

    def receive(self, request: StoreRequest) -> StoreResult:
        result = self._receive(request)
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

    def _receive(self, request: StoreRequest) -> StoreResult:
        try:
            header = extract_header(parse_header(bytes(request.dataset), request.transfer_syntax))
        except HeaderError as exc:
            return StoreResult(exc.status, exc.reason)
        mismatch = _mismatch(header, request)
        if mismatch:
            return StoreResult(StoreStatus.DATASET_MISMATCH, mismatch)

        relative = self.store.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        parts = [
            file_meta_bytes(
                header.sop_class_uid,
                header.sop_instance_uid,
                request.transfer_syntax,
                request.calling_ae,
            ),
            request.dataset,
        ]
        # The file is written, fsync'ed and placed by a worker while this thread
        # writes the rows; they are committed only once the file is in place.
        writing = self._pool.submit(self.store.write, relative, parts)

        def make_durable() -> None:
            written = writing.result()
            if not written.placed:
                # A file without a row: left by a crash between placing and commit.
                # The sender is resending it; ours replaces it.
                self.store.publish(written)

        try:
            new = self.index.record(
                header,
                relative.as_posix(),
                sum(len(part) for part in parts),
                request.transfer_syntax,
                request.association_id,
                utcnow(),
                make_durable,
            )
        except StorageError as exc:
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}")
        except SQLAlchemyError as exc:
            self._drop(writing)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"database failed: {_short(exc)}")
        if new:
            return StoreResult(StoreStatus.SUCCESS, "", False, relative.as_posix())
        return self._duplicate(writing, relative)

    def _duplicate(self, writing: Future[StagedFile], relative: PurePosixPath) -> StoreResult:
        """The instance is indexed already: keep the stored file (or, if it had gone
        missing, the copy just placed)."""
        try:
            written = writing.result()
        except StorageError as exc:
            if not self.store.exists(relative):
                return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}")
        else:
            if written.placed:
                log.warning("restored the missing file of indexed instance %s", relative.name)
            else:
                self.store.discard(written)
        return StoreResult(StoreStatus.SUCCESS, "duplicate", True, relative.as_posix())

    def _drop(self, writing: Future[StagedFile]) -> None:
        """Undo the file side of an instance whose rows were not committed."""
        try:
            written = writing.result()
        except StorageError:
            return
        if written.placed:
            self.store.remove(written.relative)
        else:
            self.store.discard(written)  # no-op if make_durable already published it

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


def _mismatch(header: InstanceHeader, request: StoreRequest) -> str:
    if request.sop_instance_uid and header.sop_instance_uid != request.sop_instance_uid:
        return "SOPInstanceUID differs from the C-STORE request's"
    if request.sop_class_uid and header.sop_class_uid != request.sop_class_uid:
        return "SOPClassUID differs from the C-STORE request's"
    return ""


def _short(exc: SQLAlchemyError) -> str:
    original = getattr(exc, "orig", None)
    return str(original or exc).splitlines()[0]
