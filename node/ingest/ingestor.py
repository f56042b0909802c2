"""The receive path: parse -> validate -> store (fsync) -> index (commit) -> answer.

Independent of the network layer so that it can be driven by the SCP, by tests, and
later by DICOMweb STOW. Success is returned only when the file is durable on disk and
its row is committed; any failure to make the instance safe answers *Out of
Resources* so the sender keeps it and retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy.exc import SQLAlchemyError

from db.tables import utcnow
from node import metrics
from node.dicom.status import StoreStatus
from node.ingest.associations import AssociationLog
from node.ingest.header import (
    HeaderError,
    InstanceHeader,
    extract_header,
    parse_prefix,
    parse_stored,
    too_large_comment,
)
from node.ingest.index import InstanceIndex
from node.ingest.storage import (
    StagedFile,
    StagingWriter,
    Storage,
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
        store: Storage,
        index: InstanceIndex,
        audit: AssociationLog | None = None,
        workers: int = 64,
        max_instance_bytes: int = 4096 << 20,
    ) -> None:
        self.store = store
        # node.max_instance_mb: the largest dataset (inflated, for deflate) accepted.
        self.max_instance_bytes = max_instance_bytes
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
        metrics.stored(result.status.name, time.monotonic() - incoming.began)
        return result

    def _store(self, incoming: Incoming) -> StoreResult:
        assert incoming.writer is not None
        if incoming.early is not None:
            return self._store_early(incoming, incoming.early)
        size = incoming.writer.size
        # The fsync runs in a worker while the file is parsed through a second handle.
        staging = self._pool.submit(incoming.writer.seal)
        try:
            return self._index(incoming, staging, size)
        finally:
            self._tidy(staging)

    def _parse(self, incoming: Incoming) -> Dataset:
        """Check the whole dataset, read back from its staging file (values over
        DEFER_SIZE skipped by seek): memory stays bounded whatever the instance's size.

        Raises
        ------
        HeaderError
            The refusal; *out of resources* ("storage failed") when a write to the
            staging file failed (disk full) or reading it back, or inflating it, fails.
        """
        assert incoming.writer is not None
        request = incoming.request
        try:
            with incoming.writer.reader(incoming.meta_size) as reader:
                return parse_stored(reader, request.transfer_syntax, self.max_instance_bytes,
                                    self.store.scratch)
        except OSError as exc:  # StorageError included; HeaderError is no OSError
            raise HeaderError(
                StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}"
            ) from exc

    def _index(self, incoming: Incoming, staging: Future[StagedFile], size: int) -> StoreResult:
        request = incoming.request
        try:
            header = extract_header(self._parse(incoming))
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
        except (SQLAlchemyError, HeaderError) as exc:
            if _succeeded(placing):
                self.store.remove(relative)  # no row was committed for it
            if isinstance(exc, HeaderError):  # it contradicts the index (IdentityConflict)
                return StoreResult(exc.status, exc.reason)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"database failed: {_short(exc)}")
        if not new:
            return self._duplicate(placing, relative, lambda: self.index.record(
                header, relative.as_posix(), size, request.transfer_syntax,
                request.association_id, utcnow()))
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

    def _duplicate(self, placing: Future[bool], relative: PurePosixPath,
                   record_again: Callable[[], bool]) -> StoreResult:
        """The instance is indexed already: keep its file (placing never replaces one),
        or, if the file had gone missing, the copy just placed.

        The row found may be one that a concurrent association is taking back (its
        transfer aborted after it was indexed early, see :meth:`_take_back`), and that
        one removes the row only while no file is in place. So once our file is in
        place, the row is checked again and written anew if it went.
        """
        try:
            if _succeeded(placing):
                log.warning("restored the missing file of indexed instance %s", relative.name)
            else:
                # The file may have been linked a moment ago by a concurrent association
                # that has not answered yet: make its folder entry durable before we do.
                self.store.sync_folder(relative)
            if self.index.find(relative.stem) is None and record_again():
                return StoreResult(StoreStatus.SUCCESS)
        except StorageError as exc:
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}")
        except (SQLAlchemyError, HeaderError) as exc:
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"database failed: {exc}")
        return StoreResult(StoreStatus.SUCCESS, "duplicate", duplicate=True)

    # -- the early path: indexed while the pixels are still arriving ------------------

    def index_early(self, incoming: Incoming, header: InstanceHeader, size: int) -> Early:
        """Record the instance's row now, in a worker, while its dataset arrives.

        When the last fragment arrives only the file's fsync and link remain. The row
        exists before Success, as it does on the normal path when a crash falls between
        commit and link: if the instance is never completed the row is taken back
        (:meth:`Incoming.abort`, or :meth:`InstanceIndex.drop_unfiled` after a crash).
        """
        request = incoming.request
        relative = self.store.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        recording = self._pool.submit(
            self.index.record, header, relative.as_posix(), size, request.transfer_syntax,
            request.association_id, utcnow(),
        )
        return Early(header, relative, size, recording, time.monotonic())

    def _store_early(self, incoming: Incoming, early: Early) -> StoreResult:
        request, writer = incoming.request, incoming.writer
        assert writer is not None
        if writer.size != early.size:
            # Elements after Pixel Data, encapsulated (compressed) pixels, or a short
            # dataset: check the whole of it as the normal path does.
            try:
                self._parse(incoming)
            except HeaderError as exc:
                writer.discard()
                self._take_back(early, request.association_id)
                return StoreResult(exc.status, exc.reason)
        try:
            staged = writer.seal()
        except StorageError as exc:
            self._take_back(early, request.association_id)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}")
        try:
            new = early.recording.result()
        except HeaderError as exc:  # it contradicts the index (IdentityConflict)
            self.store.discard(staged)
            return StoreResult(exc.status, exc.reason)
        except SQLAlchemyError as exc:
            self.store.discard(staged)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"database failed: {_short(exc)}")
        placing: Future[bool] = Future()
        try:
            placing.set_result(self.store.place(staged, early.relative))
        except StorageError as exc:
            placing.set_exception(exc)
        if not new:
            self.store.discard(staged)
            return self._duplicate(placing, early.relative, lambda: self.index.record(
                early.header, early.relative.as_posix(), writer.size,
                request.transfer_syntax, request.association_id, utcnow()))
        try:
            if not placing.result():
                self.store.publish(staged, early.relative)  # see _index: a crash's leftover
        except StorageError as exc:
            self.store.discard(staged)
            self._unrecord(early.header.sop_instance_uid, request.association_id)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, f"storage failed: {exc.strerror}")
        if writer.size != early.size:
            self._correct_size(early.header.sop_instance_uid, writer.size)
        if time.monotonic() - early.started > _SLOW_TRANSFER_S:
            self._touch(early.header.study_instance_uid)
        return StoreResult(StoreStatus.SUCCESS)

    def _touch(self, study_instance_uid: str) -> None:
        """The row was committed when the transfer began; a long transfer may have let the
        study go quiet meanwhile, and be routed without this instance's file."""
        try:
            self.index.touch_study(study_instance_uid, utcnow())
        except SQLAlchemyError:
            # The instance is safe and indexed; only the study's clock is behind.
            log.exception("could not restart the quiet period of study %s", study_instance_uid)

    def _correct_size(self, sop_instance_uid: str, size: int) -> None:
        try:
            self.index.set_size(sop_instance_uid, size)
        except SQLAlchemyError:
            # The instance is safe and indexed; only its recorded size is off.
            log.exception("could not record the size of instance %s", sop_instance_uid)

    def _take_back(self, early: Early, association_id: int | None) -> None:
        """Remove an early row of an instance that was not completed and not filed."""
        try:
            new = early.recording.result()
        except (SQLAlchemyError, HeaderError):
            return
        # A concurrent association may have filed the same instance meanwhile: then the
        # row is rightly there.
        if new and not self.store.exists(early.relative):
            self._unrecord(early.header.sop_instance_uid, association_id)

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


@dataclass(frozen=True, slots=True)
class Early:
    """An instance indexed from its first fragments (see :meth:`Ingestor.index_early`)."""

    header: InstanceHeader
    relative: PurePosixPath
    size: int  # the file size the row records; -1 when unknown until the end
    recording: Future[bool]  # InstanceIndex.record: True when the row is new
    started: float  # time.monotonic() when the row was submitted


#: How far into a dataset the elements before Pixel Data are looked for.
_EARLY_LIMIT = 1 << 16
#: An instance indexed early whose transfer took longer than this touches its study
#: again when complete (one more commit, only for slow or very large instances).
_SLOW_TRANSFER_S = 1.0


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
        self.early: Early | None = None
        self.began = time.monotonic()  # for the C-STORE time histogram
        self._looking = writer is not None and refusal is None
        # Where the dataset starts in the staging file: after the file meta begin() wrote.
        self.meta_size = writer.size if writer is not None else 0
        # The dataset's first bytes (a copy: a fragment may be a view of a whole PDU),
        # kept only while the header is looked for; the rest is only in the file.
        self._prefix = bytearray()
        # Bytes still allowed before the dataset exceeds node.max_instance_mb.
        self._room = ingestor.max_instance_bytes

    def write(self, fragment: bytes | memoryview) -> None:
        """Take the next piece of the encoded dataset."""
        self._room -= len(fragment)
        if self._room < 0:
            self._refuse_size()
            return
        if self.writer is not None:
            self.writer.write(fragment)
            if self._looking:
                self._prefix += fragment[: _EARLY_LIMIT + 1 - len(self._prefix)]
                self._look_for_header()

    def _look_for_header(self) -> None:
        """Index the instance as soon as the elements before Pixel Data are here."""
        assert self.writer is not None
        found = parse_prefix(self._prefix, self.request.transfer_syntax)
        if found is None and len(self._prefix) <= _EARLY_LIMIT:
            return  # wait for more
        self._stop_looking()
        if found is None:
            return
        dataset, dataset_size = found
        try:
            header = extract_header(dataset)
        except HeaderError:
            return  # refused at the end, on the whole dataset, as always
        if _mismatch(header, self.request):
            return
        if not self.ingestor.index.knows_series(header.series_instance_uid):
            # A series' first instance creates its patient, study and series rows: those
            # wait for the whole instance, so an aborted one never leaves an empty study.
            return
        size = self.meta_size + dataset_size if dataset_size >= 0 else -1
        self.early = self.ingestor.index_early(self, header, size)

    def _stop_looking(self) -> None:
        self._looking = False
        self._prefix = bytearray()

    def _refuse_size(self) -> None:
        """Too large: drop what arrived (file, prefix, early row); the rest of the
        dataset is still read off the association and ignored, then refused."""
        if self.refusal is None:
            limit = self.ingestor.max_instance_bytes
            self.refusal = StoreResult(StoreStatus.OUT_OF_RESOURCES, too_large_comment(limit))
            self.abort()
            self.writer = None
            self.early = None
            self._stop_looking()

    def finish(self) -> StoreResult:
        """The dataset is complete: make it safe and indexed, or refuse it."""
        return self.ingestor._finish(self)

    def abort(self) -> None:
        """The association ended mid-instance: nothing was acknowledged, drop it."""
        if self.writer is not None:
            self.writer.discard()
        if self.early is not None:
            self.ingestor._take_back(self.early, self.request.association_id)


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
