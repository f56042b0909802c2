"""What the segment labels mean: the coded concepts of every label a SEG or SR may carry.

The built-in labels (body, lungs) are in :data:`STRUCTURES`. A user's model brings its
labels' codes in its card; :meth:`StructureCatalog.with_model_card` makes the catalog
the encoders are handed for that model's results, so nothing is registered in a
process-wide table and two models cannot leak labels into each other's results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT
from node.results.identity import AlgorithmInfo


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


class StructureCatalog:
    """Segment label -> coded meaning, for the results of one pipeline run.

    Built-in labels always keep their meaning; a model's card may add labels, and may
    name a built-in label only with the built-in codes, so two models cannot disagree
    about what "lung_left" is.

    Parameters
    ----------
    extra
        Structures to add to the built-in :data:`STRUCTURES`.

    Raises
    ------
    ValueError
        If an extra structure codes a known label differently.
    """

    def __init__(self, extra: Iterable[Structure] = ()) -> None:
        self._structures: dict[str, Structure] = dict(STRUCTURES)
        for structure in extra:
            known = self._structures.get(structure.label)
            if known is not None and (known.category, known.property_type) != (
                structure.category, structure.property_type
            ):
                raise ValueError(
                    f"segment label {structure.label!r} is already coded as "
                    f"{known.property_type.meaning} ({known.property_type.value}); a model "
                    f"cannot code it as {structure.property_type.meaning} "
                    f"({structure.property_type.value})"
                )
            self._structures.setdefault(structure.label, structure)

    @classmethod
    def with_model_card(cls, card: Any) -> StructureCatalog:
        """The built-in labels and those of a model card (``analysis.model_card``)."""
        extra = []
        for entry in card.segments:
            assert entry.category is not None and entry.type is not None  # card-validated
            category = Code(entry.category.value, entry.category.scheme, entry.category.meaning)
            kind = Code(entry.type.value, entry.type.scheme, entry.type.meaning)
            extra.append(Structure(label=entry.label, display_label=entry.display,
                                   category=category, property_type=kind, finding_site=kind))
        return cls(extra)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and label in self._structures

    def __getitem__(self, label: str) -> Structure:
        """The coded meaning of a segment label; an unknown label raises."""
        if label in self:
            return self._structures[label]
        raise UnknownStructureError(
            f"no coded meaning for segment label {label!r}; known labels: "
            f"{', '.join(sorted(self._structures))} (a model's card gives its labels' codes)"
        )


#: The built-in labels only: what the shipped pipelines produce.
DEFAULT_STRUCTURES = StructureCatalog()
