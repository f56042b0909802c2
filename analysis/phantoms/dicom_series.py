"""Write synthetic phantoms as a geometrically valid CT series (DICOM Part 10 files).

Used by the tests and benchmarks in place of patient data; the volume comes from
:mod:`analysis.phantoms.trunk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from analysis.phantoms.trunk import Phantom

_RESCALE_INTERCEPT = -1024.0


@dataclass(frozen=True)
class SeriesInfo:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    paths: list[Path]


def ct_series_datasets(
    phantom: Phantom,
    patient_id: str = "PHANTOM-001",
    patient_name: str = "Phantom^Chest",
    study_instance_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Synthetic chest CT",
    body_part: str = "CHEST",
) -> list[Dataset]:
    """One CT Image Storage dataset per slice, ordered head to feet."""
    spec = phantom.spec
    study_uid = study_instance_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference = generate_uid()
    now = datetime.now()
    stored = np.clip(np.rint(phantom.hu - _RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
    x0 = -(spec.columns / 2 - 0.5) * spec.pixel_spacing_mm
    y0 = -(spec.rows / 2 - 0.5) * spec.pixel_spacing_mm
    datasets = []
    for k in range(spec.slices):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "SYN0001"
        ds.Modality = "CT"
        ds.Manufacturer = "pacsnode synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic CT"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        ds.SliceThickness = spec.slice_thickness_mm
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        z = -k * spec.slice_thickness_mm
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z, 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = _RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_ct_series(
    phantom: Phantom,
    folder: Path,
    **kwargs: object,
) -> SeriesInfo:
    """Write the phantom as one file per slice in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = ct_series_datasets(phantom, **kwargs)  # type: ignore[arg-type]
    paths = []
    for ds in datasets:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"CT{ds.InstanceNumber:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return SeriesInfo(
        study_instance_uid=str(datasets[0].StudyInstanceUID),
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        paths=paths,
    )
