"""Read the attributes the node indexes from a received dataset.

The SCP receives the dataset encoded in the negotiated transfer syntax. We keep those
bytes as they are (the stored file is byte-exact) and only read it here: pydicom keeps
element values raw until asked, and only the indexed ones are converted.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from node.dicom.status import StoreStatus

_UNDEFINED_LENGTH = 0xFFFFFFFF


class HeaderError(Exception):
    """A received dataset the node cannot accept; carries the DIMSE status to answer."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The identifying and descriptive attributes of one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    instance_number: int | None


_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
)
# Only these are converted from raw bytes: this runs once per received instance.
_TAG_OF = {keyword: tag_for_keyword(keyword) for keyword in _KEYWORDS}
_VR_OF = {keyword: dictionary_VR(tag) for keyword, tag in _TAG_OF.items()}
_ASCII_VRS = frozenset({"UI", "CS", "DA", "TM", "IS", "DS"})


#: Inflated in pieces of this size, so a deflate bomb costs at most the limit.
_INFLATE_STEP = 1 << 20
#: Values longer than this are skipped by seek, not read, when a whole stored dataset is
#: checked: the check needs the element structure, not the pixels.
DEFER_SIZE = 1 << 16


def inflate(source: BinaryIO, target: BinaryIO, max_size: int) -> None:
    """Undo the deflate encoding of a dataset (Deflated Explicit VR Little Endian and
    the JPIP Referenced Deflate syntaxes: a raw deflate stream) from ``source`` into
    ``target``, 1 MiB at a time in and out.

    Raises
    ------
    HeaderError
        *Out of resources* when the inflated dataset exceeds ``max_size`` bytes (the
        stream is not inflated further: a 1 MB "bomb" must not take gigabytes), *cannot
        understand* when ``source`` is no deflate stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    try:
        while not inflater.eof and (pending := source.read(_INFLATE_STEP)):
            while pending and not inflater.eof:
                written += target.write(inflater.decompress(pending, _INFLATE_STEP))
                pending = inflater.unconsumed_tail
                _check_inflated(written, max_size)
        written += target.write(inflater.flush())
    except zlib.error as exc:
        raise HeaderError(
            StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}"
        ) from exc
    _check_inflated(written, max_size)


def _check_inflated(written: int, max_size: int) -> None:
    if written > max_size:
        raise HeaderError(StoreStatus.OUT_OF_RESOURCES, too_large_comment(max_size, "inflated "))


def too_large_comment(max_size: int, what: str = "") -> str:
    """The Error Comment of a refusal by size (at most 64 characters)."""
    return f"{what}dataset over node.max_instance_mb ({max_size >> 20} MiB)"


def parse_stored(
    fp: BinaryIO, transfer_syntax: str, max_size: int, scratch: Callable[[], BinaryIO]
) -> Dataset:
    """Parse the whole dataset's element structure (Pixel Data included) from ``fp``'s
    position to the end of its file; values stay raw until read, and those over
    :data:`DEFER_SIZE` are not read at all.

    A garbled or truncated encoding (including short Pixel Data) fails here. A deflated
    dataset is inflated into ``scratch()`` (a file, closed afterwards), at most
    ``max_size`` bytes of it.

    pydicom reads the items of an undefined-length sequence without ``defer_size``
    (its ``read_sequence`` does not pass it on): values inside those are read into
    memory, bounded by the dataset's size, i.e. node.max_instance_mb.

    Raises
    ------
    HeaderError
        With status *cannot understand* when the bytes are not a DICOM dataset, *out
        of resources* when a deflated one inflates beyond ``max_size`` bytes.
    OSError
        When reading the file, or writing the inflated copy, fails (errno set).
    """
    ts = UID(transfer_syntax)
    if not ts.is_deflated:
        return _parse_file(fp, ts)
    with scratch() as inflated:
        inflate(fp, inflated, max_size)
        inflated.seek(0)
        return _parse_file(inflated, ts)


def _parse_file(fp: BinaryIO, ts: UID) -> Dataset:
    start = fp.tell()
    end = os.fstat(fp.fileno()).st_size
    try:
        dataset = read_dataset(fp, is_implicit_VR=ts.is_implicit_VR,
                               is_little_endian=ts.is_little_endian, defer_size=DEFER_SIZE)
    except Exception as exc:  # pydicom raises many types on garbage input
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk failed, not the data (pydicom's own OSErrors have no errno)
        raise HeaderError(
            StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}"
        ) from exc
    _check_lengths(dataset)
    # A deferred value is skipped by seek, which goes past the end of a short file
    # without complaint: the position after the last element tells.
    stopped = fp.tell()
    if stopped > end:
        raise HeaderError(StoreStatus.CANNOT_UNDERSTAND,
                          f"dataset is truncated ({end - start} of {stopped - start} bytes)")
    if stopped < end:
        # pydicom only warns when an undefined-length value (encapsulated Pixel Data)
        # has no delimiter before the end, and leaves the rest unread.
        raise HeaderError(StoreStatus.CANNOT_UNDERSTAND,
                          f"dataset cannot be parsed past byte {stopped - start}")
    return dataset


#: Tags from here on (Pixel Data and its kin) come after every attribute we index.
_PIXEL_GROUP = 0x7FE00000


def parse_prefix(
    raw: bytes | bytearray | memoryview, transfer_syntax: str
) -> tuple[Dataset, int] | None:
    """Parse the elements before Pixel Data from the first bytes of a dataset.

    Returns the dataset (values raw) and the size the whole dataset will have if Pixel
    Data is its last element with a defined length (else ``-1``); ``None`` while the
    bytes do not yet reach Pixel Data, or for a syntax that needs the whole stream
    (deflate). Nothing is refused here: :func:`parse_dataset` on the whole dataset does
    that, so a prefix that does not parse just means "wait".
    """
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        return None
    buffer = BytesIO(raw)
    ends: list[int] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag < _PIXEL_GROUP:
            return False
        ends.append(-1 if length == _UNDEFINED_LENGTH else buffer.tell() + length)
        return True

    try:
        dataset = read_dataset(buffer, is_implicit_VR=ts.is_implicit_VR,
                               is_little_endian=ts.is_little_endian, stop_when=at_pixels)
        _check_lengths(dataset)
    except Exception:  # incomplete or garbled: the whole dataset will tell
        return None
    if not ends:
        return None
    return dataset, ends[0]


def _check_lengths(dataset: Dataset) -> None:
    """Refuse a dataset whose top-level element runs past the end of the data.

    pydicom hands back a short value without complaint when the bytes end early;
    values stay raw (unconverted) here, so this costs one comparison per element.
    """
    for tag in dataset.keys():
        # keep_deferred: a value over DEFER_SIZE is not read (it is None here).
        elem = dataset.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
            if elem.value is not None and len(elem.value) != elem.length:
                raise HeaderError(
                    StoreStatus.CANNOT_UNDERSTAND,
                    f"element {elem.tag} is truncated ({len(elem.value)} of {elem.length} bytes)",
                )


def _value(dataset: Dataset, keyword: str) -> object:
    tag = _TAG_OF[keyword]
    raw = dataset.get_item(tag, keep_deferred=True)
    if raw is None:
        return None
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
        # Deferred by parse_stored: no attribute the node indexes is this long.
        raise HeaderError(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is over {DEFER_SIZE} bytes")
    try:
        if (
            isinstance(raw, RawDataElement)
            and _VR_OF[keyword] in _ASCII_VRS
            and raw.value is not None
        ):
            # These VRs are plain ASCII whatever the character set: skipping pydicom's
            # conversion halves the cost of reading the header.
            return raw.value.decode("ascii", "replace").strip("\x00 ")
        return dataset[tag].value
    except Exception as exc:  # a malformed value
        # pydicom's message may quote the value (a patient's name): name the error only,
        # since this text goes to the log and back to the sender as the Error Comment.
        raise HeaderError(
            StoreStatus.CANNOT_UNDERSTAND, f"{keyword} cannot be read ({type(exc).__name__})"
        ) from exc


def _text(dataset: Dataset, keyword: str) -> str:
    value = _value(dataset, keyword)
    return "" if value is None else str(value).strip()


def _integer(dataset: Dataset, keyword: str) -> int | None:
    value = _value(dataset, keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _uid(dataset: Dataset, keyword: str) -> str:
    value = _text(dataset, keyword)
    if not value:
        raise HeaderError(StoreStatus.MISSING_ATTRIBUTE, f"{keyword} is missing or empty")
    if not UID(value).is_valid:
        raise HeaderError(
            StoreStatus.INVALID_UID, f"{keyword} is not a valid DICOM UID: {value[:70]!r}"
        )
    return value


def extract_header(dataset: Dataset) -> InstanceHeader:
    """Validate the UIDs the node files instances under and collect key attributes.

    A UID that is not a valid DICOM UID (only digits and dots, no empty or leading-zero
    components, at most 64 characters) is refused: UIDs become path components on
    disk, so this check is also what keeps writes inside ``storage.data_dir``.
    """
    return InstanceHeader(
        sop_class_uid=_uid(dataset, "SOPClassUID"),
        sop_instance_uid=_uid(dataset, "SOPInstanceUID"),
        study_instance_uid=_uid(dataset, "StudyInstanceUID"),
        series_instance_uid=_uid(dataset, "SeriesInstanceUID"),
        patient_id=_text(dataset, "PatientID"),
        issuer_of_patient_id=_text(dataset, "IssuerOfPatientID"),
        patient_name=_text(dataset, "PatientName"),
        patient_birth_date=_text(dataset, "PatientBirthDate"),
        patient_sex=_text(dataset, "PatientSex"),
        study_date=_text(dataset, "StudyDate"),
        study_time=_text(dataset, "StudyTime"),
        accession_number=_text(dataset, "AccessionNumber"),
        study_description=_text(dataset, "StudyDescription"),
        modality=_text(dataset, "Modality"),
        series_number=_integer(dataset, "SeriesNumber"),
        series_description=_text(dataset, "SeriesDescription"),
        body_part_examined=_text(dataset, "BodyPartExamined"),
        instance_number=_integer(dataset, "InstanceNumber"),
    )
