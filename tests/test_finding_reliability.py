"""Honest findings: confidence thresholds from validation data, indeterminate findings, ranking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy_app.__main__ import parse_args
from deploy_app.findings import (
    INDETERMINATE,
    ModelInfo,
    NoduleResult,
    NoduleSeed,
    SeriesResult,
    most_certain,
    results_table,
)
from deploy_app.report import finding_text, top_findings
from scripts.errors import UserInputError
from scripts.finding_reliability import (
    DEFAULT_CONFIDENCE,
    RELIABILITY_FILE,
    FeatureReliability,
    FindingReliability,
    confidence_threshold,
    normalised_margin,
    read_finding_reliability,
)

# --------------------------------------------------------------------------------------------------
# the threshold
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("correct", "probability", "expected"),
    [
        # from 0.9 on 5 of 5 are right, from 0.7 on 5 of 6 (0.83), from 0.6 on 5 of 7 (0.71)
        ([1, 1, 1, 1, 1, 0, 0], [0.95, 0.94, 0.93, 0.92, 0.9, 0.7, 0.6], 0.7),
        # 8 of the top 10 right: precision 0.8 reached at 0.55, not below
        (
            [1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0],
            [0.99, 0.9, 0.89, 0.8, 0.7, 0.69, 0.68, 0.6, 0.58, 0.55, 0.54, 0.5],
            0.55,
        ),
        # never 80 % right: no threshold
        ([1, 0, 1, 0, 1, 0, 1, 0], [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55], None),
        # fewer than 5 nodules: no threshold
        ([1, 1, 1, 1], [0.9, 0.8, 0.7, 0.6], None),
        # ties: a threshold keeps every nodule at its value
        ([1, 1, 1, 1, 0, 0], [0.9, 0.9, 0.9, 0.7, 0.7, 0.7], None),
        ([1, 1, 1, 1, 1, 0], [0.9, 0.9, 0.9, 0.7, 0.7, 0.7], 0.7),
    ],
)
def test_confidence_threshold(correct: list[int], probability: list[float], expected: float | None) -> None:
    assert confidence_threshold([bool(c) for c in correct], probability) == expected


def test_confidence_threshold_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        confidence_threshold([True, False], [0.5])


def test_normalised_margin_compares_features_with_different_value_counts() -> None:
    assert normalised_margin(0.5, 2) == pytest.approx(0.0)
    assert normalised_margin(0.55, 3) > normalised_margin(0.6, 2)  # 0.217 > 0.1
    with pytest.raises(ValueError):
        normalised_margin(0.5, 0)


@pytest.mark.parametrize(
    ("reliability", "at_chance", "separation"),
    [
        (
            FeatureReliability("f", auroc=0.94, auroc_low=0.90, auroc_high=0.98),
            False,
            "AUROC 0.94 [0.90, 0.98]",
        ),
        (
            FeatureReliability("f", auroc=0.58, auroc_low=0.49, auroc_high=0.66),
            True,
            "AUROC 0.58 [0.49, 0.66], at chance",
        ),
        (
            FeatureReliability("f", auroc=0.30, auroc_low=0.20, auroc_high=0.40),
            True,
            "AUROC 0.30 [0.20, 0.40], at chance",
        ),
        (FeatureReliability("f", auroc=0.54), True, "AUROC 0.54, at chance"),
        (FeatureReliability("f", auroc=0.70), False, "AUROC 0.70"),
        (FeatureReliability("f"), False, "not evaluated"),
    ],
)
def test_at_chance_and_separation(reliability: FeatureReliability, at_chance: bool, separation: str) -> None:
    assert reliability.at_chance is at_chance
    assert reliability.separation() == separation


def test_the_record_round_trips_and_defaults_apply_without_one(tmp_path: Path) -> None:
    assert read_finding_reliability(tmp_path) == FindingReliability()
    assert FindingReliability().feature("cavitation").confidence_threshold == DEFAULT_CONFIDENCE
    record = FindingReliability(
        {"cavitation": FeatureReliability("cavitation", auroc=0.8, confidence_threshold=None, n_annotated=9)},
        source="val",
    )
    (tmp_path / RELIABILITY_FILE).write_text(json.dumps(record.to_json()))
    read = read_finding_reliability(tmp_path)
    assert read == record and not read.feature("cavitation").is_confident(1.0)
    configured = read.with_confidence(0.7, ["pleural_attachment"])
    assert (
        configured.feature("cavitation").is_confident(0.7) and configured.feature("cavitation").auroc == 0.8
    )
    assert configured.feature("pleural_attachment").threshold_basis == "configured"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "cannot read"),
        ("[]", "not a JSON object"),
        ('{"source": "x"}', "not a valid finding reliability record"),
        ('{"features": {"cavitation": {"auroc": 1.5}}}', "auroc must be in"),
        ('{"features": {"cavitation": {"threshold": 0.5}}}', "not a valid finding reliability record"),
    ],
)
def test_a_broken_record_is_refused_with_its_path(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / RELIABILITY_FILE).write_text(text)
    with pytest.raises(UserInputError, match=message) as raised:
        read_finding_reliability(tmp_path)
    assert RELIABILITY_FILE in str(raised.value)


def test_a_configured_confidence_must_be_a_probability() -> None:
    with pytest.raises(UserInputError):
        FindingReliability().with_confidence(0.0, [])


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_the_cli_refuses_a_finding_confidence_outside_0_1(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_args(["-i", "in", "-o", "out", "-m", "model", "--finding-confidence", value])
    assert stop.value.code == 2
    assert "--finding-confidence must be a probability" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# what the outputs state
# --------------------------------------------------------------------------------------------------

SEMANTIC = {
    "pleural_attachment": {"Present": 0.64, "Absent": 0.36},  # margin 0.14
    "nodule_margins": {"Smooth": 0.2, "Lobulated": 0.56, "Spiculated/Serrated": 0.24},  # margin 0.227
    "cavitation": {"Present": 0.9, "Absent": 0.1},  # confident only under a threshold
    "necrosis": {"Present": 0.3, "Absent": 0.7},  # Absent, margin 0.2
    "nodule_consistency": {"Solid": 0.5, "Part-solid": 0.3, "Pure ground glass": 0.2},  # below 0.6
}
RELIABILITY = FindingReliability(
    {
        "pleural_attachment": FeatureReliability("pleural_attachment", auroc=0.95, confidence_threshold=0.6),
        "nodule_margins": FeatureReliability("nodule_margins", auroc=0.8, confidence_threshold=0.5),
        "cavitation": FeatureReliability("cavitation", auroc=0.5, confidence_threshold=None),
    },
    source="test",
)


def _result(reliability: FindingReliability = RELIABILITY) -> SeriesResult:
    nodule = NoduleResult(NoduleSeed((1.0, 2.0, 3.0), "Nodule 1", "test"), 0.3, (0.3,), SEMANTIC, ())
    return SeriesResult((nodule,), (), ModelInfo("m", "1", 1, calibrated=False, reliability=reliability))


def test_findings_below_their_threshold_are_indeterminate() -> None:
    result = _result()
    findings = {f.column: f for f in result.nodules[0].findings(result.model.reliability)}
    assert findings["pleural_attachment"].stated_value == "Present"  # 0.64 >= 0.6
    assert findings["nodule_margins"].stated_value == "Lobulated"  # 0.56 >= 0.5
    assert findings["cavitation"].stated_value == INDETERMINATE  # never confident
    assert findings["nodule_consistency"].stated_value == INDETERMINATE  # 0.5 < default 0.6
    assert findings["necrosis"].stated_value == "Absent"  # 0.7 >= default 0.6
    assert finding_text(findings["cavitation"]) == "Indeterminate (Present?)"
    assert finding_text(findings["necrosis"]) == "Absent"


def test_the_most_certain_findings_are_ranked_on_the_normalised_margin() -> None:
    result = _result()
    findings = result.nodules[0].findings(result.model.reliability)
    ranked = [f.column for f in most_certain(findings, 5)]
    # raw probability would put pleural attachment (0.64) before margins (0.56)
    assert ranked == ["nodule_margins", "necrosis", "pleural_attachment"]
    assert [f.column for f in top_findings(result, result.nodules[0])] == [
        "nodule_margins",
        "pleural_attachment",
    ]


def test_the_console_table_shows_the_most_certain_findings_and_the_indeterminate_count() -> None:
    table = results_table(_result())
    row = table.splitlines()[1]
    assert (
        "nodule margins: Lobulated (0.56); necrosis: Absent (0.70); pleural attachment: Present (0.64)" in row
    )
    assert "2 of 5 indeterminate" in row
    assert "cavitation" not in row
    assert "no finding" not in results_table(_result(RELIABILITY.with_confidence(0.99, list(SEMANTIC))))
    assert "5 of 5 indeterminate" in results_table(_result(RELIABILITY.with_confidence(0.99, list(SEMANTIC))))
