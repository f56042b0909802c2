"""Durable storage of received instances as DICOM Part 10 files.

Layout: ``<data_dir>/studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. A file is
written under a temporary name and fsync'ed, then linked into place and its folder
fsync'ed, so that once it is placed the file survives a crash or power loss, and a
reader never sees a partial file.

On a shared file system (NFS v3/v4, a ReadWriteMany volume) the same holds across hosts
when the server commits what it acknowledges (NFS export option ``sync``, the default;
never ``async``) and the clients mount ``hard``: fsync of a file sends an NFS COMMIT
and returns once the server has it on stable storage; link and rename are atomic
operations of the server, done before it answers; and close-to-open consistency lets
a worker on another host read a file whole once the receiver has closed it, which it
has before the database row that names the file commits.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.dicom.codec import file_meta_group

_PREAMBLE = b"\x00" * 128 + b"DICM"

# On Linux, POSIX_FADV_DONTNEED on dirty pages starts their writeback without waiting.
_START_WRITEBACK: int | None = getattr(os, "POSIX_FADV_DONTNEED", None)
_WRITEBACK_STEP = 128 * 1024


class StorageError(OSError):
    """The instance could not be made durable (disk full, permissions, I/O error)."""


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information (PS3.10 7.1)."""
    return _PREAMBLE + file_meta_group(
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax,
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
        source_ae,
    )


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A fully written, fsync'ed file in ``<data_dir>/incoming``, not yet filed."""

    tmp: Path
    size: int


class StagingWriter:
    """A temporary file written as an instance's fragments arrive.

    A write error is remembered, not raised: the sender's data must still be read off
    the association, and :meth:`seal` reports the error at the end.
    """

    def __init__(self, store: InstanceStore, tmp: Path) -> None:
        self.store = store
        self.tmp = tmp
        self.size = 0
        self._advised = 0  # bytes already handed to writeback
        self.error: OSError | None = None
        self._fd: int | None = None
        try:
            store._ensure_dir(tmp.parent)
            self._fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, store.file_mode)
            os.fchmod(self._fd, store.file_mode)  # exactly this, whatever the umask
        except OSError as exc:
            store._forget_dir(tmp.parent)
            self._fail(exc)

    def write(self, data: bytes | memoryview) -> None:
        if self._fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self.size += written
            if _START_WRITEBACK is not None and self.size - self._advised >= _WRITEBACK_STEP:
                # Start writing these pages to disk now, while the rest of the
                # instance is still arriving, so the final fsync has little left to do.
                # Per 128 KB, not per fragment: each call costs more than the write.
                os.posix_fadvise(self._fd, self._advised, self.size - self._advised,
                                 _START_WRITEBACK)
                self._advised = self.size
        except OSError as exc:
            self._fail(exc)

    def seal(self) -> StagedFile:
        """fsync and close; raises :class:`StorageError` if any write failed."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail(exc)
            else:
                os.close(self._fd)
                self._fd = None
        if self.error is not None:
            raise _failed(PurePosixPath(InstanceStore.INCOMING), self.error)
        return StagedFile(self.tmp, self.size)

    def reader(self, offset: int) -> BinaryIO:
        """The file as written so far, through a read-only handle of its own, from byte
        ``offset``: it can be read (from the page cache) while :meth:`seal` fsyncs.

        Raises
        ------
        StorageError
            If a write failed (the file is gone then) or the file cannot be opened.
        """
        if self.error is not None:
            raise _failed(PurePosixPath(InstanceStore.INCOMING), self.error)
        try:
            fp = open(self.tmp, "rb")  # the caller closes it
        except OSError as exc:
            raise _failed(PurePosixPath(InstanceStore.INCOMING), exc) from exc
        fp.seek(offset)
        return fp

    def discard(self) -> None:
        self._close()
        _unlink_quietly(self.tmp)

    def _fail(self, exc: OSError) -> None:
        self.error = self.error or exc
        self.discard()

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


class Storage(Protocol):
    """What the node needs of where instances and results are kept.

    :class:`InstanceStore` (a folder: a local disk, or a shared file system such as NFS
    or a Kubernetes ReadWriteMany volume mounted by every receiver and worker) is the
    one implementation; an object store would implement the same calls. The contract:

    - a *staged* copy is private to its writer and durable once sealed;
    - :meth:`place` and :meth:`publish` make it visible under its name atomically
      (never a partial file) and durably before they return; :meth:`place` never
      replaces an existing instance, so two receivers filing the same instance at once
      keep one;
    - :meth:`absolute` gives readers (analysis, delivery) a local path to open.
    """

    def relative_path(self, study_uid: str, series_uid: str,
                      sop_uid: str) -> PurePosixPath: ...

    def absolute(self, relative: PurePosixPath | str) -> Path: ...

    def exists(self, relative: PurePosixPath | str) -> bool: ...

    def open_staging(self) -> StagingWriter: ...

    def scratch(self) -> BinaryIO: ...

    def stage(self, parts: list[bytes | memoryview]) -> StagedFile: ...

    def place(self, staged: StagedFile, relative: PurePosixPath) -> bool: ...

    def publish(self, staged: StagedFile, relative: PurePosixPath) -> None: ...

    def sync_folder(self, relative: PurePosixPath) -> None: ...

    def discard(self, staged: StagedFile) -> None: ...

    def remove(self, relative: PurePosixPath | str) -> None: ...

    def clean_incoming(self, older_than_s: float = 3600.0) -> int: ...


class InstanceStore:
    """Files instances under ``data_dir`` and never writes outside it (:class:`Storage`
    on a folder).

    An instance is first *staged*: written and fsync'ed under a temporary name in
    ``<data_dir>/incoming`` (this needs nothing from the dataset's header, so it runs
    while the header is parsed and indexed). It is then *placed* under its final name
    by a hard link, which never replaces an existing file, and the folder is fsync'ed.
    """

    INCOMING = "incoming"

    def __init__(self, data_dir: Path, file_mode: int = 0o600, dir_mode: int = 0o700) -> None:
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.root = data_dir.resolve()
        self.incoming = self.root / self.INCOMING
        self._synced_dirs: set[Path] = set()
        self._lock = threading.Lock()

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> PurePosixPath:
        """Where an instance lives, relative to ``data_dir`` (UIDs must be validated)."""
        return PurePosixPath("studies", study_uid, series_uid, f"{sop_uid}.dcm")

    def absolute(self, relative: PurePosixPath | str) -> Path:
        path = (self.root / relative).resolve()
        # UIDs are validated before they get here; this is the second line of defence.
        if not path.is_relative_to(self.root) or path.is_relative_to(self.incoming):
            raise StorageError(
                errno.EACCES, f"refusing to write outside the data directory: {relative}"
            )
        return path

    def exists(self, relative: PurePosixPath | str) -> bool:
        return self.absolute(relative).is_file()

    def open_staging(self) -> StagingWriter:
        """Start a new temporary file in ``incoming``; write it piece by piece."""
        return StagingWriter(self, self.incoming / f"{os.getpid()}-{uuid.uuid4().hex}.tmp")

    def scratch(self) -> BinaryIO:
        """A new read-write file in ``incoming`` for a working copy (an inflated
        dataset): created ``file_mode`` (patient data), and unlinked at once, so that it
        is gone when closed, or when the process dies.

        Raises
        ------
        OSError
            If it cannot be created.
        """
        self._ensure_dir(self.incoming)
        path = self.incoming / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, self.file_mode)
        _unlink_quietly(path)
        try:
            os.fchmod(fd, self.file_mode)  # exactly this, whatever the umask
            return os.fdopen(fd, "w+b")
        except BaseException:
            os.close(fd)
            raise

    def stage(self, parts: list[bytes | memoryview]) -> StagedFile:
        """Write ``parts`` to a new temporary file and fsync it."""
        writer = self.open_staging()
        for part in parts:
            writer.write(part)
        return writer.seal()

    def place(self, staged: StagedFile, relative: PurePosixPath) -> bool:
        """File a staged copy under ``relative`` unless a file is there already.

        Returns ``True`` when placed (the staged name is then gone); ``False`` leaves
        the staged copy for :meth:`publish` or :meth:`discard`.
        """
        target = self.absolute(relative)
        try:
            self._ensure_dir(target.parent)
            os.link(staged.tmp, target)
        except FileExistsError:
            return False
        except OSError as exc:
            self._forget_dir(target.parent)
            raise _failed(relative, exc) from exc
        _unlink_quietly(staged.tmp)
        self._sync_new_entry(target, relative)
        return True

    def publish(self, staged: StagedFile, relative: PurePosixPath) -> None:
        """File a staged copy under ``relative``, replacing any file there."""
        target = self.absolute(relative)
        try:
            self._ensure_dir(target.parent)
            os.replace(staged.tmp, target)
        except OSError as exc:
            raise _failed(relative, exc) from exc
        self._sync_new_entry(target, relative)

    def sync_folder(self, relative: PurePosixPath) -> None:
        """fsync the folder of an existing file (its name is then durable)."""
        target = self.absolute(relative)
        if not target.is_file():
            raise StorageError(errno.ENOENT, f"{relative} is missing")
        try:
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _failed(relative, exc) from exc

    @staticmethod
    def discard(staged: StagedFile) -> None:
        """Drop a staged copy that will not be filed."""
        _unlink_quietly(staged.tmp)

    def remove(self, relative: PurePosixPath | str) -> None:
        _unlink_quietly(self.absolute(relative))

    def clean_incoming(self, older_than_s: float = 3600.0) -> int:
        """Remove staged copies abandoned by a crash; returns how many.

        Only old ones: another node process may share this folder and be writing.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for path in self.incoming.glob("*.tmp") if self.incoming.is_dir() else []:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def _sync_new_entry(self, target: Path, relative: PurePosixPath) -> None:
        try:
            _fsync_dir(target.parent)
        except OSError as exc:
            _unlink_quietly(target)
            raise _failed(relative, exc) from exc

    def _forget_dir(self, directory: Path) -> None:
        # The folder may have been removed under us; check it again next time.
        with self._lock:
            self._synced_dirs.discard(directory)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._synced_dirs:
            return
        # Create missing parents and fsync each new entry into its parent, so the
        # directory chain itself survives a crash.
        missing: list[Path] = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            try:
                path.mkdir(self.dir_mode)
                path.chmod(self.dir_mode)  # exactly this, whatever the umask
            except FileExistsError:
                pass
            _fsync_dir(path.parent)
        with self._lock:
            self._synced_dirs.add(directory)


def _failed(relative: PurePosixPath, exc: OSError) -> StorageError:
    return StorageError(exc.errno, f"cannot store {relative}: {exc.strerror or exc}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass
