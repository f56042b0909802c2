"""Who creates the instances, and with which algorithm: the node as a device, and the
algorithm identification of segments and measurements (CID 7162 families).

Also the VR checks the encoders apply to what their callers fill in, so a value DICOM
would refuse fails with the attribute's name before highdicom runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from node import __version__

#: Manufacturer (0008,0070) of every instance the node creates.
MANUFACTURER = "pacsnode"
#: Manufacturer's Model Name (0008,1090) of every instance the node creates.
MODEL_NAME = "pacsnode"

# Value representation limits of the attributes the callers fill in.
_LO_MAX = 64
_AE_MAX = 16
_IS_MAX = 2**31 - 1


def check_lo(value: str, attribute: str) -> str:
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


def check_is(value: int, attribute: str) -> int:
    """An IS value the node assigns: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{attribute} must be an int, got {type(value).__name__}")
    if not 1 <= int(value) <= _IS_MAX:
        raise ValueError(f"{attribute} must lie between 1 and {_IS_MAX}, got {value}")
    return int(value)


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
        check_lo(self.device_serial_number, "device_serial_number")
        check_lo(self.manufacturer, "manufacturer")
        check_lo(self.model_name, "model_name")
        check_lo(self.software_version, "software_version")
        if self.institution_name is not None:
            check_lo(self.institution_name, "institution_name")

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

    def device_attributes(self) -> dict[str, Any]:
        """The General Equipment attributes highdicom takes for every instance we create."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.model_name,
            "software_versions": self.software_version,
            "device_serial_number": self.device_serial_number,
            "institution_name": self.institution_name,
        }

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
        check_lo(self.name, "AlgorithmInfo.name")
        check_lo(self.version, "AlgorithmInfo.version")
        if not isinstance(self.family, AlgorithmFamily):
            raise TypeError(
                f"AlgorithmInfo.family must be an AlgorithmFamily, got {self.family!r}"
            )
        if self.source is not None:
            check_lo(self.source, "AlgorithmInfo.source")
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
