"""The DICOM TID 1500 Measurement Report (Comprehensive 3D SR) of one analysed CT series.

Pure functions: :func:`build_measurement_report` turns the CT headers and a
:class:`~deploy_app.findings.SeriesResult` into a highdicom ``Comprehensive3DSR``;
:func:`deploy_app.sr_reader.read_measurement_report` reads such a report back.
:func:`nodule_group` and :func:`assemble_report` are the building blocks shared with the seeds SR
writer :func:`build_seed_sr`, a minimal TID 1500 SR that holds only nodule seed points.

Document
--------
- SOP class Comprehensive 3D SR, root template TID 1500, title (126000, DCM, "Imaging Measurement
  Report"), language en-US, procedure reported (25045-6, LN, "CT unspecified body region") from CID 100
  (which has no chest CT code).
- Patient and study attributes are copied from the CT by highdicom. Every instance of the CT series
  is listed as evidence (Current Requested Procedure Evidence Sequence): the report is about the
  series as a whole (the model reads a 100 mm cube, i.e. dozens of slices, around each seed), and a
  few hundred references are a small part of the report's size and of its time to build and write
  (``bench/bench_writers.py`` prints them), so they are not narrowed down to the slices inside the
  nodules' cubes.
- Observer context: a DEVICE observer (TID 1004) whose UID is derived from the bundle name and
  version (the same bundle version always has the same device UID), name and model name = bundle
  name, serial number = bundle version, manufacturer = ``manufacturer``.
- Completion flag COMPLETE when every seed was analysed, PARTIAL when some were skipped (the content
  then covers only part of what was asked for); verification flag UNVERIFIED and preliminary flag
  PRELIMINARY: the findings are a research model's output that no physician has reviewed.
- A coding scheme identification item declares the private scheme ``99LNSCLIP`` of
  :mod:`scripts.vocabulary`.

One measurement group per nodule (TID 1410 Planar ROI Measurements and Qualitative Evaluations)
---------------------------------------------------------------------------------------------
Why TID 1410 (PS3.16): the app knows each nodule by one seed point, not by a contour or a volume.
TID 1501 (Measurement and Qualitative Evaluation Group) has no image region, so it could not carry
the seed; TID 1411 (Volumetric ROI) describes a volume (a surface or a set of planar regions), which
the app does not compute; TID 1410 takes one Image Region as SCOORD3D with any graphic type but
MULTIPOINT, so a POINT in the CT's frame of reference is a region TID 1410 defines. The measurements
are TID 300 rows of TID 1410's measurement slot (TID 1419 ROI Measurements, which includes TID
300), the findings its qualitative evaluations, and the algorithm identification TID 4019 on the
probability (TID 300 row 6).

============================================  =========================================================
Content item                                  Encoding
============================================  =========================================================
Tracking Identifier (112039, DCM)             the seed label, e.g. "Nodule 1"
Tracking Unique Identifier (112040, DCM)      the seed's tracking UID when it came with one (an input
                                              SR or SEG), else a UID derived from the SR's SOP
                                              Instance UID and the nodule's index
Finding (121071, DCM)                         (27925004, SCT, "Nodule")
Finding Site (363698007, SCT)                 (39607008, SCT, "Lung")
NUM (111047, DCM, "Probability of cancer")    the malignancy probability, units (1, UCUM, "no units");
                                              Derivation (121401, DCM) = (373098007, SCT, "Mean") when
                                              it is the uncalibrated mean of several folds; TID 4019
                                              Algorithm Name / Version: bundle name / version, family
                                              (123110, DCM, "Artificial Intelligence"), parameters
                                              ``folds=K``, ``calibrated=yes|no``
NUM (111011, DCM, "Certainty of Feature")     one per semantic feature: the probability of the
                                              predicted value (units "1"), with the feature and value as
                                              TID 300's concept modifier ($ModType/$ModValue): HAS
                                              CONCEPT MOD CODE (feature concept) = (value code); no
                                              algorithm identification of its own (optional in TID
                                              300: repeated in all 17 it made up half the SR; the
                                              device observer names the algorithm)
CODE (feature concept) = (value code)         one per semantic feature: the qualitative evaluation
                                              (concept and value codes from scripts.vocabulary), or
                                              (82334004, SCT, "Indeterminate") when the predicted
                                              value's probability is below the feature's confidence
                                              threshold (see below)
Image Region (111030, DCM), SCOORD3D POINT    the seed, world LPS mm (Graphic Data is FL, i.e. float32:
                                              about 1e-5 mm at chest coordinates), in the CT's Frame of
                                              Reference
============================================  =========================================================

Why "Certainty of Feature": a TID 1501 qualitative evaluation is a bare CODE item without a number.
PS3.16 defines (111011, DCM, "Certainty of Feature") as "the likelihood that the feature analyzed is
in fact the type of feature identified", which is exactly the zero-shot probability of the predicted
value. Encoding it as a TID 300 measurement whose concept modifier names the feature and value keeps
every item inside rows the templates define (no private codes, no template extension), and lets a
reader pair it with its evaluation by the feature concept (each feature appears once per group).

Indeterminate findings: a coded value rather than a left-out item, so a reader still finds every
feature in every group and can tell "not stated" from "not analysed". The feature's Certainty of
Feature keeps naming the most probable value and its probability, so nothing the model said is
lost. The threshold is the feature's recorded one (:mod:`scripts.finding_reliability`, derived
from validation data) or 0.6 without a record; :meth:`deploy_app.findings.NoduleResult.findings`
applies it, for the PDF and the Secondary Capture too.

Every container (root, Imaging Measurements, the groups, the comments) is SEPARATE: its items are
distinct findings, not one text (highdicom makes them CONTINUOUS, which dcmtk's ``dsr2html``
renders as prose: bare numbers without their concept names).

Numbers are written as DS (16 characters) and as FD Floating Point Value, so they read back exactly.

Cost
----
Every content item and template (TID 1410 groups, TID 300 measurements, qualitative evaluations)
is built with highdicom's public constructors, so highdicom's checks run on them. One whole-tree
pass is skipped: the document is constructed around the root container without its children (the
constructor deep-copies the tree, parses the copy back and searches it for image references, about
three quarters of the time to build a report), which are attached afterwards
(:func:`comprehensive_3d_sr_without_tree_copy`, the one function that writes a private highdicom
attribute; a test checks that it gives exactly what highdicom's constructor gives).
``bench/bench_writers.py`` times the report with highdicom's document constructor too.

Report-level comments
---------------------
A "Qualitative Evaluations" container (C0034375, UMLS) at the end of the root holds TEXT items
(121106, DCM, "Comment"): a research-use statement with the model identity, an "UNTRAINED
DEMONSTRATION MODEL" warning when ``ModelInfo.untrained_demo`` is set (also in the series
description), and, when seeds were skipped, their count followed by one comment per skipped seed
(label, source, reason).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed, SeriesResult, SkippedSeed
from scripts.vocabulary import FEATURE_BY_COLUMN, PRIVATE_SCHEME, Code

logger = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "Semantic CLIP nodule SR (research use only)"
"""Series description of the results SR."""
DEMO_SERIES_DESCRIPTION = "UNTRAINED DEMO - semantic CLIP nodule SR (research use only)"
"""Series description when the model is the untrained demonstration model."""
DEFAULT_MANUFACTURER = "lung_nodule_ct_semantic_clip contributors"
"""Manufacturer written into the SR (equipment module and device observer)."""

PROCEDURE_REPORTED = CodedConcept.from_code(codes.cid100.CTUnspecifiedBodyRegion)
"""Procedure reported (TID 1500 row 4, CID 100 is extensible)."""
FINDING_NODULE = CodedConcept.from_code(codes.SCT.Nodule)
FINDING_SITE_LUNG = CodedConcept.from_code(codes.SCT.Lung)
PROBABILITY_OF_CANCER = CodedConcept.from_code(codes.DCM.ProbabilityOfCancer)
CERTAINTY_OF_FEATURE = CodedConcept.from_code(codes.DCM.CertaintyOfFeature)
NO_UNITS = CodedConcept.from_code(codes.UCUM.NoUnits)
COMMENT = CodedConcept.from_code(codes.DCM.Comment)
MEAN = CodedConcept.from_code(codes.SCT.Mean)
INDETERMINATE = CodedConcept.from_code(codes.SCT.Indeterminate)
"""The value of a qualitative evaluation whose prediction is below its confidence threshold."""
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 12 container (not in pydicom's concept dictionary)."""

UNTRAINED_DEMO_WARNING = (
    "UNTRAINED DEMONSTRATION MODEL: these probabilities and findings are meaningless and must not "
    "be used for any purpose other than testing the software."
)
RESEARCH_USE_STATEMENT = (
    "Research use only; not for clinical use. Results have not been reviewed by a physician."
)

ALGORITHM_NAME = CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = CodedConcept("111003", "DCM", "Algorithm Version")


def coded(code: Code) -> CodedConcept:
    """The highdicom coded concept of a vocabulary :class:`~scripts.vocabulary.Code`."""
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


@functools.cache
def _vocabulary_concept(code: Code) -> CodedConcept:
    """:func:`coded`, made once per code and shared by every item that names it (like the module's
    concept constants): a report names each feature concept twice per nodule."""
    return coded(code)


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item that declares the project's private scheme."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="Lung nodule semantic CLIP private codes",
        responsible_organization=DEFAULT_MANUFACTURER,
    )


# --------------------------------------------------------------------------------------------------
# CT series identity
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesIdentity:
    """The UIDs every CT instance of one series shares."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str


def series_identity(ct_datasets: Sequence[pydicom.Dataset]) -> SeriesIdentity:
    """Check that ``ct_datasets`` are one series of one study in one frame of reference.

    Args:
        ct_datasets: the CT headers (pixel data not needed).

    Returns:
        Their shared UIDs.

    Raises:
        ValueError: no datasets, a UID is missing, or the datasets disagree.
    """
    if not ct_datasets:
        raise ValueError("no CT datasets were given")
    identity: list[str] = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in ct_datasets}
        if len(values) != 1 or "" in values:
            raise ValueError(f"the CT datasets must share one non-empty {keyword}; found {sorted(values)}")
        identity.append(values.pop())
    return SeriesIdentity(*identity)


_TYPE2_EVIDENCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _evidence(ct_datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The evidence list for highdicom: the first header completed with empty type 2 attributes.

    highdicom copies patient and study attributes from the first evidence dataset by attribute
    access; real CT headers sometimes omit type 2 attributes, which would raise. The datasets
    themselves are not modified, and pixel data is never copied.
    """
    first = pydicom.Dataset()
    for element in ct_datasets[0]:
        if element.keyword != "PixelData":
            first.add(element)
    for keyword in _TYPE2_EVIDENCE_ATTRIBUTES:
        if keyword not in first:
            setattr(first, keyword, "")
    return [first, *ct_datasets[1:]]


# --------------------------------------------------------------------------------------------------
# building blocks (shared with build_seed_sr)
# --------------------------------------------------------------------------------------------------


def device_observer_uid(name: str, version: str) -> str:
    """A UID that is the same for every report written by the same bundle name and version."""
    return generate_uid(entropy_srcs=["device observer", name, version])


def device_observation_context(name: str, version: str, manufacturer: str) -> hd.sr.ObservationContext:
    """Observation context with one DEVICE observer (TID 1002/1004) identifying the bundle.

    Args:
        name: bundle (device) name; also the model name.
        version: bundle version, written as the serial number.
        manufacturer: device manufacturer.
    """
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(name, version),
        name=name,
        manufacturer_name=manufacturer,
        model_name=name,
        serial_number=version,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def algorithm_identification(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the bundle's model."""
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"folds={model.folds}", f"calibrated={'yes' if model.calibrated else 'no'}"],
        family=codes.cid7162.ArtificialIntelligence,
    )


def tracking_uid_for(seed: NoduleSeed, document_uid: str, index: int) -> str:
    """The seed's own tracking UID, else one derived from the document's SOP Instance UID and index."""
    return seed.tracking_uid or generate_uid(entropy_srcs=["tracking", document_uid, str(index)])


def nodule_group(
    seed: NoduleSeed,
    frame_of_reference_uid: str,
    tracking_uid: str,
    *,
    measurements: Sequence[hd.sr.Measurement] = (),
    evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One TID 1410 measurement group: tracking ids, Nodule in Lung, the seed as a SCOORD3D POINT.

    The items come in highdicom's order: tracking identifiers, finding, finding site, measurements,
    qualitative evaluations, image region. The group carries no algorithm identification and no
    geometric purpose of its own (both optional in TID 1410): highdicom's
    ``get_qualitative_evaluations()`` returns every CODE child of the group, so either would be read
    back as a finding. The algorithm is identified on the probability of cancer (TID 300) and, for
    the whole document, by the device observer.

    Args:
        seed: the nodule seed (its position is world LPS mm in ``frame_of_reference_uid``).
        frame_of_reference_uid: the CT's Frame of Reference UID.
        tracking_uid: the group's Tracking Unique Identifier.
        measurements: TID 300 measurements of the group.
        evaluations: qualitative evaluations of the group.
    """
    point = np.asarray([seed.position_lps], dtype=np.float64)
    region = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=point,
        frame_of_reference_uid=frame_of_reference_uid,
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=seed.label),
        referenced_region=region,
        finding_type=FINDING_NODULE,
        finding_sites=[hd.sr.FindingSite(anatomic_location=FINDING_SITE_LUNG)],
        measurements=list(measurements) or None,
        qualitative_evaluations=list(evaluations) or None,
    )
    separate_content(group[0])
    return group


def separate_content(container: hd.sr.ContainerContentItem) -> None:
    """Mark a container's children as SEPARATE items rather than one CONTINUOUS text.

    highdicom makes every container CONTINUOUS, which tells a renderer to run the children together
    as prose: dcmtk's ``dsr2html`` then prints bare numbers without their concept names. Our
    containers hold separate measurements and findings, which is what SEPARATE declares (the
    templates used here do not constrain Continuity of Content).
    """
    container.ContinuityOfContent = "SEPARATE"


def comments_container(comments: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations" container holding one Comment TEXT item per string."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for text in comments
        ]
    )
    return container


def assemble_report(
    ct_datasets: Sequence[pydicom.Dataset],
    groups: Sequence[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
    *,
    observation_context: hd.sr.ObservationContext,
    comments: Sequence[str] = (),
    series_description: str,
    series_number: int,
    instance_number: int,
    series_instance_uid: str,
    sop_instance_uid: str,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    is_complete: bool,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Wrap measurement groups into a TID 1500 Comprehensive 3D SR that references the CT series.

    Args:
        ct_datasets: every CT header of the series (the evidence; patient and study come from them).
        groups: the measurement groups (at least one).
        observation_context: who observed (TID 1001).
        comments: report-level comments (see :func:`comments_container`); none: no container.
        series_description: SeriesDescription of the SR.
        series_number: SeriesNumber.
        instance_number: InstanceNumber.
        series_instance_uid: SeriesInstanceUID of the SR.
        sop_instance_uid: SOPInstanceUID of the SR.
        manufacturer: Manufacturer.
        manufacturer_model_name: ManufacturerModelName.
        software_versions: SoftwareVersions.
        is_complete: CompletionFlag COMPLETE (else PARTIAL).
        institution_name: InstitutionName, if any.

    Returns:
        The SR (UNVERIFIED, PRELIMINARY).
    """
    series_identity(ct_datasets)
    if not groups:
        raise ValueError("a TID 1500 measurement report needs at least one measurement group")
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=list(groups),
        title=codes.cid7021.ImagingMeasurementReport,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            CodedConcept("en-US", "RFC5646", "English (United States)")
        ),
    )
    root = report[0]
    separate_content(root)
    for child in root.ContentSequence:
        if child.ValueType == "CONTAINER":  # Imaging Measurements
            separate_content(child)
    if comments:
        root.ContentSequence.append(comments_container(comments))
    return comprehensive_3d_sr_without_tree_copy(
        root,
        evidence=_evidence(ct_datasets),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        series_description=series_description,
        institution_name=institution_name,
        is_complete=is_complete,
        is_final=False,
        is_verified=False,
        coding_schemes=[private_coding_scheme()],
    )


def comprehensive_3d_sr_without_tree_copy(
    root: hd.sr.ContainerContentItem, **attributes: Any
) -> hd.sr.Comprehensive3DSR:
    """``hd.sr.Comprehensive3DSR(content=root, **attributes)``, without its passes over the tree.

    The one place that relies on highdicom's internals. Why: highdicom's constructor deep-copies the
    content tree, parses the copy back into content items and searches it twice for image
    references, most of the cost of building a report (``bench/bench_writers.py`` times both). The
    tree given here is already
    made of highdicom content items and holds no IMAGE or COMPOSITE reference (the evidence is given
    explicitly), so the document is built around the root container without its children, which are
    then attached to the document's Content Sequence and to its private ``_content`` (what the
    public ``document.content`` returns; highdicom sets nothing else from the tree). Unlike
    highdicom's, the returned ``document.content`` shares its items with ``root`` instead of holding
    a copy.

    ``tests/test_sr.py`` checks that the result equals the public constructor's apart from dates and
    that ``_content`` is still the attribute behind ``content``: a highdicom release that changes
    either fails there, not in a PACS.

    Args:
        root: the TID 1500 root container with its children; no IMAGE or COMPOSITE item below it.
        attributes: the other keyword arguments of ``hd.sr.Comprehensive3DSR`` (``evidence``
            included: it must list every referenced instance).

    Returns:
        The SR document.
    """
    children = root.ContentSequence
    root.ContentSequence = []
    try:
        document = hd.sr.Comprehensive3DSR(content=root, **attributes)
    finally:
        root.ContentSequence = children
    document.ContentSequence = children
    document._content = hd.sr.ContentSequence([root], is_root=True)
    return document


# --------------------------------------------------------------------------------------------------
# the results report
# --------------------------------------------------------------------------------------------------


def _certainty_of_feature(column: str, value_name: str, probability: float) -> hd.sr.Measurement:
    """NUM Certainty of Feature = probability, modified by (feature concept) = (value code)."""
    feature = FEATURE_BY_COLUMN[column]
    measurement = hd.sr.Measurement(
        name=CERTAINTY_OF_FEATURE,
        value=float(probability),
        unit=NO_UNITS,
    )
    modifier = hd.sr.CodeContentItem(
        name=_vocabulary_concept(feature.code),
        value=_vocabulary_concept(feature.value(value_name).code),
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    # TID 300 row 2 ($ModType/$ModValue); highdicom's Measurement has no argument for it
    measurement[0].ContentSequence = hd.sr.ContentSequence([modifier])
    return measurement


def _check_known_columns(semantic: Mapping[str, Mapping[str, float]]) -> None:
    """An unknown feature column is a programming error: the SR has no code for it."""
    unknown = sorted(set(semantic) - set(FEATURE_BY_COLUMN))
    if unknown:
        raise ValueError(f"unknown semantic feature column(s): {', '.join(unknown)}")


def nodule_result_group(
    nodule: NoduleResult,
    frame_of_reference_uid: str,
    tracking_uid: str,
    model: ModelInfo,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The measurement group of one analysed nodule (see the module docstring for the encoding)."""
    algorithm = algorithm_identification(model)
    mean_of_folds = not model.calibrated and model.folds > 1
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY_OF_CANCER,
            value=float(nodule.malignancy),  # NoduleResult checked it is in [0, 1]
            unit=NO_UNITS,
            derivation=MEAN if mean_of_folds else None,
            algorithm_id=algorithm,
        )
    ]
    evaluations = []
    _check_known_columns(nodule.semantic)
    for finding in nodule.findings(model.reliability):
        feature = FEATURE_BY_COLUMN[finding.column]
        measurements.append(_certainty_of_feature(finding.column, finding.value, finding.probability))
        value = _vocabulary_concept(feature.value(finding.value).code) if finding.confident else INDETERMINATE
        evaluations.append(hd.sr.QualitativeEvaluation(name=_vocabulary_concept(feature.code), value=value))
    return nodule_group(
        nodule.seed,
        frame_of_reference_uid,
        tracking_uid,
        measurements=measurements,
        evaluations=evaluations,
    )


def _describe_skipped(skipped: SkippedSeed) -> str:
    return f"{skipped.seed.label} ({skipped.seed.source}) was not analysed: {skipped.reason}"


def report_comments(result: SeriesResult) -> list[str]:
    """The report-level comments: research use, demo warning, skipped seeds."""
    model = result.model
    calibration = "calibrated" if model.calibrated else "uncalibrated"
    comments = [
        f"{RESEARCH_USE_STATEMENT} Model: {model.name} {model.version}, {model.folds} fold(s), {calibration}."
    ]
    if model.untrained_demo:
        comments.append(UNTRAINED_DEMO_WARNING)
    if result.skipped:
        count = len(result.skipped)
        comments.append(f"{count} nodule seed{'s were' if count > 1 else ' was'} not analysed.")
        comments.extend(_describe_skipped(item) for item in result.skipped)
    return comments


def build_measurement_report(
    ct_datasets: Sequence[pydicom.Dataset],
    result: SeriesResult,
    *,
    series_number: int = 901,
    instance_number: int = 1,
    institution_name: str | None = None,
    manufacturer: str = DEFAULT_MANUFACTURER,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Comprehensive 3D SR of one analysed CT series.

    Args:
        ct_datasets: every CT header of the analysed series (one study, one frame of reference).
        result: the nodules (at least one) and skipped seeds of the series.
        series_number: SeriesNumber of the SR.
        instance_number: InstanceNumber of the SR.
        institution_name: InstitutionName, if any.
        manufacturer: Manufacturer of the SR and of the device observer.
        series_instance_uid: SeriesInstanceUID (default: a new UID).
        sop_instance_uid: SOPInstanceUID (default: a new UID); new tracking UIDs derive from it.

    Returns:
        The SR, ready for :func:`deploy_app.dicom_io.write_dataset`.

    Raises:
        ValueError: no analysed nodule, CT datasets of several series, a probability outside
            [0, 1] or an unknown feature column or value.
    """
    if not result.nodules:
        raise ValueError("no analysed nodule: there is nothing to put into a measurement report")
    identity = series_identity(ct_datasets)
    sop_instance_uid = sop_instance_uid or generate_uid()
    groups = [
        nodule_result_group(
            nodule,
            identity.frame_of_reference_uid,
            tracking_uid_for(nodule.seed, sop_instance_uid, index),
            result.model,
        )
        for index, nodule in enumerate(result.nodules, start=1)
    ]
    model = result.model
    return assemble_report(
        ct_datasets,
        groups,
        observation_context=device_observation_context(model.name, model.version, manufacturer),
        comments=report_comments(result),
        series_description=DEMO_SERIES_DESCRIPTION if model.untrained_demo else SR_SERIES_DESCRIPTION,
        series_number=series_number,
        instance_number=instance_number,
        series_instance_uid=series_instance_uid or generate_uid(),
        sop_instance_uid=sop_instance_uid,
        manufacturer=manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        is_complete=not result.skipped,
        institution_name=institution_name,
    )


SEED_SERIES_DESCRIPTION = "Nodule seeds"
"""Series description of :func:`build_seed_sr`."""


def build_seed_sr(
    ct_datasets: Sequence[pydicom.Dataset],
    seeds: Sequence[NoduleSeed],
    *,
    observer_name: str = "nodule seed annotation",
    observer_version: str = "1",
    manufacturer: str = DEFAULT_MANUFACTURER,
    series_number: int = 900,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A minimal TID 1500 SR holding only the seed points, as a radiologist's system would send.

    One measurement group per seed (tracking identifier = label, tracking UID = the seed's or a new
    one, Nodule in Lung, SCOORD3D POINT), built with the same blocks as the results SR. A seed's
    own ``frame_of_reference_uid`` is written when set, else the CT's.

    Args:
        ct_datasets: every CT header of the series.
        seeds: at least one seed (world LPS mm).
        observer_name: device observer name.
        observer_version: device observer serial number (version).
        manufacturer: Manufacturer.
        series_number: SeriesNumber.
        instance_number: InstanceNumber.
        series_instance_uid: SeriesInstanceUID (default: new).
        sop_instance_uid: SOPInstanceUID (default: new).
    """
    if not seeds:
        raise ValueError("a seeds SR needs at least one seed")
    identity = series_identity(ct_datasets)
    sop_instance_uid = sop_instance_uid or generate_uid()
    groups = [
        nodule_group(
            seed,
            seed.frame_of_reference_uid or identity.frame_of_reference_uid,
            tracking_uid_for(seed, sop_instance_uid, index),
        )
        for index, seed in enumerate(seeds, start=1)
    ]
    return assemble_report(
        ct_datasets,
        groups,
        observation_context=device_observation_context(observer_name, observer_version, manufacturer),
        series_description=SEED_SERIES_DESCRIPTION,
        series_number=series_number,
        instance_number=instance_number,
        series_instance_uid=series_instance_uid or generate_uid(),
        sop_instance_uid=sop_instance_uid,
        manufacturer=manufacturer,
        manufacturer_model_name=observer_name,
        software_versions=observer_version,
        is_complete=True,
    )
