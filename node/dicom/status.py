"""C-STORE response statuses the node answers with (PS3.4 Annex B.2.3)."""

from __future__ import annotations

import enum


class StoreStatus(enum.IntEnum):
    """Status codes of a C-STORE response.

    Every failure goes out with an Error Comment (0000,0902) saying why.
    """

    SUCCESS = 0x0000
    #: Storage or database could not keep the instance safe; the sender should retry.
    OUT_OF_RESOURCES = 0xA700
    #: The dataset's SOP Class/Instance UID differ from the C-STORE request's.
    DATASET_MISMATCH = 0xA900
    #: The bytes are not a parseable DICOM dataset.
    CANNOT_UNDERSTAND = 0xC000
    #: A required UID (Study, Series, SOP Instance, SOP Class) is absent or empty.
    MISSING_ATTRIBUTE = 0xC001
    #: A UID is not a valid DICOM UID (and would be unsafe as a file name).
    INVALID_UID = 0xC002
    #: The instance contradicts what the index holds: its series is in another study,
    #: or its study belongs to another patient (implementation-specific, "cannot
    #: understand" range).
    IDENTITY_CONFLICT = 0xC410

    @property
    def is_failure(self) -> bool:
        return self != StoreStatus.SUCCESS
