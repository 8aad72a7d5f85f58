"""Report text: deterministic template, Impression extraction, seeded augmentation, report files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from scripts.errors import UserInputError
from scripts.report_text import ReportText, ReportTextd, impression, make_report, read_report_file
from scripts.vocabulary import FEATURES

SEMANTICS = {
    "nodule_margin_conspicuity": "Poorly marginated",
    "nodule_margins": "Spiculated/Serrated",
    "additional_nodule_margins": "Lobulated",
    "nodule_shape": "Complex/Irregular",
    "nodule_consistency": "Part-solid",
    "pleural_attachment": "Present",
    "pleural_retraction": "Present",
    "cavitation": "Absent",
    "necrosis": "",
}
SIZES = {
    "longest_axial_diameter_(mm)": 12.34,
    "short_diameter_(mm)": 8.1,
    "mean_diameter": 10.2,
    "psn_longest_diameter_solid_component": math.nan,
}


def _item(**overrides: object) -> dict:
    item = {
        "semantics": {f.column: SEMANTICS.get(f.column, "") for f in FEATURES},
        "sizes": dict(SIZES),
        "suspicion": "High",
        "report": "",
    }
    item.update(overrides)
    return item


def test_report_is_deterministic() -> None:
    assert make_report(SEMANTICS, SIZES, "High") == make_report(dict(SEMANTICS), dict(SIZES), "High")


def test_report_structure_and_content() -> None:
    text = make_report(SEMANTICS, SIZES, "High")
    findings, imp = text.split("\nImpression: ")
    assert findings.startswith("Findings:\n- ")
    assert "spiculated margins" in findings.lower()
    assert "measures 12.3 x 8.1 mm (mean 10.2 mm)" in findings
    assert "Level of suspicion for lung cancer: High." in findings
    assert imp == (
        "Part-solid, poorly marginated nodule with spiculated and partly lobulated margins, "
        "irregular shape, measuring 10.2 mm, with pleural attachment. It shows pleural retraction. "
        "No cavitation."
    )


def test_findings_follow_feature_order() -> None:
    lines = make_report(SEMANTICS)
    order = [
        lines.index(p) for p in ("Poorly marginated", "Spiculated margins", "Part-solid", "No cavitation")
    ]
    assert order == sorted(order)


@pytest.mark.parametrize("missing", [None, "", "  ", math.nan])
def test_missing_values_are_skipped(missing: object) -> None:
    semantics = {"nodule_consistency": "Solid", "cavitation": missing}
    text = make_report(semantics)
    assert "cavitation" not in text.lower()
    assert impression(text) == "Solid nodule."


def test_empty_semantics_still_give_text() -> None:
    assert impression(make_report({})) == "Pulmonary nodule."


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ({"longest_axial_diameter_(mm)": 12.34, "short_diameter_(mm)": 8.06}, "measures 12.3 x 8.1 mm."),
        ({"longest_axial_diameter_(mm)": 7.0}, "measures 7.0 mm."),
        ({"mean_diameter": 6.25}, "measures 6.2 mm in mean diameter."),
        ({"psn_longest_diameter_solid_component": 4.0}, "solid component measures 4.0 mm."),
        (
            {"longest_axial_diameter_(mm)": 9.0, "psn_longest_diameter_solid_component": 4.0},
            "measures 9.0 mm; solid component 4.0 mm.",
        ),
    ],
)
def test_sizes_formatted(sizes: dict, expected: str) -> None:
    assert expected in make_report({}, sizes)


def test_suspicion_only_when_given() -> None:
    assert "suspicion" not in make_report(SEMANTICS, None, None).lower()
    assert "suspicion" not in make_report(SEMANTICS, None, "").lower()


def test_unknown_semantic_value_raises() -> None:
    with pytest.raises(UserInputError, match="nodule_shape"):
        make_report({"nodule_shape": "Star"})


def test_impression_mentions_every_known_feature() -> None:
    semantics = {f.column: f.value_names()[0] for f in FEATURES}
    imp = impression(make_report(semantics)).lower()
    for feature in FEATURES:
        value = feature.values[0]
        key = feature.noun if feature.is_present_absent else value.impression_phrase
        assert key.lower() in imp, feature.column
    assert imp.index("solid") < imp.index("well-marginated") < imp.index("smooth") < imp.index("round")
    assert imp.index("round") < imp.index("pleural attachment") < imp.index("reticulation")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Findings:\n- a.\nImpression: Solid nodule.", "Solid nodule."),
        ("FINDINGS: x\nIMPRESSION:  Two\n lines. ", "Two lines."),
        ("No header at all.", "No header at all."),
    ],
)
def test_impression_extraction(text: str, expected: str) -> None:
    assert impression(text) == expected


def test_prob_zero_gives_deterministic_text() -> None:
    transform = ReportText(prob=0.0, word_crop_prob=0.5)
    transform.set_random_state(3)
    expected = impression(make_report(SEMANTICS, SIZES, "High"))
    assert all(transform(SEMANTICS, SIZES, "High") == expected for _ in range(5))
    full = ReportText(prob=0.0, impression_only=False)
    assert full(SEMANTICS, SIZES, "High") == make_report(SEMANTICS, SIZES, "High")


def _texts(seed: int, n: int = 8, **kwargs: object) -> list[str]:
    transform = ReportTextd(prob=1.0, **kwargs)  # type: ignore[arg-type]
    transform.set_random_state(seed)
    return [transform(_item())["text"] for _ in range(n)]


def test_augmentation_reproducible_with_same_seed() -> None:
    assert _texts(7) == _texts(7)
    assert _texts(7, impression_only=False) == _texts(7, impression_only=False)


def test_augmentation_differs_with_other_seed() -> None:
    assert _texts(7) != _texts(8)


def test_augmentation_changes_text() -> None:
    deterministic = impression(make_report(SEMANTICS, SIZES, "High"))
    assert any(text != deterministic for text in _texts(0))


def test_augmentation_swaps_synonyms_and_shuffles_bullets() -> None:
    texts = _texts(1, n=20, word_crop_prob=0.0, impression_only=False)
    joined = " ".join(texts).lower()
    assert any(word in joined for word in ("border", "boundar", "lesion", "adhesion"))
    bullet_orders = {tuple(line for line in t.split("\n") if line.startswith("- "))[:2] for t in texts}
    assert len(bullet_orders) > 1


def test_word_crop_drops_words() -> None:
    transform = ReportText(prob=1.0, word_crop_prob=0.5)
    transform.set_random_state(0)
    full = len(impression(make_report(SEMANTICS, SIZES)).split())
    lengths = [len(transform(SEMANTICS, SIZES).split()) for _ in range(10)]
    assert min(lengths) < full and min(lengths) >= 1


def test_crop_never_empties_text() -> None:
    transform = ReportText(prob=1.0, word_crop_prob=1.0)
    transform.set_random_state(0)
    assert transform({"nodule_consistency": "Solid"}).strip()


def test_prob_half_mixes() -> None:
    transform = ReportTextd(prob=0.5)
    transform.set_random_state(0)
    deterministic = impression(make_report(SEMANTICS, SIZES, "High"))
    flags = [transform(_item())["text"] == deterministic for _ in range(40)]
    assert any(flags) and not all(flags)


def test_report_text_used_when_given() -> None:
    transform = ReportTextd()
    given = "Findings:\n- Something.\nImpression: Given impression text."
    out = transform(_item(report=given))
    assert out["text"] == "Given impression text."
    assert transform(_item(report="  "))["text"] == impression(make_report(SEMANTICS, SIZES, "High"))


def test_dict_transform_keeps_item_and_writes_output_key() -> None:
    item = _item()
    out = ReportTextd(output_key="caption", impression_only=False)(item)
    assert "caption" in out and "caption" not in item
    assert out["caption"].startswith("Findings:")
    assert out["semantics"] is item["semantics"]


def test_bad_probabilities_rejected() -> None:
    with pytest.raises(UserInputError):
        ReportText(prob=1.5)
    with pytest.raises(UserInputError):
        ReportTextd(word_crop_prob=-0.1)


def test_read_report_file(tmp_path: Path) -> None:
    (tmp_path / "007_2.txt").write_text("  Impression: Solid nodule.\n", encoding="utf-8")
    (tmp_path / "007_3.txt").write_text("   \n", encoding="utf-8")
    assert read_report_file(tmp_path, "007", "2") == "Impression: Solid nodule."
    assert read_report_file(tmp_path, "007", "3") is None
    assert read_report_file(tmp_path, "007", "9") is None
    with pytest.raises(UserInputError, match="report folder"):
        read_report_file(tmp_path / "nope", "007", "2")
