"""Reading back a TID 1500 report written by :func:`deploy_app.sr.build_measurement_report`.

Per nodule: the tracking identifier and UID, the seed point, the probability of cancer, each
semantic feature's value (or "Indeterminate") paired with its Certainty of Feature (by the feature
concept that the certainty carries as its concept modifier, whose value is the most probable one),
and the algorithm name and version. Used by the tests,
the PACS round trip and anyone checking what the app sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept

from deploy_app.findings import INDETERMINATE
from deploy_app.sr import ALGORITHM_NAME, ALGORITHM_VERSION, CERTAINTY_OF_FEATURE, PROBABILITY_OF_CANCER
from deploy_app.sr import INDETERMINATE as INDETERMINATE_CONCEPT
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES, Code


@dataclass(frozen=True)
class ReadFeature:
    """One semantic finding read back from a report.

    Attributes:
        value: canonical value name of the vocabulary, or ``"Indeterminate"``.
        probability: the Certainty of Feature of the most probable value, or None when the report has
            none.
        code: the value's code as written.
        most_probable: the value the Certainty of Feature names (for an indeterminate finding: the
            candidate that stayed below its threshold), or None without one.
    """

    value: str
    probability: float | None
    code: Code
    most_probable: str | None = None

    @property
    def indeterminate(self) -> bool:
        return self.value == INDETERMINATE


@dataclass(frozen=True)
class ReadNodule:
    """One measurement group of a TID 1500 report, as :func:`read_measurement_report` reads it.

    Attributes:
        label: Tracking Identifier.
        tracking_uid: Tracking Unique Identifier.
        position_lps: the SCOORD3D POINT (world LPS mm).
        frame_of_reference_uid: its Frame of Reference UID.
        malignancy: Probability of cancer, or None.
        semantic: feature column -> predicted value, probability and code.
        algorithm_name: Algorithm Name on the probability of cancer, or None.
        algorithm_version: Algorithm Version of the group, or None.
    """

    label: str
    tracking_uid: str
    position_lps: tuple[float, float, float]
    frame_of_reference_uid: str
    malignancy: float | None
    semantic: Mapping[str, ReadFeature]
    algorithm_name: str | None
    algorithm_version: str | None


def _code_of(concept: CodedConcept | pydicom.Dataset) -> Code:
    return Code(str(concept.CodeValue), str(concept.CodingSchemeDesignator), str(concept.CodeMeaning))


def _same_concept(a: CodedConcept | pydicom.Dataset | Code, b: Code) -> bool:
    value = a.value if isinstance(a, Code) else str(a.CodeValue)
    scheme = a.scheme_designator if isinstance(a, Code) else str(a.CodingSchemeDesignator)
    return value == b.value and scheme == b.scheme_designator


def _feature_of_concept(concept: CodedConcept) -> str | None:
    return next((f.column for f in FEATURES if _same_concept(concept, f.code)), None)


def _value_name(column: str, code: Code) -> str | None:
    feature = FEATURE_BY_COLUMN[column]
    return next((v.name for v in feature.values if _same_concept(code, v.code)), None)


def _child_text(item: pydicom.Dataset, name: CodedConcept) -> str | None:
    """A TEXT child of a content item (e.g. a measurement's algorithm name), if any."""
    for child in getattr(item, "ContentSequence", []):
        if child.ValueType == "TEXT" and _same_concept(child.ConceptNameCodeSequence[0], _code_of(name)):
            return str(child.TextValue)
    return None


def _measurement_modifier(measurement: hd.sr.Measurement) -> tuple[str, Code] | None:
    """(feature column, value code) of a Certainty of Feature measurement's concept modifier."""
    for item in getattr(measurement[0], "ContentSequence", []):
        if item.ValueType != "CODE" or item.RelationshipType != "HAS CONCEPT MOD":
            continue
        column = _feature_of_concept(item.ConceptNameCodeSequence[0])
        if column is not None:
            return column, _code_of(item.ConceptCodeSequence[0])
    return None


def _read_group(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> ReadNodule:
    roi = group.roi
    if not isinstance(roi, hd.sr.ImageRegion3D):
        raise ValueError(f"measurement group '{group.tracking_identifier}' has no SCOORD3D region")
    points = np.asarray(roi.value, dtype=np.float64).reshape(-1, 3)
    centre = points.mean(axis=0)
    malignancy = algorithm_name = algorithm_version = None
    probabilities: dict[str, tuple[Code, float]] = {}
    for measurement in group.get_measurements():
        if _same_concept(measurement.name, _code_of(PROBABILITY_OF_CANCER)):
            malignancy = float(measurement.value)
            algorithm_name = _child_text(measurement[0], ALGORITHM_NAME)
            algorithm_version = _child_text(measurement[0], ALGORITHM_VERSION)
        elif _same_concept(measurement.name, _code_of(CERTAINTY_OF_FEATURE)):
            modifier = _measurement_modifier(measurement)
            if modifier is not None:
                probabilities[modifier[0]] = (modifier[1], float(measurement.value))
    semantic: dict[str, ReadFeature] = {}
    for evaluation in group.get_qualitative_evaluations():
        column = _feature_of_concept(evaluation.name)
        if column is None:
            continue
        code = _code_of(evaluation.value)
        indeterminate = _same_concept(code, _code_of(INDETERMINATE_CONCEPT))
        value = INDETERMINATE if indeterminate else _value_name(column, code)
        if value is None:
            raise ValueError(f"feature '{column}' has a value code not in the vocabulary: {code}")
        paired = probabilities.get(column)
        most_probable = _value_name(column, paired[0]) if paired is not None else None
        matches = paired is not None and (indeterminate or _same_concept(paired[0], code))
        semantic[column] = ReadFeature(
            value=value,
            probability=paired[1] if matches else None,
            code=code,
            most_probable=most_probable,
        )
    return ReadNodule(
        label=str(group.tracking_identifier),
        tracking_uid=str(group.tracking_uid),
        position_lps=(float(centre[0]), float(centre[1]), float(centre[2])),
        frame_of_reference_uid=str(roi.frame_of_reference_uid),
        malignancy=malignancy,
        semantic=semantic,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
    )


def read_measurement_report(source: str | Path | pydicom.Dataset) -> list[ReadNodule]:
    """Read the nodules of a TID 1500 report written by :func:`build_measurement_report`.

    Args:
        source: a file path or a dataset (Comprehensive 3D SR).

    Returns:
        One :class:`ReadNodule` per planar ROI measurement group with a SCOORD3D region, in document
        order.

    Raises:
        ValueError: the dataset is not a Comprehensive 3D SR with a TID 1500 root.
    """
    dataset = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)
    document = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True)
    content = document.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("the SR's root is not a TID 1500 Measurement Report")
    groups = content.get_planar_roi_measurement_groups()
    return [_read_group(group) for group in groups if isinstance(group.roi, hd.sr.ImageRegion3D)]
