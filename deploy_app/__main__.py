"""``python -m deploy_app -i IN -o OUT -m BUNDLE`` (or HOLOSCAN_INPUT_PATH/OUTPUT_PATH/MODEL_PATH).

Exit codes:
    0  every selected CT series was analysed; an SR and a report were written for each.
    2  nothing was analysed: a usage or input problem (the message names the file, tag or folder).
    3  some series were analysed, others failed (each failure is logged with its reason).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Holoscan's C++ runtime logs every graph step at INFO; keep its warnings only (before it is imported).
os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")

from deploy_app.limits import MAX_SEEDS_PER_SERIES

EXIT_OK, EXIT_INPUT, EXIT_PARTIAL = 0, 2, 3
_ENV = {"input": "HOLOSCAN_INPUT_PATH", "output": "HOLOSCAN_OUTPUT_PATH", "model": "HOLOSCAN_MODEL_PATH"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy_app",
        description="Lung nodule malignancy and semantic findings: DICOM CT in, TID 1500 SR + PDF out.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", type=Path, help=f"input folder (default ${_ENV['input']})")
    parser.add_argument("-o", "--output", type=Path, help=f"output folder (default ${_ENV['output']})")
    parser.add_argument("-m", "--model", type=Path, help=f"bundle folder (default ${_ENV['model']})")
    parser.add_argument(
        "--max-seeds",
        type=int,
        default=MAX_SEEDS_PER_SERIES,
        help=f"most seeds analysed per series; more fail the series (default {MAX_SEEDS_PER_SERIES})",
    )
    parser.add_argument(
        "--finding-confidence",
        type=float,
        metavar="P",
        help="report a semantic finding as a value only from this probability on, for every feature "
        "(default: the thresholds recorded with the model, else 0.6); below it: indeterminate",
    )
    parser.add_argument(
        "-l", "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    if args.max_seeds < 1:
        parser.error("--max-seeds must be at least 1")
    if args.finding_confidence is not None and not 0.0 < args.finding_confidence <= 1.0:
        parser.error("--finding-confidence must be a probability in (0, 1]")
    for name, variable in _ENV.items():
        if getattr(args, name) is None:
            value = os.environ.get(variable)
            if not value:
                parser.error(f"--{name} is required (or set {variable})")
            setattr(args, name, Path(value))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # first: --help and a bad argument answer before MONAI and torch load
    from deploy_app.app import process_folder
    from deploy_app.findings import results_table
    from scripts.errors import UserInputError, user_message

    # The SDK operators log each matching step on the root logger: show only warnings from them.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("deploy_app").setLevel(args.log_level)
    # ... except the loader's notes on ignored files and dropped duplicate slices, which change inputs.
    logging.getLogger("monai.deploy.operators.dicom_data_loader_operator").setLevel(logging.INFO)
    try:
        outcome = process_folder(
            args.input,
            args.output,
            args.model,
            max_seeds=args.max_seeds,
            finding_confidence=args.finding_confidence,
        )
    except UserInputError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return EXIT_INPUT
    for failure in outcome.failures:
        print(f"error: {failure.series}: {failure.message}", file=sys.stderr)
    for series, files in outcome.written.items():
        result = outcome.results[series]
        print(f"\nseries {series} ({result.model.name} {result.model.version}, {result.model.folds} fold(s))")
        if result.model.untrained_demo:
            print("UNTRAINED DEMO MODEL: the numbers below mean nothing. Research use only.")
        print(results_table(result))
        print(f"written to {files[0].parent}: " + ", ".join(f.name for f in files))
    if not outcome.written:
        return EXIT_INPUT
    return EXIT_PARTIAL if outcome.failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
