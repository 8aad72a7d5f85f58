"""The README's deploy-app command runs as written, against the demo model that ships in the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import deploy_app.__main__ as cli
from conftest import REPO_ROOT
from demo.study import write_demo_study

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

PREFIX = ".venv/bin/python -m deploy_app "


def readme_app_commands() -> list[list[str]]:
    """Every ``python -m deploy_app`` line of the README's bash blocks that names real folders."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith(PREFIX)]
    return [shlex.split(line[len(PREFIX) :]) for line in lines if "STUDY_FOLDER" not in line]


def test_the_readme_shows_the_demo_model_command() -> None:
    assert any("bundle/models/demo" in arguments for arguments in readme_app_commands())


@pytest.mark.parametrize("arguments", readme_app_commands(), ids=" ".join)
def test_a_readme_command_runs(arguments: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a folder holding what ``make demo`` leaves (demo_output/input) and the repository's bundle."""
    write_demo_study(tmp_path / "demo_output" / "input", n_nodules=1)
    (tmp_path / "bundle").symlink_to(REPO_ROOT / "bundle")
    monkeypatch.chdir(tmp_path)

    assert cli.main(arguments) == cli.EXIT_OK
    output = tmp_path / arguments[arguments.index("-o") + 1]
    (series,) = output.iterdir()
    assert sorted(p.name for p in series.iterdir()) == [
        "nodule_1_sc.dcm",
        "report.pdf",
        "report_pdf.dcm",
        "sr.dcm",
    ]
