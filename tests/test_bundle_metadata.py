"""The bundle metadata: valid against the shipped (offline) MONAI schema, consistent with the code."""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import socket
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
CONFIGS = BUNDLE_ROOT / "configs"
META_FILE = CONFIGS / "metadata.json"
SCHEMA_NAME = "meta_schema_20240725.json"
SCHEMA_FILE = CONFIGS / "schema" / SCHEMA_NAME
# md5 of the schema as published (MONAI-extra-test-data release 0.8.1, mirrored verbatim at
# https://project-monai.github.io/schema/meta_schema_20240725.json): a local edit shows up here.
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def _metadata() -> dict:
    return json.loads(META_FILE.read_text())


def _semver_key(text: str) -> tuple[int, int, int]:
    match = SEMVER.match(text)
    assert match, f"not a semantic version: {text!r}"
    return tuple(int(part) for part in match.groups())  # type: ignore[return-value]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test (the schema must come from the bundle)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_schema_is_the_published_one() -> None:
    meta = _metadata()
    assert meta["schema"].endswith("/" + SCHEMA_NAME)
    assert hashlib.md5(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_MD5


def test_verify_metadata_offline(no_network: None) -> None:
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(META_FILE), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5)


def test_verify_metadata_rejects_invalid(no_network: None, tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    broken = _metadata()
    del broken["network_data_format"]
    broken_file = tmp_path / "metadata.json"
    broken_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken_file), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5)


def test_version_is_latest_changelog_entry() -> None:
    meta = _metadata()
    assert meta["name"] == "lung_nodule_ct_semantic_clip"
    keys = list(meta["changelog"])
    assert keys, "changelog is empty"
    for key in keys:
        _semver_key(key)
    latest = max(keys, key=_semver_key)
    assert meta["version"] == latest
    assert keys[0] == latest, "the newest changelog entry comes first"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, pinned = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = pinned.strip()
    return pins


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _check_version(package: str, recorded: str, pins: dict[str, str]) -> str | None:
    key = re.sub(r"[-_.]+", "-", package.lower())
    installed = _installed(package)
    if installed is None:
        return f"{package} is not installed"
    installed = installed.split("+", 1)[0]
    if key in pins:  # pinned: metadata, requirements.txt and the environment agree exactly
        if not (recorded == pins[key] == installed):
            return f"{package}: metadata {recorded}, requirements.txt {pins[key]}, installed {installed}"
    elif recorded.split(".")[:2] != installed.split(".")[:2]:  # unpinned: same minor release
        return f"{package}: metadata {recorded}, installed {installed}"
    return None


def test_versions_match_requirements_and_environment() -> None:
    meta = _metadata()
    pins = _pins()
    recorded = {
        "monai": meta["monai_version"],
        "torch": meta["pytorch_version"],
        "numpy": meta["numpy_version"],
    }
    recorded.update(meta["required_packages_version"])
    recorded.update(meta.get("optional_packages_version", {}))
    problems = [p for name, v in recorded.items() if (p := _check_version(name, v, pins))]
    assert not problems, "; ".join(problems)


def test_no_claimed_metrics() -> None:
    """No trained model is published: the metadata must not carry scores."""

    def numbers(value: object) -> list[float]:
        if isinstance(value, bool):
            return []
        if isinstance(value, int | float):
            return [value]
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in numbers(v)]
        return []

    meta = _metadata()
    assert numbers(meta.get("eval_metrics", {})) == []
    # the only shipped weights are the synthetic-data demo model: no eval_metrics are claimed
    assert "synthetic CT phantoms" in meta["description"]
    assert "No model trained on patient data is published" in meta["description"]
    assert meta["intended_use"].startswith("Research only; not for clinical use")


def test_network_data_format_matches_code() -> None:
    from scripts.export import PLANES_SHAPE
    from scripts.zero_shot import PromptLayout

    fmt = _metadata()["network_data_format"]
    image = fmt["inputs"]["image"]
    assert (image["num_channels"], *image["spatial_shape"]) == tuple(PLANES_SHAPE)
    assert image["dtype"] == "float32" and image["modality"] == "CT"
    assert [str(i) for i in range(9)] == [k for k in image["channel_def"] if k.isdigit()]

    outputs = fmt["outputs"]
    assert outputs["pred"]["num_channels"] == 2
    assert outputs["pred"]["value_range"] == [0, 1]
    assert set(outputs["pred"]["channel_def"]) == {"0", "1"}
    assert outputs["semantic"]["num_channels"] == len(PromptLayout().columns)
    assert outputs["attention"]["num_channels"] == 9
    assert outputs["embedding"]["num_channels"] == 256


def test_logging_conf() -> None:
    parser = configparser.ConfigParser()
    assert parser.read(CONFIGS / "logging.conf")
    assert parser["logger_root"]["level"] == "INFO"
    assert parser["logger_root"]["handlers"] == "consoleHandler"
    assert parser["handler_consoleHandler"]["class"] == "StreamHandler"


@pytest.mark.parametrize("path", [BUNDLE_ROOT / "LICENSE", REPO_ROOT / "LICENSE"], ids=["bundle", "top"])
def test_license_is_apache(path: Path) -> None:
    text = path.read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_model_card_reports_the_measured_demo_metrics() -> None:
    card = (BUNDLE_ROOT / "docs" / "README.md").read_text()
    assert "Research only; not for clinical use" in card
    assert "on synthetic data" in card and "arXiv:2504.21344" in card
    metrics = pd.read_csv(BUNDLE_ROOT / "docs" / "demo_model" / "metrics.csv").set_index("predictor")
    for predictor in ("model", "model_calibrated", "baseline_size", "baseline_semantic"):
        row = metrics.loc[predictor]
        for name in ("auroc", "auprc"):
            shown = f"{row[name]:.3f} [{row[name + '_low']:.3f}, {row[name + '_high']:.3f}]"
            assert shown in card, f"{predictor} {name} {shown} not in the model card"
