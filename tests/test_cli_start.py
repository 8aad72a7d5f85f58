"""The command lines answer ``--help``, a bad argument and a missing input path before the heavy imports.

Each case runs a CLI's entry point in a fresh interpreter and checks its exit code and that none of
:data:`HEAVY` got imported (which packages load, not how long they take: timings on a shared machine
are noise). Paths under ``no-such/`` do not exist; ``bundle``, ``bundle/models/demo`` (the demo model
set) and ``docs`` do (relative to the repository root, where the cases run); ``{cohort}`` stands for a
valid two-nodule cohort CSV, so that the case's error is the only one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import REPO_ROOT

#: Seconds to import each: torch, MONAI, open_clip, highdicom, holoscan, matplotlib, scikit-learn,
#: pylidc (with scikit-image and matplotlib).
HEAVY = ("torch", "monai", "highdicom", "holoscan", "open_clip", "matplotlib", "sklearn", "pylidc", "skimage")

#: Runs a CLI's argument parsing in a fresh interpreter and prints which heavy packages it loaded.
PROBE = """
import json, sys
sys.argv = [{module!r}, *{argv!r}]
code = None
try:
    {call}
except SystemExit as stop:
    code = stop.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""

HELP, USAGE, USER_ERROR = 0, 2, 2  # argparse exits 2 on usage errors; exit_on_user_error exits 2 too


class Case(NamedTuple):
    module: str
    call: str
    argv: list[str]
    code: int
    says: str = ""
    """Text the standard error must hold (the user error's message)."""


def _main(module: str) -> str:
    return f"from {module} import main; main()"


CROSSVAL, EVALUATE, IMPORT = "training.crossval", "training.evaluate", "training.import_reference"
LIDC, PHANTOMS, SPLITS, VALIDATE = (
    "training.lidc",
    "training.phantoms",
    "training.splits",
    "training.validate_cohort",
)
PACS = "deploy_app.pacs"

#: ``{cohort}``: a valid cohort CSV (its images are not read before the split folder is).
COHORT = (
    "pid,nodule_id,image_path,coordX,coordY,coordZ,malignant\n"
    "P1,1,p1.nii.gz,0,0,0,0\n"
    "P2,1,p2.nii.gz,0,0,0,1\n"
)
EVALUATE_PATHS = ["--cohort", "no-such/cohort.csv", "--split-dir", "no-such/splits", "--out", "no-such/out"]

CASES = {
    "deploy_app --help": Case(
        "deploy_app", "from deploy_app.__main__ import parse_args; parse_args()", ["--help"], HELP
    ),
    "deploy_app bad argument": Case(
        "deploy_app",
        "from deploy_app.__main__ import main; main()",
        ["--max-seeds", "0", "-i", "x", "-o", "y", "-m", "z"],
        USAGE,
    ),
    "deploy_app missing input": Case("deploy_app", "from deploy_app.__main__ import main; main()", [], USAGE),
    "crossval --help": Case(CROSSVAL, _main(CROSSVAL), ["--help"], HELP),
    "crossval bad argument": Case(
        CROSSVAL, _main(CROSSVAL), ["--epochs", "x", "--cohort", "c", "--split-dir", "s", "--out", "o"], USAGE
    ),
    "crossval missing cohort": Case(
        CROSSVAL,
        _main(CROSSVAL),
        ["--cohort", "no-such/cohort.csv", "--split-dir", "no-such/splits", "--out", "no-such/out"],
        USER_ERROR,
        "cohort.csv' does not exist or is not a file",
    ),
    "evaluate --help": Case(EVALUATE, _main(EVALUATE), ["--help"], HELP),
    "evaluate bad argument": Case(EVALUATE, _main(EVALUATE), ["--subset", "train", *EVALUATE_PATHS], USAGE),
    "evaluate missing bundle": Case(
        EVALUATE,
        _main(EVALUATE),
        ["--bundle", "no-such/bundle", *EVALUATE_PATHS],
        USER_ERROR,
        "bundle folder 'no-such/bundle' does not exist or is not a folder",
    ),
    "evaluate missing predictions": Case(
        EVALUATE,
        _main(EVALUATE),
        ["--predictions", "no-such/predictions.csv", *EVALUATE_PATHS],
        USER_ERROR,
        "predictions file 'no-such/predictions.csv' does not exist",
    ),
    "evaluate missing cohort": Case(
        EVALUATE,
        _main(EVALUATE),
        ["--bundle", "bundle/models/demo", *EVALUATE_PATHS],
        USER_ERROR,
        "cohort CSV 'no-such/cohort.csv' does not exist or is not a file",
    ),
    "evaluate missing split folder": Case(
        EVALUATE,
        _main(EVALUATE),
        ["--bundle", "bundle/models/demo", *EVALUATE_PATHS[:1], "{cohort}", *EVALUATE_PATHS[2:]],
        USER_ERROR,
        "split folder 'no-such/splits' does not exist",
    ),
    "import_reference --help": Case(IMPORT, _main(IMPORT), ["--help"], HELP),
    "import_reference bad argument": Case(
        IMPORT, _main(IMPORT), ["no-such/ckpt", "--out", "no-such/out", "--folds", "0,x"], USAGE
    ),
    "import_reference missing checkpoint folder": Case(
        IMPORT, _main(IMPORT), ["no-such/ckpt", "--out", "no-such/out"], USER_ERROR, "is not a folder"
    ),
    "import_reference folder without args.txt": Case(
        IMPORT, _main(IMPORT), ["docs", "--out", "no-such/out"], USER_ERROR, "args.txt not found"
    ),
    "lidc --help": Case(LIDC, _main(LIDC), ["--help"], HELP),
    "lidc bad argument": Case(LIDC, _main(LIDC), ["--limit-scans", "x"], USAGE),
    "lidc missing dicom root": Case(
        LIDC,
        _main(LIDC),
        ["--dicom-root", "no-such/dicom", "--out", "no-such/lidc.csv"],
        USER_ERROR,
        "--dicom-root no-such/dicom is not a folder",
    ),
    "phantoms --help": Case(PHANTOMS, _main(PHANTOMS), ["--help"], HELP),
    "phantoms bad argument": Case(PHANTOMS, _main(PHANTOMS), ["--format", "jpeg"], USAGE),
    "phantoms missing LIDC table": Case(
        PHANTOMS,
        _main(PHANTOMS),
        ["--lidc-table", "no-such/lidc.csv", "--out", "no-such/phantoms"],
        USER_ERROR,
        "no-such/lidc.csv",
    ),
    "splits --help": Case(SPLITS, _main(SPLITS), ["--help"], HELP),
    "splits bad argument": Case(SPLITS, _main(SPLITS), ["no-such/cohort.csv", "--folds", "x"], USAGE),
    "splits missing cohort": Case(
        SPLITS,
        _main(SPLITS),
        ["no-such/cohort.csv"],
        USER_ERROR,
        "cohort CSV 'no-such/cohort.csv' does not exist",
    ),
    "validate_cohort --help": Case(VALIDATE, _main(VALIDATE), ["--help"], HELP),
    "validate_cohort bad argument": Case(
        VALIDATE, _main(VALIDATE), ["no-such/cohort.csv", "--fold", "x"], USAGE
    ),
    "validate_cohort missing cohort": Case(
        VALIDATE,
        _main(VALIDATE),
        ["no-such/cohort.csv", "--split-dir", "no-such/splits"],
        USER_ERROR,
        "cohort CSV 'no-such/cohort.csv' does not exist",
    ),
    "pacs --help": Case(PACS, _main(PACS), ["--help"], HELP),
    "pacs bad argument": Case(
        PACS, _main(PACS), ["--model", "bundle", "--work-dir", "no-such/work", "--port", "x"], USAGE
    ),
    "pacs missing model": Case(
        PACS,
        _main(PACS),
        ["--model", "no-such/bundle", "--work-dir", "no-such/work"],
        USER_ERROR,
        "--model 'no-such/bundle' is not a folder",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_arguments_are_parsed_before_the_heavy_imports(case: str, tmp_path: Path) -> None:
    module, call, argv, expected_code, says = CASES[case]
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(COHORT)
    argv = [str(cohort) if argument == "{cohort}" else argument for argument in argv]
    code = PROBE.format(module=module, argv=argv, call=call, heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HOLOSCAN_INPUT_PATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"code": expected_code, "heavy": []}, result.stderr[-2000:]
    assert says in result.stderr, result.stderr[-2000:]
    assert not (REPO_ROOT / "no-such").exists()  # a refused input leaves nothing behind
