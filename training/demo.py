"""``make demo``: the bundle's inference on a synthetic CT with an UNTRAINED tiny model.

Writes a phantom CT with three nodules, a randomly initialised tiny network, runs the bundle's
``inference.json`` (seed -> ROI -> nine planes -> network -> zero-shot findings) and its export,
and prints a table. The numbers show the pipeline works end to end; they mean nothing clinically.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
import torch
from monai.bundle import ConfigParser

from training.bundle_path import use_bundle
from training.synthetic import write_synthetic_cohort

BUNDLE = use_bundle()
from scripts.errors import exit_on_user_error  # noqa: E402
from scripts.network import SemanticCLIP  # noqa: E402
from scripts.vocabulary import FEATURE_BY_COLUMN  # noqa: E402

MODEL_NAME = "lnsc-tiny-vit"
SHOWN_FEATURES = ("nodule_consistency", "nodule_margins", "nodule_shape", "pleural_attachment")
BANNER = "UNTRAINED DEMO MODEL (random weights): outputs are meaningless. Research use only."


def top_findings(row: pd.Series) -> str:
    findings = []
    for column in SHOWN_FEATURES:
        values = {v.name: row[f"{column}={v.name}"] for v in FEATURE_BY_COLUMN[column].values}
        name, probability = max(values.items(), key=lambda item: item[1])
        findings.append(f"{FEATURE_BY_COLUMN[column].title}: {name} ({probability:.2f})")
    return "; ".join(findings)


@exit_on_user_error
def run_demo(output_dir: Path) -> pd.DataFrame:
    """Build the synthetic study, run bundle inference and export; returns the predictions."""
    data_dir = output_dir / "data"
    cohort = pd.read_csv(write_synthetic_cohort(data_dir, n_patients=1, nodules_per_patient=3, seed=7))
    seeds_csv = data_dir / "seeds.csv"
    cohort.drop(columns=["malignant"]).to_csv(seeds_csv, index=False)

    torch.manual_seed(0)
    checkpoint = output_dir / "models" / "untrained.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(SemanticCLIP(MODEL_NAME, tuning="lora").state_dict(), checkpoint)

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    parser.update(
        {
            "bundle_root": str(output_dir),
            "model_name": MODEL_NAME,
            "checkpoint": str(checkpoint),
            "dataset_csv": str(seeds_csv),
            "output_csv": str(output_dir / "predictions.csv"),
            "num_workers": 0,
        }
    )
    parser.get_parsed_content("evaluator").run()
    parser.get_parsed_content("export")
    return pd.read_csv(output_dir / "predictions.csv").merge(cohort, on=["pid", "nodule_id"])


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--output", type=Path, default=Path("demo_output"))
    args = arguments.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print(BANNER)
    predictions = run_demo(args.output)
    print(f"\n{'nodule':<10} {'seed LPS (mm)':<28} {'P(malignant)':>12}  top zero-shot findings")
    for _, row in predictions.iterrows():
        position = f"({row.coordX:.1f}, {row.coordY:.1f}, {row.coordZ:.1f})"
        nodule = f"{row.pid}/{row.nodule_id}"
        print(f"{nodule:<10} {position:<28} {row.malignancy_probability:>12.3f}  {top_findings(row)}")
    print(f"\n{BANNER}")
    print(f"Predictions: {args.output / 'predictions.csv'}")
    print(f"Exported model: {args.output / 'models' / 'model.ts'}")


if __name__ == "__main__":
    main()
