"""The DICOM wrappers of the readable report: Encapsulated PDF and Secondary Capture images.

- :func:`encapsulated_pdf` wraps the PDF of :func:`deploy_app.report.pdf.render_report_pdf` as
  Encapsulated PDF Storage in the CT's study (a new DOC series);
  :func:`encapsulated_document_bytes` reads the document back without its padding.
- :func:`secondary_capture` renders one RGB Secondary Capture image per nodule (the montage of
  :func:`deploy_app.report.montage.render_montage`, with the probability and the main findings
  burned in), for viewers that do not open PDFs. Each references the CT slice nearest its seed
  (Source Image Sequence, :func:`nearest_instance`) and says what it shows (Derivation Description).

Pure functions: they return datasets; writing them (atomically) is the caller's job
(:func:`deploy_app.dicom_io.write_dataset`, called by :mod:`deploy_app.report.writers`).
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

from deploy_app.findings import SeriesResult
from deploy_app.report.montage import render_montage
from deploy_app.report.rows import MANUFACTURER, percent, position
from scripts.transforms import NinePlanes
from scripts.vocabulary import Code

DOCUMENT_TITLE_CODE = Code("18748-4", "LN", "Diagnostic Imaging Report")
"""Concept name of the encapsulated PDF (CID 7000 Diagnostic Imaging Report Document Titles)."""

SOURCE_PURPOSE_CODE = Code("121322", "DCM", "Source image for image processing operation")
"""Purpose of Reference of the Secondary Capture's source CT slice (CID 7202 Source Image Purposes
of Reference)."""

DERIVATION_CODE = Code("113072", "DCM", "Multiplanar reformatting")
"""Derivation Code of the Secondary Capture (CID 7203 Image Derivation): planes resampled from the CT."""

#: Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study attributes
#: copied from the CT, so that the new series joins the same patient and study.
_COPIED_KEYWORDS = (
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    # Clinical Trial Study
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "ConsentForClinicalTrialUseSequence",
)

#: Type 2 attributes of the Patient and General Study modules: present, empty when the CT lacks them.
_TYPE2_KEYWORDS = (
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


def _copy_patient_and_study(ct_dataset: pydicom.Dataset, target: pydicom.Dataset) -> None:
    if "StudyInstanceUID" not in ct_dataset:
        raise ValueError("the CT dataset has no StudyInstanceUID; cannot place the report in its study")
    if "SpecificCharacterSet" in ct_dataset:
        target.SpecificCharacterSet = ct_dataset.SpecificCharacterSet
    for keyword in _COPIED_KEYWORDS:
        if keyword in ct_dataset:
            element = ct_dataset[keyword]
            target[element.tag] = copy.deepcopy(element)  # sequences must not share items with the CT
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in target:
            setattr(target, keyword, None)


def _code_item(code: Code) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _dicom_date_time(moment: datetime.datetime) -> tuple[str, str]:
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def encapsulated_pdf(
    pdf: bytes,
    ct_dataset: pydicom.Dataset,
    *,
    series_number: int = 902,
    instance_number: int = 1,
    title: str,
    series_description: str = "Nodule CLIP report (research use only)",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    source_datasets: Sequence[pydicom.Dataset] | None = None,
    content_datetime: datetime.datetime | None = None,
    manufacturer: str = MANUFACTURER,
    model_name: str | None = None,
    software_versions: str | None = None,
) -> pydicom.Dataset:
    """Wrap a PDF as an Encapsulated PDF Storage instance in the CT's study (a new DOC series).

    Patient, clinical-trial and study attributes are copied from ``ct_dataset``; the instance
    references its source CT instances (Source Instance Sequence). Encapsulated Document Length
    holds the PDF's exact length, as the value itself is padded to an even length.

    Args:
        pdf: the PDF file's bytes.
        ct_dataset: any instance of the CT series the report is about.
        series_number: SeriesNumber of the new series.
        instance_number: InstanceNumber.
        title: DocumentTitle.
        series_description: SeriesDescription.
        series_instance_uid: SeriesInstanceUID (default: a new UID).
        sop_instance_uid: SOPInstanceUID (default: a new UID).
        source_datasets: the CT instances the report was derived from (default: ``ct_dataset``).
        content_datetime: content, series and instance creation date/time (default: now).
        manufacturer: Manufacturer and Secondary Capture Device Manufacturer.
        model_name: Manufacturer's Model Name (e.g. the bundle name), if any.
        software_versions: Software Versions (e.g. the bundle version), if any.

    Returns:
        the dataset with its file meta information, ready to save.

    Raises:
        ValueError: the PDF does not start with ``%PDF-`` or the CT has no StudyInstanceUID.
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("the document is not a PDF (it does not start with %PDF-)")
    moment = content_datetime or datetime.datetime.now()
    date, time = _dicom_date_time(moment)
    sop_uid = sop_instance_uid or generate_uid()

    ds = pydicom.Dataset()
    _copy_patient_and_study(ct_dataset, ds)
    # SOP Common
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description
    # General Equipment + SC Equipment
    ds.Manufacturer = manufacturer
    if model_name:
        ds.ManufacturerModelName = model_name
    if software_versions:
        ds.SoftwareVersions = software_versions
    ds.ConversionType = "WSD"  # workstation: the document was generated, not scanned
    ds.SecondaryCaptureDeviceManufacturer = manufacturer
    if model_name:
        ds.SecondaryCaptureDeviceManufacturerModelName = model_name
    if software_versions:
        ds.SecondaryCaptureDeviceSoftwareVersions = software_versions
    # Encapsulated Document
    ds.InstanceNumber = int(instance_number)
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = f"{date}{time}"
    # every page's header shows the patient's name, ID and birth date and the accession number
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    sources = list(source_datasets) if source_datasets is not None else [ct_dataset]
    references = []
    for source in sources:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        references.append(item)
    if references:
        ds.SourceInstanceSequence = references
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = [_code_item(DOCUMENT_TITLE_CODE)]
    ds.VerificationFlag = "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values are padded to an even length; the length attribute keeps the exact size
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)
    ds.EncapsulatedDocumentLength = len(pdf)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def encapsulated_document_bytes(ds: pydicom.Dataset) -> bytes:
    """The encapsulated document of a dataset without its even-length padding.

    Args:
        ds: an Encapsulated Document instance.

    Returns:
        the document's bytes (trimmed to Encapsulated Document Length when present).
    """
    value = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    return value[: int(length)] if length is not None else value


def _slice_offset(ds: pydicom.Dataset, position_lps: np.ndarray) -> float | None:
    """Distance in mm from a point to an instance's image plane along its normal (None: no geometry)."""
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        origin = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or origin.shape != (3,):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if not np.isfinite(length) or length < 1e-6 or not np.all(np.isfinite(origin)):
        return None
    return abs(float((position_lps - origin) @ normal) / length)


def nearest_instance(
    datasets: Sequence[pydicom.Dataset], position_lps: Sequence[float]
) -> pydicom.Dataset | None:
    """The CT instance whose slice lies nearest a point, along the slice normal.

    Each instance's normal is the cross product of its ImageOrientationPatient's row and column
    cosines, its slice position its ImagePositionPatient; instances without them are passed over.
    Of equally near slices the first in ``datasets`` order is taken.

    Args:
        datasets: the CT instances (headers suffice).
        position_lps: the point in world LPS mm (a nodule seed).

    Returns:
        the nearest instance, or None when none has a usable position and orientation.
    """
    point = np.asarray([float(v) for v in position_lps], dtype=np.float64)
    best, best_offset = None, np.inf
    for ds in datasets:
        offset = _slice_offset(ds, point)
        if offset is not None and offset < best_offset:
            best, best_offset = ds, offset
    return best


def derivation_description(position_lps: Sequence[float]) -> str:
    """What a Secondary Capture montage shows, for its Derivation Description (0008,2111).

    Args:
        position_lps: the nodule seed in world LPS mm.

    Returns:
        one sentence (well under the 1024 characters of ST).
    """
    planes = NinePlanes()
    low, high = (f"{v:g}" for v in planes.hu_window)
    return (
        f"Nine planes ({planes.plane_size} x {planes.plane_size} mm at 1 mm, resampled to "
        f"{planes.out_size} x {planes.out_size} pixels) through the nodule seed at "
        f"{position(position_lps)}, windowed [{low}, {high}] HU, shown in radiological orientation, "
        "with the model's attention weight per plane, its probability of cancer and zero-shot "
        "semantic findings; research use only"
    )


def _source_image_item(source: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [_code_item(SOURCE_PURPOSE_CODE)]
    item.SpatialLocationsPreserved = "NO"  # a montage of resampled planes
    return item


def secondary_capture(
    result: SeriesResult,
    ct_dataset: pydicom.Dataset,
    *,
    series_number: int = 903,
    first_instance_number: int = 1,
    series_description: str = "Nodule CLIP montage (research use only)",
    series_instance_uid: str | None = None,
    sop_instance_uids: Sequence[str] | None = None,
    content_datetime: datetime.datetime | None = None,
    manufacturer: str = MANUFACTURER,
    source_datasets: Sequence[pydicom.Dataset] | None = None,
) -> list[pydicom.Dataset]:
    """One RGB Secondary Capture image per nodule, in the CT's study (one new series).

    Each image carries the research-use banner (burned in), a Source Image Sequence pointing at the
    CT instance nearest its seed along the slice normal (:func:`nearest_instance`, purpose DCM 121322
    "Source image for image processing operation"), Derivation Description
    (:func:`derivation_description`) and Derivation Code DCM 113072 "Multiplanar reformatting".

    Args:
        result: the series' results.
        ct_dataset: any instance of the CT series (patient and study are copied from it).
        series_number: SeriesNumber of the new series.
        first_instance_number: InstanceNumber of the first image (the others follow).
        series_description: SeriesDescription.
        series_instance_uid: SeriesInstanceUID (default: a new UID).
        sop_instance_uids: one SOPInstanceUID per nodule (default: new UIDs).
        content_datetime: content, series and capture date/time (default: now).
        manufacturer: Manufacturer.
        source_datasets: the CT instances to pick each nodule's source slice from (default:
            ``ct_dataset``; ``ct_dataset`` too when none has a position and orientation).

    Returns:
        the images, in nodule order (empty when no nodule was analysed).
    """
    sources = list(source_datasets) if source_datasets is not None else [ct_dataset]
    if sop_instance_uids is not None and len(sop_instance_uids) != len(result.nodules):
        raise ValueError(f"{len(result.nodules)} nodules but {len(sop_instance_uids)} SOP instance UIDs")
    moment = content_datetime or datetime.datetime.now()
    date, time = _dicom_date_time(moment)
    series_uid = series_instance_uid or generate_uid()
    images = []
    for index, nodule in enumerate(result.nodules):
        pixels = render_montage(result, nodule)
        image = highdicom.sc.SCImage.from_ref_dataset(
            ref_dataset=ct_dataset,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=int(series_number),
            sop_instance_uid=sop_instance_uids[index] if sop_instance_uids is not None else generate_uid(),
            instance_number=int(first_instance_number) + index,
            manufacturer=manufacturer,
            patient_orientation=("L", "P"),  # replaced below: a montage has no single orientation
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description,
            manufacturer_model_name=result.model.name,
            software_versions=result.model.version,
            content_date=date,
            content_time=time,
            series_date=date,
            series_time=time,
        )
        image.PatientOrientation = None  # type 2C: present and empty for a multi-orientation montage
        # Laterality (2C) is required for paired body parts only (e.g. LUNG): the montage shows the chest
        image.BodyPartExamined = "CHEST"
        image.DateOfSecondaryCapture, image.TimeOfSecondaryCapture = date, time
        image.InstanceCreationDate, image.InstanceCreationTime = date, time
        image.BurnedInAnnotation = "YES"  # text is burned in (no patient name or ID, though)
        image.RecognizableVisualFeatures = "NO"
        image.ConversionType = "WSD"  # workstation: generated, not digitised (highdicom sets DI)
        source = nearest_instance(sources, nodule.seed.position_lps)
        image.SourceImageSequence = [_source_image_item(source if source is not None else ct_dataset)]
        image.DerivationDescription = derivation_description(nodule.seed.position_lps)
        image.DerivationCodeSequence = [_code_item(DERIVATION_CODE)]
        image.ImageComments = f"{nodule.seed.label}: probability of cancer {percent(nodule.malignancy)}"
        images.append(image)
    return images
