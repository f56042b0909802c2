"""Durable storage of received instances as DICOM Part 10 files.

Layout: ``<data_dir>/studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. A file is
written under a temporary name, fsync'ed, renamed into place and its directory
fsync'ed, so that once :meth:`InstanceStore.write` returns the file survives a crash
or power loss, and a reader never sees a partial file.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path, PurePosixPath

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from node import __version__

# Our implementation class UID, under pydicom's root for implementations without one
# of their own, and a version name (SH, at most 16 characters).
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.10207.1")
IMPLEMENTATION_VERSION_NAME = f"PACSNODE_{__version__}"[:16]

_PREAMBLE = b"\x00" * 128 + b"DICM"


class StorageError(OSError):
    """The instance could not be made durable (disk full, permissions, I/O error)."""


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """Encode preamble, ``DICM`` prefix and File Meta Information (PS3.10 7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = BytesIO()
    buffer.write(_PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A fully written, fsync'ed temporary file waiting for its final name."""

    relative: PurePosixPath
    tmp: Path
    target: Path
    size: int
    #: True once it holds the final name (see :meth:`InstanceStore.place`).
    placed: bool = False


class InstanceStore:
    """Files instances under ``data_dir`` and never writes outside it."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.resolve()
        self._synced_dirs: set[Path] = set()
        self._lock = threading.Lock()

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> PurePosixPath:
        """Where an instance lives, relative to ``data_dir`` (UIDs must be validated)."""
        return PurePosixPath("studies", study_uid, series_uid, f"{sop_uid}.dcm")

    def absolute(self, relative: PurePosixPath | str) -> Path:
        path = (self.root / relative).resolve()
        # UIDs are validated before they get here; this is the second line of defence.
        if not path.is_relative_to(self.root):
            raise StorageError(errno.EACCES, f"refusing to write outside the data directory: {relative}")
        return path

    def exists(self, relative: PurePosixPath | str) -> bool:
        return self.absolute(relative).is_file()

    def write(self, relative: PurePosixPath, parts: list[bytes | memoryview]) -> StagedFile:
        """Write ``parts`` durably under ``relative`` unless a file is already there.

        The result tells whether the file was placed; if not, the fsync'ed copy waits
        under its temporary name for :meth:`publish` or :meth:`discard`.
        """
        return self.place(self.stage(relative, parts))

    def stage(self, relative: PurePosixPath, parts: list[bytes | memoryview]) -> StagedFile:
        """Write ``parts`` to a temporary file next to the target and fsync it.

        Nothing is visible under the final name until :meth:`publish`.
        """
        target = self.absolute(relative)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            self._ensure_dir(target.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                size = 0
                for part in parts:
                    view = memoryview(part)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                        size += written
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink_quietly(tmp)
            with self._lock:  # the folder may have been removed under us; re-check next time
                self._synced_dirs.discard(target.parent)
            raise _failed(relative, exc) from exc
        return StagedFile(relative, tmp, target, size)

    def place(self, staged: StagedFile) -> StagedFile:
        """Give a staged file its final name unless a file already holds it.

        Hard-linking never replaces an existing file, so this can run before the caller
        knows whether the instance is a duplicate. Returns the file with ``placed`` set
        when the name was free; otherwise the staged copy is left for the caller.
        """
        try:
            os.link(staged.tmp, staged.target)
        except FileExistsError:
            return staged
        except OSError as exc:
            _unlink_quietly(staged.tmp)
            raise _failed(staged.relative, exc) from exc
        _unlink_quietly(staged.tmp)
        try:
            _fsync_dir(staged.target.parent)
        except OSError as exc:
            _unlink_quietly(staged.target)
            raise _failed(staged.relative, exc) from exc
        return replace(staged, placed=True)

    def publish(self, staged: StagedFile) -> None:
        """Move a staged file to its final name, replacing any file there, durably."""
        try:
            os.replace(staged.tmp, staged.target)
            _fsync_dir(staged.target.parent)
        except OSError as exc:
            _unlink_quietly(staged.tmp)
            raise _failed(staged.relative, exc) from exc

    @staticmethod
    def discard(staged: StagedFile) -> None:
        """Drop a staged file that will not be published."""
        _unlink_quietly(staged.tmp)

    def remove(self, relative: PurePosixPath | str) -> None:
        _unlink_quietly(self.absolute(relative))

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
                path.mkdir()
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
