"""The TID 1500 Measurement Report: one Volumetric ROI group per segment of the SEG,
the CNN/classical agreement, and the predicted region of the series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from analysis.types import SegmentMeasurement
from node.results.identity import AlgorithmInfo, EncoderIdentity, check_is, check_lo
from node.results.sources import check_sources, prepare_sources
from node.results.structures import DEFAULT_STRUCTURES, StructureCatalog

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
#: TID 1500 row 12's container, and the concept of each note in it.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = codes.DCM.Comment
_MAX_UT = 4096  # a note longer than this is cut: TEXT items are read, not archived
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
    notes: Sequence[str] = (),
    agreement: Mapping[str, float] | None = None,
    region: RegionFinding | None = None,
    region_algorithm: AlgorithmInfo | None = None,
    structures: StructureCatalog = DEFAULT_STRUCTURES,
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
    notes
        What the reader should know about how the series was analysed (a quirk of
        the series accepted, a mask corrected): TEXT items of the report's
        Qualitative Evaluations container (TID 1500).
    agreement
        Optional Dice agreement of the CNN's and the classical mask per segment
        label (a QA figure), added to its group as a measurement.
    region, region_algorithm
        Optional predicted anatomical region of the series with its probability, and
        the classifier that predicted it: one more group (TID 1501).
    structures
        The coded meaning of every label; the catalog the SEG was built with.

    Raises
    ------
    UnknownStructureError
        If a measurement's label has no entry in ``structures``.
    ValueError
        If a measurement matches no segment of ``seg``, appears twice, has a value
        that is not finite, or if ``seg`` and ``sources`` do not belong together.
    """
    series_number = check_is(series_number, "series_number")
    instance_number = check_is(instance_number, "instance_number")
    check_lo(series_description, "series_description")
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
    check_sources(prepared)
    if str(prepared[0].get("Modality", "")) != "CT":
        raise ValueError(
            f"sources have Modality {prepared[0].get('Modality')!r}; the report's "
            "attenuation values in HU need CT"
        )
    if seg.get("SOPClassUID") != SegmentationStorage:
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
        structures[label]
    segments = _segment_numbers_by_label(seg)
    sr_algorithm = algorithm.to_sr()
    groups = []
    seen: set[str] = set()
    reported: set[str] = set()
    for measurement in measurements:
        structure = structures[measurement.label]
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
    content = report[0]
    if notes:
        content.ContentSequence.append(_notes_container(notes))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*prepared, seg],
        content=content,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        series_description=series_description,
        is_complete=True,
        **identity.device_attributes(),
    )
    if agreement:
        sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _notes_container(notes: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations container, one Comment (TEXT) per note."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = [
        hd.sr.TextContentItem(name=COMMENT, value=note[:_MAX_UT],
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for note in notes
    ]
    return container


def _private_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = DICE_VS_CLASSICAL.scheme_designator
    item.CodingSchemeName = "pacsnode local codes"
    item.CodingSchemeResponsibleOrganization = "pacsnode"
    return item
