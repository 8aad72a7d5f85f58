"""The vocabulary table matches the schema data (tests/data/semantic_schema.json), parses CSV cells
and has well-formed codes."""

from __future__ import annotations

import json
import math
import re

import pytest

from conftest import TEST_DATA
from scripts import vocabulary as vocab
from scripts.errors import UserInputError

#: The cohort CSV columns and the 17 features with their values, kept as data apart from the code
#: (docs/semantic_schema.md is the readable version).
SCHEMA = json.loads((TEST_DATA / "semantic_schema.json").read_text(encoding="utf-8"))
SCHEMA_FEATURES: dict[str, tuple[str, ...]] = {f["column"]: tuple(f["values"]) for f in SCHEMA["features"]}


def test_schema_table_parsed() -> None:
    assert len(SCHEMA_FEATURES) == 17


def test_features_in_schema_order() -> None:
    assert [f.column for f in vocab.FEATURES] == list(SCHEMA_FEATURES)
    assert list(vocab.FEATURE_BY_COLUMN) == list(SCHEMA_FEATURES)


@pytest.mark.parametrize("column", list(SCHEMA_FEATURES))
def test_feature_values_match_schema(column: str) -> None:
    assert vocab.FEATURE_BY_COLUMN[column].value_names() == SCHEMA_FEATURES[column]


@pytest.mark.parametrize(
    ("column", "raw", "expected"),
    [
        ("nodule_margins", "Spiculated", "Spiculated/Serrated"),
        ("additional_nodule_margins", " spiculated/serrated ", "Spiculated/Serrated"),
        ("nodule_margin_conspicuity", "WELL MARGINATED", "Well marginated"),
        ("nodule_consistency", "part solid", "Part-solid"),
        ("nodule_consistency", "Pure ground glass", "Pure ground glass"),
        ("nodule_shape", "irregular", "Complex/Irregular"),
        ("cavitation", "present", "Present"),
        ("pleural_attachment", "No", "Absent"),
        ("cavitation", "", None),
        ("cavitation", "   ", None),
        ("cavitation", None, None),
        ("cavitation", math.nan, None),
    ],
)
def test_parse_names_aliases_case_missing(column: str, raw: object, expected: str | None) -> None:
    assert vocab.FEATURE_BY_COLUMN[column].parse(raw, where="t.csv: line 3") == expected


def test_unknown_value_message_names_row_column_allowed() -> None:
    feature = vocab.FEATURE_BY_COLUMN["nodule_shape"]
    with pytest.raises(UserInputError) as info:
        feature.parse("Triangular", where="cohort.csv: line 7")
    message = str(info.value)
    assert "cohort.csv: line 7" in message
    assert "'nodule_shape'" in message
    assert "'Triangular'" in message
    assert "Round, Ovoid, Polygonal, Complex/Irregular" in message


@pytest.mark.parametrize("feature", vocab.FEATURES, ids=lambda f: f.column)
def test_value_codes_unique_within_feature(feature: vocab.SemanticFeature) -> None:
    codes = [(v.code.scheme_designator, v.code.value) for v in feature.values]
    assert len(set(codes)) == len(codes)
    assert feature.code not in {v.code for v in feature.values}


def test_feature_concept_codes_unique() -> None:
    codes = [(f.code.scheme_designator, f.code.value) for f in vocab.FEATURES]
    assert len(set(codes)) == len(codes)


@pytest.mark.parametrize("feature", vocab.FEATURES, ids=lambda f: f.column)
def test_text_fields(feature: vocab.SemanticFeature) -> None:
    assert feature.title
    for value in feature.values:
        assert value.phrases and all(p.strip() for p in value.phrases)
        assert value.prompt.startswith("The nodule") and value.prompt.endswith(".")
    prompts = [v.prompt for v in feature.values]
    assert len(set(prompts)) == len(prompts)
    if feature.is_present_absent:
        assert feature.noun


def test_aliases_do_not_collide() -> None:
    for feature in vocab.FEATURES:
        spellings = [s.casefold() for v in feature.values for s in (v.name, *v.aliases)]
        assert len(set(spellings)) == len(spellings), feature.column


def test_private_codes_well_formed_and_documented() -> None:
    codes = vocab.private_codes()
    assert codes
    doc = vocab.__doc__ or ""
    values = [c.value for c in codes]
    assert len(set(values)) == len(values)
    for code in codes:
        assert code.scheme_designator == vocab.PRIVATE_SCHEME
        assert re.fullmatch(r"LNSC-F\d{2}(-V\d+)?", code.value), code.value
        assert 0 < len(code.meaning) <= 64  # DICOM LO
        assert code.value in doc and code.meaning in doc, code.value
    assert vocab.PRIVATE_SCHEME.startswith("99")


def test_private_value_numbers_match_positions() -> None:
    for number, feature in enumerate(vocab.FEATURES, start=1):
        if feature.code.scheme_designator == vocab.PRIVATE_SCHEME:
            assert feature.code.value == f"LNSC-F{number:02d}"
        for position, value in enumerate(feature.values, start=1):
            if value.code.scheme_designator == vocab.PRIVATE_SCHEME:
                assert value.code.value == f"LNSC-F{number:02d}-V{position}"


def test_standard_codes_are_documented() -> None:
    doc = vocab.__doc__ or ""
    for feature in vocab.FEATURES:
        for code in (feature.code, *(v.code for v in feature.values)):
            if code.scheme_designator != vocab.PRIVATE_SCHEME:
                assert code.scheme_designator in {"SCT", "DCM", "RADLEX"}
                assert code.value in doc and code.meaning in doc, code


def test_standard_codes_agree_with_pydicom_ps3_16() -> None:
    concepts = pytest.importorskip("pydicom.sr._concepts_dict").concepts
    for feature in vocab.FEATURES:
        for code in (feature.code, *(v.code for v in feature.values)):
            if code.scheme_designator == vocab.PRIVATE_SCHEME:
                continue
            meanings = {
                meaning
                for entry in concepts[code.scheme_designator].values()
                for value, (meaning, _cids) in entry.items()
                if value == code.value
            }
            assert code.meaning in meanings, code


def test_size_and_suspicion_columns() -> None:
    assert vocab.SIZE_COLUMNS == (
        "longest_axial_diameter_(mm)",
        "short_diameter_(mm)",
        "mean_diameter",
        "psn_longest_diameter_solid_component",
    )
    assert tuple(SCHEMA["size_columns"]) == vocab.SIZE_COLUMNS
    assert vocab.SUSPICION_COLUMN == "level_of_suspicion_of_lung_cancer" == SCHEMA["suspicion_column"]
    assert vocab.COLUMN_ALIASES["cyst_like_spaces"] == "cyst-like_spaces"


@pytest.mark.parametrize("legacy", sorted(SCHEMA["legacy_spellings"]["columns"]))
def test_legacy_column_spellings_are_accepted(legacy: str) -> None:
    assert vocab.COLUMN_ALIASES[legacy] == SCHEMA["legacy_spellings"]["columns"][legacy]


@pytest.mark.parametrize("legacy", sorted(SCHEMA["legacy_spellings"]["values"]))
def test_legacy_value_spellings_are_accepted(legacy: str) -> None:
    canonical = SCHEMA["legacy_spellings"]["values"][legacy]
    for feature in vocab.FEATURES:
        if canonical in feature.value_names():
            assert feature.parse(legacy, where="t.csv: line 2") == canonical, feature.column


def test_value_lookup() -> None:
    feature = vocab.FEATURE_BY_COLUMN["nodule_margins"]
    assert feature.value("spiculated").name == "Spiculated/Serrated"
    with pytest.raises(UserInputError):
        feature.value("wavy")
