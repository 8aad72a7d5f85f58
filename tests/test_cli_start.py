"""The command lines answer ``--help`` and a bad argument before loading MONAI, torch or highdicom."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

HEAVY = ("torch", "monai", "highdicom", "holoscan", "open_clip")

#: Runs a CLI's argument parsing in a fresh interpreter and prints which heavy packages it loaded.
PROBE = """
import json, sys
sys.argv = [{module!r}, *{argv!r}]
try:
    {call}
except SystemExit as stop:
    code = stop.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""

CASES = {
    "deploy_app --help": (
        "deploy_app",
        "from deploy_app.__main__ import parse_args; parse_args()",
        ["--help"],
        0,
    ),
    "deploy_app bad argument": (
        "deploy_app",
        "from deploy_app.__main__ import main; main()",
        ["--max-seeds", "0", "-i", "x", "-o", "y", "-m", "z"],
        2,
    ),
    "deploy_app missing input": ("deploy_app", "from deploy_app.__main__ import main; main()", [], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_arguments_are_parsed_before_the_heavy_imports(case: str) -> None:
    module, call, argv, expected_code = CASES[case]
    code = PROBE.format(module=module, argv=argv, call=call, heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HOLOSCAN_INPUT_PATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"code": expected_code, "heavy": []}, result.stderr[-2000:]
