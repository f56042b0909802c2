"""Encode pipeline results as DICOM: a Segmentation and a TID 1500 Measurement Report.

The analysis side hands over numpy masks and :class:`analysis.types.SegmentMeasurement`
values; this module turns them into a BINARY DICOM Segmentation (one segment per
non-empty mask) and a Comprehensive 3D SR that references each segment, both in the
study of the source images, in new series, with the node as the creating device.

Everything DICOM is delegated to highdicom, which writes the modules, functional groups
and content tree; this module only decides the coded concepts, checks its inputs and
makes real-world source headers acceptable to highdicom.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pydicom.valuerep import DA, TM

from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, SegmentMeasurement
from node import __version__

log = logging.getLogger(__name__)

#: Manufacturer (0008,0070) of every instance the node creates.
MANUFACTURER = "pacsnode"
#: Manufacturer's Model Name (0008,1090) of every instance the node creates.
MODEL_NAME = "pacsnode"

# Value representation limits of the attributes the callers fill in.
_LO_MAX = 64
_AE_MAX = 16
_IS_MAX = 2**31 - 1


def _check_lo(value: str, attribute: str) -> str:
    """An LO value: at most 64 characters, no backslash or control characters."""
    if not isinstance(value, str):
        raise TypeError(f"{attribute} must be a str, got {type(value).__name__}")
    if len(value) > _LO_MAX:
        raise ValueError(
            f"{attribute} is {len(value)} characters long; at most {_LO_MAX} are allowed"
        )
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(
            f"{attribute} must not contain a backslash or control characters: {value!r}"
        )
    return value


def _check_is(value: int, attribute: str) -> int:
    """An IS value the node assigns: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{attribute} must be an int, got {type(value).__name__}")
    if not 1 <= int(value) <= _IS_MAX:
        raise ValueError(f"{attribute} must lie between 1 and {_IS_MAX}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------------
# Who creates the instances, and with which algorithm
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderIdentity:
    """The node as the device that creates SEG and SR instances.

    Goes into the General and Enhanced General Equipment modules of both objects and,
    as the device observer, into the SR's observation context.

    Attributes
    ----------
    ae_title
        The node's AE title; also the Device Observer Name in the SR.
    device_serial_number
        Device Serial Number (0018,1000), Type 1 in the Enhanced General Equipment
        module. Defaults to the AE title; set it to tell installations that share an
        AE title apart (it also changes :attr:`device_uid`).
    manufacturer, model_name, software_version
        Manufacturer, Manufacturer's Model Name and Software Versions.
    institution_name
        Institution Name (0008,0080) of the SR, if known.
    """

    ae_title: str
    device_serial_number: str = ""
    manufacturer: str = MANUFACTURER
    model_name: str = MODEL_NAME
    software_version: str = __version__
    institution_name: str | None = None

    def __post_init__(self) -> None:
        title = self.ae_title
        if not isinstance(title, str) or not title.strip():
            raise ValueError(f"ae_title must be a non-empty string, got {title!r}")
        if len(title) > _AE_MAX or "\\" in title or any(ord(c) < 32 for c in title):
            raise ValueError(
                f"ae_title must be at most {_AE_MAX} characters without backslash or "
                f"control characters, got {title!r}"
            )
        if not self.device_serial_number:
            object.__setattr__(self, "device_serial_number", title.strip())
        _check_lo(self.device_serial_number, "device_serial_number")
        _check_lo(self.manufacturer, "manufacturer")
        _check_lo(self.model_name, "model_name")
        _check_lo(self.software_version, "software_version")
        if self.institution_name is not None:
            _check_lo(self.institution_name, "institution_name")

    @property
    def device_observer_name(self) -> str:
        return self.ae_title.strip()

    @property
    def device_uid(self) -> str:
        """Device Observer UID: the same node always reports the same UID.

        Derived, not random, so that reports of one node can be grouped by device
        across restarts; the serial number is mixed in so that two sites that both
        keep the default AE title do not share a UID.
        """
        return str(
            generate_uid(
                entropy_srcs=[
                    self.manufacturer,
                    self.model_name,
                    self.ae_title.strip(),
                    self.device_serial_number,
                ]
            )
        )

    @classmethod
    def for_node(
        cls,
        ae_title: str,
        device_serial_number: str | None = None,
        institution_name: str | None = None,
    ) -> EncoderIdentity:
        """The identity of the node with AE title ``ae_title`` (pacsnode, this version)."""
        return cls(
            ae_title=ae_title,
            device_serial_number=device_serial_number or "",
            institution_name=institution_name,
        )

    def observer_context(self) -> hd.sr.ObserverContext:
        """The device observer context (TID 1004) for the SR."""
        return hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_uid,
                name=self.device_observer_name,
                manufacturer_name=self.manufacturer,
                model_name=self.model_name,
                serial_number=self.device_serial_number,
            ),
        )


class AlgorithmFamily(Enum):
    """Algorithm families of CID 7162 "Surface Processing Algorithm Families".

    The values name the concepts in :data:`pydicom.sr.codedict.codes.cid7162`.
    """

    ADAPTIVE_FILTERING = "AdaptiveFiltering"
    ARTIFICIAL_INTELLIGENCE = "ArtificialIntelligence"
    CLUSTER_ANALYSIS = "ClusterAnalysis"
    DEFORMABLE_MODELS = "DeformableModels"
    EDGE_DETECTION = "EdgeDetection"
    HISTOGRAM_ANALYSIS = "HistogramAnalysis"
    MANUAL_PROCESSING = "ManualProcessing"
    MORPHOLOGICAL_OPERATIONS = "MorphologicalOperations"
    MULTI_SCALE_RESOLUTION_FILTERING = "MultiScaleResolutionFiltering"
    MULTISPECTRAL_PROCESSING = "MultispectralProcessing"
    NEIGHBORHOOD_ANALYSIS = "NeighborhoodAnalysis"

    @property
    def code(self) -> Code:
        return getattr(codes.cid7162, self.value)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that made the masks and the measurements.

    Attributes
    ----------
    name, version
        Algorithm Name and Algorithm Version (LO).
    family
        Algorithm Family (CID 7162).
    source
        Algorithm Source (who made it), if not the node's manufacturer.
    parameters
        Algorithm Parameters as name -> value; written to the SEG as
        ``name=value`` pairs and to the SR as one text item each.
    """

    name: str
    version: str
    family: AlgorithmFamily = AlgorithmFamily.ARTIFICIAL_INTELLIGENCE
    source: str | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError("AlgorithmInfo.name must not be empty")
        if not self.version or not self.version.strip():
            raise ValueError("AlgorithmInfo.version must not be empty")
        _check_lo(self.name, "AlgorithmInfo.name")
        _check_lo(self.version, "AlgorithmInfo.version")
        if not isinstance(self.family, AlgorithmFamily):
            raise TypeError(
                f"AlgorithmInfo.family must be an AlgorithmFamily, got {self.family!r}"
            )
        if self.source is not None:
            _check_lo(self.source, "AlgorithmInfo.source")
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"AlgorithmInfo.parameters must map str to str, got {key!r}: {value!r}"
                )
        # Algorithm Parameters (0066,0032) is one LT value of all pairs.
        if len(",".join(self._pairs())) > 10240:
            raise ValueError("AlgorithmInfo.parameters exceed the 10240 characters of an LT")

    def _pairs(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.parameters.items()]

    def to_sequence(self) -> hd.AlgorithmIdentificationSequence:
        """Segment Algorithm Identification for the SEG."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=self.family.code,
            version=self.version,
            source=self.source,
            parameters=dict(self.parameters) or None,
        )

    def to_sr(self) -> hd.sr.AlgorithmIdentification:
        """Algorithm Identification (TID 4019) for the SR."""
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=self._pairs() or None,
        )


# ---------------------------------------------------------------------------------------
# What the segment labels mean
# ---------------------------------------------------------------------------------------


class UnknownStructureError(ValueError):
    """A segment label that the node has no coded meaning for."""


@dataclass(frozen=True)
class Structure:
    """The coded meaning of one segment label.

    Attributes
    ----------
    label
        The pipeline's segment label (``analysis.types``).
    display_label
        Segment Label (0062,0005) shown by viewers, and the SR tracking identifier.
    category, property_type
        Segmented Property Category (CID 7150) and Type; the type is also the SR
        finding type.
    finding_site, laterality
        The SR finding site: an anatomic location with an optional laterality.
        Lungs get the post-coordinated "Lung" + laterality here beside the
        pre-coordinated "Left lung" type, so that a query for either finds them.
    anatomic_region
        Anatomic Region Sequence (0008,2218) of the segment, if any.
    rgb
        Recommended display colour (stored as CIELab).
    """

    label: str
    display_label: str
    category: Code
    property_type: Code
    finding_site: Code
    laterality: Code | None = None
    anatomic_region: Code | None = None
    rgb: tuple[int, int, int] = (128, 128, 128)

    def segment_description(
        self,
        segment_number: int,
        algorithm: AlgorithmInfo,
        tracking_uid: str,
    ) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=segment_number,
            segment_label=self.display_label,
            segmented_property_category=self.category,
            segmented_property_type=self.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.to_sequence(),
            tracking_uid=tracking_uid,
            tracking_id=self.display_label,
            anatomic_regions=[self.anatomic_region] if self.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*self.rgb),
        )


# Left and right lung are pre-coordinated SNOMED CT concepts: "Left lung structure" and
# "Right lung structure" (neither is in a DICOM context group, CID 7151 is extensible).
_LEFT_LUNG = Code("44029006", "SCT", "Left lung")
_RIGHT_LUNG = Code("3341006", "SCT", "Right lung")

#: Segment label -> coded meaning, for every label a pipeline may produce.
STRUCTURES: Mapping[str, Structure] = MappingProxyType(
    {
        BODY: Structure(
            label=BODY,
            display_label="Body",
            category=codes.SCT.AnatomicalStructure,
            property_type=codes.SCT.EntireBody,
            finding_site=codes.SCT.EntireBody,
            rgb=(241, 214, 145),
        ),
        LUNG_LEFT: Structure(
            label=LUNG_LEFT,
            display_label="Left lung",
            category=codes.SCT.AnatomicalStructure,
            property_type=_LEFT_LUNG,
            finding_site=codes.SCT.Lung,
            laterality=codes.SCT.Left,
            anatomic_region=codes.SCT.Thorax,
            rgb=(216, 101, 79),
        ),
        LUNG_RIGHT: Structure(
            label=LUNG_RIGHT,
            display_label="Right lung",
            category=codes.SCT.AnatomicalStructure,
            property_type=_RIGHT_LUNG,
            finding_site=codes.SCT.Lung,
            laterality=codes.SCT.Right,
            anatomic_region=codes.SCT.Thorax,
            rgb=(128, 174, 218),
        ),
    }
)


#: Labels of users' own models, with the codes from their model cards.
_REGISTERED: dict[str, Structure] = {}


def register_structure(structure: Structure) -> Structure:
    """Add the coded meaning of a label a user's model produces.

    A built-in label keeps its meaning; registering it again with other codes is an
    error, so two models cannot disagree about what "lung_left" is.
    """
    known = STRUCTURES.get(structure.label) or _REGISTERED.get(structure.label)
    if known is not None and (known.category, known.property_type) != (
        structure.category, structure.property_type
    ):
        raise ValueError(
            f"segment label {structure.label!r} is already coded as "
            f"{known.property_type.meaning} ({known.property_type.value}); a model cannot "
            f"code it as {structure.property_type.meaning} ({structure.property_type.value})"
        )
    if known is None:
        _REGISTERED[structure.label] = structure
    return known or structure


def structure_for(label: str) -> Structure:
    """The coded meaning of a segment label; an unknown label raises."""
    try:
        return STRUCTURES[label]
    except (KeyError, TypeError):
        pass
    if isinstance(label, str) and label in _REGISTERED:
        return _REGISTERED[label]
    known = sorted({*STRUCTURES, *_REGISTERED})
    raise UnknownStructureError(
        f"no coded meaning for segment label {label!r}; known labels: "
        f"{', '.join(known)} (a model's card gives its labels' codes)"
    )


# ---------------------------------------------------------------------------------------
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


def prepare_sources(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Header copies of the source images that highdicom accepts.

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
            log.warning("source %s: Patient's Sex %r is not M/F/O; left empty",
                        ds.get("SOPInstanceUID"), out.PatientSex)
            sex = ""
        out.PatientSex = sex
        for keyword, parse in (("StudyDate", DA), ("StudyTime", TM)):
            value = str(out[keyword].value)
            if value:
                try:
                    parse(value)
                except ValueError:
                    log.warning("source %s: %s %r is not valid; left empty",
                                ds.get("SOPInstanceUID"), keyword, value)
                    setattr(out, keyword, "")
        if "SpecificCharacterSet" in out and not out.SpecificCharacterSet:
            del out.SpecificCharacterSet
        prepared.append(out)
    return prepared


def _check_sources(sources: Sequence[Dataset]) -> None:
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


# ---------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------


#: Transfer syntaxes a BINARY segmentation can be written in.
_SEG_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, JPEG2000Lossless)


def build_segmentation(
    sources: Sequence[Dataset],
    masks: Mapping[str, np.ndarray],
    *,
    algorithm: AlgorithmInfo,
    identity: EncoderIdentity,
    series_number: int,
    series_description: str,
    instance_number: int = 1,
    omit_empty_frames: bool = False,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> hd.seg.Segmentation:
    """A BINARY Segmentation of a single-frame image series.

    Parameters
    ----------
    sources
        The source images (headers suffice), in the order of the masks' first axis:
        ``masks[label][i]`` segments ``sources[i]``. The order need not be spatial.
    masks
        Segment label -> bool array ``(len(sources), Rows, Columns)``. Each non-empty
        mask becomes one segment, numbered from 1 in the mapping's order; empty masks
        are left out (a structure that was not found has no segment).
    algorithm
        The algorithm that produced the masks.
    identity
        The node as the creating device.
    series_number, series_description
        Series Number and Description of the new series.
    instance_number
        Instance Number of the SEG in that series.
    omit_empty_frames
        By default every segment has a frame for every source image, so that every
        source frame is referenced from the per-frame functional groups and the SEG
        has the geometry of the source series; True stores only frames that contain
        the segment (smaller; all sources are still referenced at the top level).
    transfer_syntax_uid
        Explicit VR Little Endian (default: bit-packed frames, which every viewer
        reads) or JPEG 2000 Lossless (about 25 times smaller, similar encoding time,
        but not every viewer decodes compressed BINARY segmentations).

    Returns
    -------
    highdicom.seg.Segmentation
        In the study of ``sources``, in a new series, with a new SOP Instance UID.

    Raises
    ------
    UnknownStructureError
        If a label has no entry in :data:`STRUCTURES`.
    ValueError, TypeError
        If a mask's shape or type does not match the sources, if every mask is
        empty, or if the sources are not one series of single-frame images.
    """
    series_number = _check_is(series_number, "series_number")
    instance_number = _check_is(instance_number, "instance_number")
    _check_lo(series_description, "series_description")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm must be an AlgorithmInfo, got {type(algorithm).__name__}")
    if not isinstance(identity, EncoderIdentity):
        raise TypeError(f"identity must be an EncoderIdentity, got {type(identity).__name__}")
    if UID(transfer_syntax_uid) not in _SEG_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax_uid {transfer_syntax_uid} is not one of "
            f"{', '.join(f'{uid} ({uid.name})' for uid in _SEG_TRANSFER_SYNTAXES)}"
        )
    prepared = prepare_sources(sources)
    _check_sources(prepared)
    if not masks:
        raise ValueError("masks is empty: there is nothing to encode")

    shape = (len(prepared), int(prepared[0].Rows), int(prepared[0].Columns))
    kept: list[tuple[Structure, np.ndarray]] = []
    for label, mask in masks.items():
        structure = structure_for(label)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"masks[{label!r}] must be a bool array, got dtype {mask.dtype}")
        if mask.shape != shape:
            raise ValueError(
                f"masks[{label!r}] has shape {mask.shape}; expected {shape} "
                "(len(sources), Rows, Columns)"
            )
        if mask.any():
            kept.append((structure, mask))
        else:
            log.info("segment %r is empty and left out of the SEG", label)
    if not kept:
        raise ValueError(
            f"every mask is empty ({', '.join(masks)}): a SEG needs at least one segment"
        )

    descriptions = [
        structure.segment_description(number, algorithm, tracking_uid=hd.UID())
        for number, (structure, _) in enumerate(kept, start=1)
    ]
    # Stacked-segments layout (frames, rows, columns, segments): segments may overlap
    # (the lungs lie inside the body), which a label map cannot express.
    pixel_array = np.stack([mask for _, mask in kept], axis=-1)

    seg = hd.seg.Segmentation(
        source_images=prepared,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        manufacturer_model_name=identity.model_name,
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        transfer_syntax_uid=transfer_syntax_uid,
        omit_empty_frames=omit_empty_frames,
        series_description=series_description,
        institution_name=identity.institution_name,
    )
    if seg.get("SeriesDescription") != series_description:
        seg.SeriesDescription = series_description
    return seg


# ---------------------------------------------------------------------------------------
# Measurement report
# ---------------------------------------------------------------------------------------

#: Units (UCUM) of the reported measurements.
UNIT_ML = Code("mL", "UCUM", "milliliter")
UNIT_HU = codes.UCUM.HounsfieldUnit
UNIT_MM2 = codes.UCUM.SquareMillimeter
UNIT_MM = codes.UCUM.Millimeter

# Measurement names from CID 7469 "Generic Intensity and Size Measurements", qualified
# by a CID 7464 derivation where the name alone is ambiguous (the TID 1419 pattern):
# intensity statistics are Attenuation Coefficient with derivation Mean or Standard
# Deviation. The surface area is IBSI "Surface Area of Mesh" because analysis/measure.py
# takes it on a marching-cubes mesh; the largest diameter is Diameter with derivation
# Maximum, not IBSI "Maximum 3D Diameter of a Mesh", because it is measured between
# voxel centres, not mesh vertices.
VOLUME = codes.SCT.Volume
ATTENUATION_COEFFICIENT = codes.DCM.AttenuationCoefficient
MEAN = codes.SCT.Mean
STANDARD_DEVIATION = codes.SCT.StandardDeviation
SURFACE_AREA = codes.IBSI.SurfaceAreaOfMesh
DIAMETER = codes.SCT.Diameter
MAXIMUM = codes.SCT.Maximum

#: Procedure Reported (TID 1500) for CT sources.
PROCEDURE_CT = codes.SCT.ComputedTomography

#: Dice agreement of the CNN's mask with the classical one. No standard code names
#: it; a private coding scheme (the 99 prefix, PS3.16 8.2) is the DICOM way to say so.
DICE_VS_CLASSICAL = Code("DICECNNCLASSIC", "99PACSNODE",
                         "Dice agreement of CNN and classical segmentation")
UNIT_RATIO = Code("1", "UCUM", "no units")
TARGET_REGION = codes.DCM.TargetRegion
PROBABILITY = codes.DCM.Probability
#: The predicted anatomical region of the series (CID 4031 Common Anatomic Regions).
REGION_CODES: Mapping[str, Code] = {
    "head": codes.cid4031.Head,
    "chest": codes.cid4031.Chest,
    "abdomen": codes.cid4031.Abdomen,
    "pelvis": codes.cid4031.Pelvis,
}


@dataclass(frozen=True)
class RegionFinding:
    """The region classifier's reading of the series, reported as a TID 1501 group."""

    label: str
    probability: float

    def __post_init__(self) -> None:
        if self.label not in REGION_CODES:
            raise ValueError(f"region label must be one of {sorted(REGION_CODES)}, "
                             f"got {self.label!r}")
        if not 0.0 <= float(self.probability) <= 1.0:
            raise ValueError(f"region probability must be in [0, 1], got {self.probability}")

    def group(self, algorithm: hd.sr.AlgorithmIdentification,
              source_series_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"Anatomic region of series {source_series_uid}"[:64]),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(
                name=PROBABILITY, value=float(self.probability), unit=UNIT_RATIO,
                algorithm_id=algorithm)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=TARGET_REGION, value=REGION_CODES[self.label])],
        )

_SEGMENTATION_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def _measurement_items(
    measurement: SegmentMeasurement,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[hd.sr.Measurement]:
    """TID 1419 measurements of one segment."""
    rows: list[tuple[str, Code, Code | None, Code]] = [
        ("volume_ml", VOLUME, None, UNIT_ML),
        ("mean_hu", ATTENUATION_COEFFICIENT, MEAN, UNIT_HU),
        ("std_hu", ATTENUATION_COEFFICIENT, STANDARD_DEVIATION, UNIT_HU),
        ("surface_area_mm2", SURFACE_AREA, None, UNIT_MM2),
        ("max_diameter_mm", DIAMETER, MAXIMUM, UNIT_MM),
    ]
    items = []
    for attribute, name, derivation, unit in rows:
        value = getattr(measurement, attribute)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"measurement {measurement.label!r}: {attribute} must be a number, got {value!r}"
            ) from None
        if not np.isfinite(value):
            raise ValueError(
                f"measurement {measurement.label!r}: {attribute} is {value}, not a finite number"
            )
        items.append(
            hd.sr.Measurement(
                name=name,
                value=value,
                unit=unit,
                derivation=derivation,
                algorithm_id=algorithm,
            )
        )
    return items


def _agreement_items(
    agreement: Mapping[str, float] | None, label: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[hd.sr.Measurement]:
    if not agreement or label not in agreement:
        return []
    value = float(agreement[label])
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"agreement of {label!r} must be a Dice coefficient in [0, 1], got {value}")
    return [hd.sr.Measurement(name=DICE_VS_CLASSICAL, value=value, unit=UNIT_RATIO,
                              algorithm_id=algorithm)]


def _segment_numbers_by_label(seg: Dataset) -> dict[str, tuple[int, Dataset]]:
    """Display label -> (segment number, segment item) of a SEG."""
    out: dict[str, tuple[int, Dataset]] = {}
    for item in seg.get("SegmentSequence", []):
        out[str(item.SegmentLabel)] = (int(item.SegmentNumber), item)
    return out


def build_measurement_report(
    seg: hd.seg.Segmentation,
    sources: Sequence[Dataset],
    measurements: Sequence[SegmentMeasurement],
    *,
    algorithm: AlgorithmInfo,
    identity: EncoderIdentity,
    series_number: int,
    series_description: str,
    instance_number: int = 1,
    qualitative: Mapping[str, Sequence[hd.sr.QualitativeEvaluation]] | None = None,
    agreement: Mapping[str, float] | None = None,
    region: RegionFinding | None = None,
    region_algorithm: AlgorithmInfo | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of the segments of ``seg``.

    One Volumetric ROI measurement group (TID 1411) per measured segment, which
    references the segment in ``seg`` and the source series, carries the segment's
    tracking identifier, its finding type and site, and volume, mean and standard
    deviation of attenuation, surface area and maximum diameter, each with the
    algorithm identification.

    Parameters
    ----------
    seg
        The Segmentation returned by :func:`build_segmentation` for ``sources``.
    sources
        The source images of ``seg`` (headers suffice); they are listed as evidence.
    measurements
        One per segment to report. A measurement of an empty structure
        (``voxels == 0``, which has no segment) is left out; any other measurement
        must match a segment of ``seg``.
    algorithm, identity
        The measuring algorithm and the node as the device observer.
    series_number, series_description, instance_number
        Of the new SR series and instance.
    qualitative
        Optional qualitative evaluations per segment label, added to its group.
    agreement
        Optional Dice agreement of the CNN's and the classical mask per segment
        label (a QA figure), added to its group as a measurement.
    region, region_algorithm
        Optional predicted anatomical region of the series with its probability, and
        the classifier that predicted it: one more group (TID 1501).

    Raises
    ------
    UnknownStructureError
        If a measurement's label has no entry in :data:`STRUCTURES`.
    ValueError
        If a measurement matches no segment of ``seg``, appears twice, has a value
        that is not finite, or if ``seg`` and ``sources`` do not belong together.
    """
    series_number = _check_is(series_number, "series_number")
    instance_number = _check_is(instance_number, "instance_number")
    _check_lo(series_description, "series_description")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm must be an AlgorithmInfo, got {type(algorithm).__name__}")
    if not isinstance(identity, EncoderIdentity):
        raise TypeError(f"identity must be an EncoderIdentity, got {type(identity).__name__}")
    for measurement in measurements:
        if not isinstance(measurement, SegmentMeasurement):
            raise TypeError(
                f"measurements must be SegmentMeasurement, got {type(measurement).__name__}"
            )
    prepared = prepare_sources(sources)
    _check_sources(prepared)
    if str(prepared[0].get("Modality", "")) != "CT":
        raise ValueError(
            f"sources have Modality {prepared[0].get('Modality')!r}; the report's "
            "attenuation values in HU need CT"
        )
    if seg.get("SOPClassUID") != _SEGMENTATION_SOP_CLASS_UID:
        raise ValueError(f"seg has SOPClassUID {seg.get('SOPClassUID')}, not Segmentation Storage")
    source_series_uid = str(prepared[0].SeriesInstanceUID)
    if seg.StudyInstanceUID != prepared[0].StudyInstanceUID:
        raise ValueError(
            f"seg StudyInstanceUID {seg.StudyInstanceUID} differs from the sources' "
            f"{prepared[0].StudyInstanceUID}"
        )
    referenced = {
        str(series.SeriesInstanceUID): {
            str(ref.ReferencedSOPInstanceUID)
            for ref in series.get("ReferencedInstanceSequence", [])
        }
        for series in seg.get("ReferencedSeriesSequence", [])
    }
    if source_series_uid not in referenced:
        raise ValueError(f"seg does not reference the source series {source_series_uid}")
    unreferenced = {str(ds.SOPInstanceUID) for ds in prepared} - referenced[source_series_uid]
    if unreferenced:
        raise ValueError(f"seg does not reference {len(unreferenced)} of the sources")

    qualitative = dict(qualitative or {})
    for label in qualitative:
        structure_for(label)
    segments = _segment_numbers_by_label(seg)
    sr_algorithm = algorithm.to_sr()
    groups = []
    seen: set[str] = set()
    reported: set[str] = set()
    for measurement in measurements:
        structure = structure_for(measurement.label)
        if measurement.label in seen:
            raise ValueError(f"measurements contain {measurement.label!r} more than once")
        seen.add(measurement.label)
        if structure.display_label not in segments:
            if measurement.voxels == 0:
                continue
            raise ValueError(
                f"measurement {measurement.label!r} has no segment "
                f"{structure.display_label!r} in the SEG {seg.SOPInstanceUID}"
            )
        number, item = segments[structure.display_label]
        reported.add(measurement.label)
        # Built explicitly: ReferencedSegment.from_segmentation cannot find the
        # segment of a single-segment SEG, whose Segment Identification is shared.
        referenced_segment = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        )
        tracking = hd.sr.TrackingIdentifier(
            uid=str(item.get("TrackingUID") or hd.UID()),
            identifier=str(item.get("TrackingID") or structure.display_label),
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=referenced_segment,
                finding_type=structure.property_type,
                finding_sites=[
                    hd.sr.FindingSite(
                        anatomic_location=structure.finding_site,
                        laterality=structure.laterality,
                    )
                ],
                measurements=_measurement_items(measurement, sr_algorithm)
                + _agreement_items(agreement, measurement.label, sr_algorithm),
                qualitative_evaluations=list(qualitative.get(measurement.label, [])) or None,
            )
        )
    unreported = set(qualitative) - reported
    if unreported:
        raise ValueError(
            f"qualitative evaluations for segments without a measurement group: "
            f"{sorted(unreported)}"
        )
    if not groups:
        raise ValueError("no measurement matches a segment of the SEG: nothing to report")
    if region is not None:
        groups.append(region.group((region_algorithm or algorithm).to_sr(), source_series_uid))

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=identity.observer_context(),
        ),
        procedure_reported=PROCEDURE_CT,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*prepared, seg],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        manufacturer_model_name=identity.model_name,
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        institution_name=identity.institution_name,
        series_description=series_description,
        is_complete=True,
    )
    if agreement:
        sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = DICE_VS_CLASSICAL.scheme_designator
    item.CodingSchemeName = "pacsnode local codes"
    item.CodingSchemeResponsibleOrganization = "pacsnode"
    return item


def write_dataset(ds: Dataset, path: Path | str) -> Path:
    """Write a created instance as a DICOM Part 10 file, atomically.

    The file appears under ``path`` complete or not at all: it is written beside it
    and renamed into place after an fsync.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
