"""``make demo`` at this stage: bundle inference and export on a synthetic study, clearly untrained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import REPO_ROOT


def test_demo_runs_end_to_end_and_says_it_is_untrained(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.demo", "--output", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("UNTRAINED DEMO MODEL") == 2
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == 3
    assert (tmp_path / "models" / "model.ts").is_file()
    for row in predictions.itertuples():
        assert f"{row.pid}/{row.nodule_id}" in result.stdout
