"""The project's outer contract: layout, pins, the two set-up commands, the CI entry point."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
MAKEFILE = REPO_ROOT / "Makefile"
CI_RUN = REPO_ROOT / ".ci" / "run"


@pytest.mark.parametrize(
    "path",
    ["bundle", "training", "tests", "requirements.txt", "README.md", "Makefile", ".ci/run", "LICENSE"],
)
def test_top_level_layout(path: str) -> None:
    assert (REPO_ROOT / path).exists(), f"{path} is missing from the repository root"


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower()
            pins[name] = line
    return pins


def test_torch_pins() -> None:
    pins = _requirements()
    assert pins["torch"] == "torch==2.14.1"
    assert pins["torchvision"] == "torchvision==0.29.1"


def _section(markdown: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_readme_quick_start_is_make_demo_and_make_test() -> None:
    section = _section(README.read_text(), "Quick start")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, re.M | re.S)
    assert len(blocks) == 1, "the quick start has exactly one code block"
    commands = [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert sorted(commands) == ["make demo", "make test"]


@pytest.mark.parametrize(
    "title",
    [
        "What it is",
        "Data",
        "Training",
        "Evaluation",
        "The authors' checkpoints",
        "Deploy application",
        "Export",
        "Using pretrained CLIP weights",
        "Tests",
        "Layout",
        "Semantic codes",
    ],
)
def test_readme_sections(title: str) -> None:
    assert _section(README.read_text(), title).strip()


def test_ci_run_is_executable_and_runs_make_test() -> None:
    mode = CI_RUN.stat().st_mode
    assert mode & stat.S_IXUSR, ".ci/run is not executable (chmod +x .ci/run)"
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text
    assert re.search(r"^\s*make test\s*$", text, re.M)
    assert re.search(r"^\s*make test-slow\s*$", text, re.M), "CI runs the slow tests too"


def test_ci_run_mode_in_git() -> None:
    """Git tracks the executable bit: .ci/run is committed as 100755 (CI runs a fresh clone)."""
    git = shutil.which("git")
    assert git is not None and (REPO_ROOT / ".git").exists(), "the suite runs in a git checkout"
    result = subprocess.run(
        [git, "ls-files", "-s", ".ci/run"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.strip(), ".ci/run is not tracked by git"
    assert result.stdout.split()[0] == "100755"


def _make_dry_run(*args: str) -> str:
    make = shutil.which("make")
    assert make is not None, "make is required: `make test` runs this suite"
    # Dry-run the Makefile's defaults, not the overrides of the `make` that may be running this test.
    overrides = {"RUFF", "VENV", "PYTHON", "PYTEST_ARGS", "STAMP"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k not in overrides}
    result = subprocess.run(
        [make, "--no-print-directory", "-n", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_venv_is_one_pip_install() -> None:
    """torch and torchvision resolve in the same pip command as everything else."""
    out = _make_dry_run("-W", "requirements.txt", ".venv/.installed")
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    installs = [ln for ln in lines if re.search(r"\bpip install\b", ln) and "--upgrade pip" not in ln]
    assert installs == [".venv/bin/pip install -r requirements.txt"]
    assert lines[0].endswith("-m venv .venv")
    assert lines[-1] == "touch .venv/.installed"


def test_make_targets() -> None:
    assert "-m demo" in _make_dry_run("-W", "requirements.txt", "demo")
    bench = _make_dry_run("bench")
    assert "bench/bench_preprocessing.py" in bench and "bench/bench_training_step.py" in bench
    test = _make_dry_run("test")
    assert "ruff check ." in test
    for needle in ("unshare -rn", "ip link set lo up", "HF_HUB_OFFLINE=1", "-m pytest -q tests"):
        assert needle in test, needle
    clean = _make_dry_run("clean")
    assert ".venv" not in clean.replace("-path ./.venv -prune", "")
    assert "rm -rf .venv" in _make_dry_run("distclean")


def test_orthanc_service_never_starts_on_install() -> None:
    text = MAKEFILE.read_text()
    assert "policy-rc.d" in text and "exit 101" in text
    assert "service orthanc stop" in text


def test_ruff_config() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert config["line-length"] == 110
    assert config["target-version"] == "py311"
    assert set(config["lint"]["select"]) == {"E", "F", "W", "I", "UP", "B", "SIM"}
    assert ".venv" in config.get("exclude", []) + config.get("extend-exclude", [])
