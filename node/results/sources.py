"""Source images as highdicom accepts them: header copies with real scanners' gaps filled.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import DA, TM

log = logging.getLogger(__name__)


# Source images
# ---------------------------------------------------------------------------------------

# Type 2 attributes of the Patient and General Study modules, which highdicom reads from
# the first source image (as attributes, so an absent one raises) and copies into
# every instance it creates. Real scanners leave some of them out.
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Bulk data that the encoders never read; copying it would double the memory use.
_BULK_TAGS = frozenset({Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)})
_PATIENT_SEX_VALUES = frozenset({"M", "F", "O", ""})


def _header_copy(ds: Dataset) -> Dataset:
    """The public, non-bulk elements of ``ds`` in a new dataset.

    Deep, because highdicom puts the first source's Patient and Study elements into
    the objects it creates as they are, and the caller's datasets must never share
    an element with an output that is changed later. Elements still in their raw
    form (as read from a file) are immutable and shared as they are, which keeps
    the copy cheap and leaves the caller's dataset unconverted.
    """
    out = Dataset()
    for tag in ds.keys():
        if tag in _BULK_TAGS or tag.is_private:
            continue
        elem = ds.get_item(tag)
        out[tag] = elem if isinstance(elem, RawDataElement) else copy.deepcopy(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    return out


def prepare_sources(datasets: Sequence[Dataset], *,
                    one_frame_of_reference: bool = False) -> list[Dataset]:
    """Header copies of the source images that highdicom accepts.

    With ``one_frame_of_reference``, copies of a series whose slices carry different
    FrameOfReferenceUIDs (an anonymizer's doing; the caller has checked the geometry is
    one stack) all take the first slice's, the frame of reference the SEG declares.

    Returns one new dataset per input, in the same order, with:

    - the Type 2 Patient and General Study attributes highdicom needs present (empty
      when the source lacks them),
    - values highdicom would refuse replaced by empty ones (a Patient's Sex outside
      M/F/O, a Study Date or Time that is not a valid DA/TM, an empty Specific
      Character Set, which means the default repertoire),
    - no pixel data and no private elements (the encoders need the public
      identification and geometry, not the pixels or vendor data).

    The caller's datasets are never modified.

    Raises
    ------
    ValueError
        If ``datasets`` is empty.
    """
    if len(datasets) == 0:
        raise ValueError("prepare_sources needs at least one source dataset")
    prepared = []
    for ds in datasets:
        out = _header_copy(ds)
        for keyword in _TYPE2_SOURCE_ATTRIBUTES:
            if keyword not in out or out[keyword].value is None:
                setattr(out, keyword, "")
        sex = str(out.PatientSex or "").strip().upper()
        if sex not in _PATIENT_SEX_VALUES:
            # The value is patient data: the log names the attribute, not what it held.
            log.warning("source %s: Patient's Sex is not M/F/O; left empty",
                        ds.get("SOPInstanceUID"))
            sex = ""
        out.PatientSex = sex
        for keyword, parse in (("StudyDate", DA), ("StudyTime", TM)):
            value = str(out[keyword].value)
            if value:
                try:
                    parse(value)
                except ValueError:
                    log.warning("source %s: %s is not a valid %s; left empty",
                                ds.get("SOPInstanceUID"), keyword, parse.__name__)
                    setattr(out, keyword, "")
        if "SpecificCharacterSet" in out and not out.SpecificCharacterSet:
            del out.SpecificCharacterSet
        prepared.append(out)
    if one_frame_of_reference and len({str(ds.get("FrameOfReferenceUID", ""))
                                       for ds in prepared}) > 1:
        for out in prepared[1:]:
            out.FrameOfReferenceUID = prepared[0].FrameOfReferenceUID
    return prepared


def check_sources(sources: Sequence[Dataset]) -> None:
    """One series of single-frame images with the attributes a SEG needs."""
    if len(sources) == 0:
        raise ValueError("sources must contain at least one image")
    for index, ds in enumerate(sources):
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID",
                        "SeriesInstanceUID", "Rows", "Columns"):
            if keyword not in ds or ds[keyword].value in (None, ""):
                raise ValueError(f"sources[{index}] has no {keyword}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(
                f"sources[{index}] is a multi-frame image (NumberOfFrames "
                f"{ds.NumberOfFrames}); only single-frame series are supported"
            )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        values = {ds[keyword].value for ds in sources}
        if len(values) > 1:
            raise ValueError(f"sources must share one {keyword}, got {sorted(map(str, values))}")
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(uids)) != len(uids):
        raise ValueError("sources contain the same SOPInstanceUID more than once")
