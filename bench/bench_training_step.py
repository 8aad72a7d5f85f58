"""How much the bundle's data loading adds to a ViT-B-32 LoRA training step (4 nodules = 36 planes).

Both timings come from ``configs/train.json`` as ``monai.bundle`` parses it (random weights):

- baseline: the trainer's step (prepare_batch, forward, loss, backward, AdamW) on batches made
  once beforehand and replayed;
- with loading: the same steps fed by the config's DataLoader (cached ROIs, augmentation, nine
  planes, normalisation, report text), timed end to end per iteration.

Medians over interleaved rounds, so both see the same machine load. Run: ``make bench``.
"""

from __future__ import annotations

import argparse
import tempfile
from itertools import cycle, islice
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from benchlib import REPO, StageTimes
from training.synthetic import write_synthetic_cohort

BUNDLE = REPO / "bundle"


def parse_training_config(data_dir: Path, model_name: str, num_workers: int) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update(
        {
            "bundle_root": str(data_dir / "run"),
            "dataset_csv": str(data_dir / "cohort.csv"),
            "split_dir": str(data_dir / "splits"),
            "model_name": model_name,
            "pretrained": "none",
            "num_workers": num_workers,
            "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        }
    )
    return parser


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--model-name", default="ViT-B-32")
    arguments.add_argument("--rounds", type=int, default=5)
    arguments.add_argument("--steps", type=int, default=4, help="training steps per round and mode")
    arguments.add_argument("--num-workers", type=int, default=2)
    args = arguments.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        write_synthetic_cohort(data_dir, n_patients=12, nodules_per_patient=2, seed=0)
        parser = parse_training_config(data_dir, args.model_name, args.num_workers)
        trainer = parser.get_parsed_content("train#trainer")
        loader = parser.get_parsed_content("train#dataloader")
        device = parser.get_parsed_content("device")
        trainer.network.train()

        def step(batch: dict) -> None:
            trainer.state.batch = batch
            trainer._iteration(trainer, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()

        premade = list(islice(cycle(loader), args.steps))
        step(premade[0])  # warm-up: allocations, lazy init
        stages = StageTimes()
        for _ in range(args.rounds):
            for batch in premade:
                with stages("replayed"):
                    step(batch)
            iterator = iter(cycle(loader))
            next(iterator)  # start the workers outside the timing
            for _ in range(args.steps):
                with stages("loaded"):
                    step(next(iterator))

    medians = stages.medians()
    base, full = medians["replayed"], medians["loaded"]
    steps = len(stages.samples["replayed"]), len(stages.samples["loaded"])
    print(f"device {device}, model {args.model_name}, batch 4 nodules x 9 planes, workers {args.num_workers}")
    print(f"step on pre-made tensors: median {base * 1000:.0f} ms over {steps[0]} steps")
    print(f"step with data loading  : median {full * 1000:.0f} ms over {steps[1]} steps")
    print(f"loading adds {100 * (full / base - 1):+.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
