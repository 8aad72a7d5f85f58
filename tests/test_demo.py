"""``make demo``: a phantom DICOM study through the deploy app and the demo model to an SR and a report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from deploy_app.sr_reader import read_measurement_report


@pytest.mark.slow
def test_demo_runs_end_to_end_with_the_committed_demo_model(tmp_path: Path) -> None:
    output = tmp_path / "demo_output"
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--output", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("DEMO MODEL: a tiny CLIP trained on synthetic CT phantoms") == 2
    assert "5 calibrated folds" in result.stdout
    reports = list((output / "results").glob("*/sr.dcm"))
    assert len(reports) == 1
    nodules = read_measurement_report(reports[0])
    assert [n.label for n in nodules] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    for nodule in nodules:
        assert nodule.label in result.stdout and f"{nodule.malignancy:.3f}" in result.stdout
    assert (reports[0].parent / "report.pdf").read_bytes().startswith(b"%PDF")
    assert "Traceback" not in result.stderr
