"""The bundle as a user runs it: ``python -m monai.bundle run`` train -> evaluate -> inference -> export.

One real training of the tiny model for two epochs on synthetic nodules, then every other workflow
on its checkpoint; the exported TorchScript must reproduce the eager predictor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE_ROOT, REPO_ROOT
from scripts.errors import find_user_error, user_message
from scripts.export import build_predictor, load_predictor
from scripts.network import SemanticCLIP
from scripts.zero_shot import PromptLayout
from training.synthetic import write_synthetic_cohort

TINY = ["--model_name", "lnsc-tiny-vit", "--num_workers", "0"]


def bundle_command(*args: str, cwd: Path = BUNDLE_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(BUNDLE_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort CSV with its splits beside it (``splits/``)."""
    return write_synthetic_cohort(
        tmp_path_factory.mktemp("cohort") / "data", n_patients=8, nodules_per_patient=2, seed=3
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("workflow")
    csv_path = cohort
    run_root = root / "run"
    result = bundle_command(
        "run", "--config_file", "configs/train.json", "--meta_file", "configs/metadata.json",
        "--bundle_root", str(run_root), "--dataset_csv", str(csv_path),
        "--split_dir", str(csv_path.parent / "splits"), "--pretrained", "none", "--epochs", "2", *TINY,
    )  # fmt: skip
    return {"root": run_root, "csv": csv_path, "output": result.stdout + result.stderr}


@pytest.mark.slow
def test_training_runs_two_epochs_and_keeps_both_best_checkpoints(trained: dict) -> None:
    models = trained["root"] / "models"
    assert (models / "best_auroc.pt").is_file()
    assert (models / "best_loss.pt").is_file()
    log = trained["output"]
    assert "Epoch[2] Complete" in log
    assert "val_zero_shot_auroc/nodule_margins" in log
    assert "trainable of" in log
    assert list((trained["root"] / "runs").glob("events.out.tfevents.*")), "no TensorBoard events written"
    state = torch.load(models / "best_loss.pt", map_location="cpu", weights_only=True)
    assert any("lora_A" in k for k in state)  # a single-entry save_dict is saved bare


@pytest.mark.slow
def test_an_interrupted_training_resumes_after_its_last_epoch(trained: dict, tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    shutil.copytree(trained["root"], run_root)
    state = torch.load(run_root / "models" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and len(state["savers"]) == 2 and state["early_stop"] is not None
    result = bundle_command(
        "run", "--config_file", "configs/train.json", "--meta_file", "configs/metadata.json",
        "--bundle_root", str(run_root), "--dataset_csv", str(trained["csv"]),
        "--split_dir", str(trained["csv"].parent / "splits"), "--pretrained", "none", "--epochs", "3", *TINY,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "after epoch 2" in log
    assert "Epoch[3] Complete" in log and "Epoch[1] Complete" not in log
    resumed = torch.load(run_root / "models" / "last.pt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 3
    before, after = state["early_stop"], resumed["early_stop"]
    improved = after["best_score"] > before["best_score"]
    assert after["counter"] == (0 if improved else before["counter"] + 1)  # the counter was restored


@pytest.mark.slow
def test_evaluate_writes_metrics(trained: dict) -> None:
    bundle_command(
        "run", "--config_file", "['configs/train.json','configs/evaluate.json']",
        "--meta_file", "configs/metadata.json", "--bundle_root", str(trained["root"]),
        "--dataset_csv", str(trained["csv"]), *TINY,
    )  # fmt: skip
    metrics = (trained["root"] / "eval" / "metrics.csv").read_text()
    for name in ("val_auroc", "val_auprc", "val_loss", "val_zero_shot_auroc"):
        assert name in metrics


@pytest.mark.slow
def test_inference_writes_one_row_per_seed(trained: dict) -> None:
    seeds = pd.read_csv(trained["csv"]).drop(columns=["malignant"])
    seeds_csv = trained["root"] / "seeds.csv"
    seeds.assign(image_path=[str(trained["csv"].parent / p) for p in seeds.image_path]).to_csv(
        seeds_csv, index=False
    )
    output = trained["root"] / "predictions.csv"
    bundle_command(
        "run", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
        "--bundle_root", str(trained["root"]), "--dataset_csv", str(seeds_csv),
        "--output_csv", str(output), *TINY,
    )  # fmt: skip
    predictions = pd.read_csv(output)
    assert len(predictions) == len(seeds)
    assert predictions["malignancy_probability"].between(0, 1).all()
    layout = PromptLayout()
    for feature in layout.features:
        columns = [f"{feature.column}={value.name}" for value in feature.values]
        assert predictions[columns].sum(axis=1).round(4).eq(1.0).all()


@pytest.mark.slow
def test_export_equals_eager_predictor(trained: dict) -> None:
    bundle_command(
        "run", "export", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
        "--bundle_root", str(trained["root"]), *TINY,
    )  # fmt: skip
    exported, layout = load_predictor(trained["root"] / "models" / "model.ts")
    assert layout["columns"] == PromptLayout().columns
    network = SemanticCLIP("lnsc-tiny-vit")
    eager = build_predictor(network, trained["root"] / "models" / "best_auroc.pt")
    for batch in (1, 3):
        assert not exported(torch.zeros(batch, 9, 3, 224, 224))["malignancy"].requires_grad
        planes = torch.randn(batch, 9, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected, actual = eager(planes), exported(planes)
        assert set(actual) == {"malignancy", "semantic", "embedding", "attention"}
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, atol=1e-5, rtol=0)
    keys = exported.state_dict().keys()
    assert not any("lora" in k or "q_proj" in k for k in keys)
    assert any(k.endswith("attn.in_proj_weight") for k in keys)


@pytest.mark.slow
def test_verify_net_in_out_passes(trained: dict) -> None:
    bundle_command(
        "verify_net_in_out", "malignancy_net", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json", "--model_name", "lnsc-tiny-vit", "--device", "cpu",
    )  # fmt: skip


@pytest.mark.slow
def test_multi_gpu_config_trains_with_two_gloo_processes(trained: dict, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", "29517", "-m", "monai.bundle", "run",
        "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
        "--meta_file", "configs/metadata.json", "--bundle_root", str(tmp_path),
        "--dataset_csv", str(trained["csv"]), "--split_dir", str(trained["csv"].parent / "splits"),
        "--pretrained", "none", "--epochs", "1", *TINY,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "models" / "best_auroc.pt").is_file()
    assert "Epoch[1] Complete" in result.stdout + result.stderr


def test_configs_only_wire_components() -> None:
    """No long ``$lambda`` logic in configs: expressions stay short."""
    for path in (BUNDLE_ROOT / "configs").glob("*.json"):
        text = json.dumps(json.loads(path.read_text()))
        assert "lambda" not in text, path.name
    assert (REPO_ROOT / "bundle" / "scripts").is_dir()


def _break_csv(csv_path: Path, target: Path, mistake: str) -> Path:
    frame = pd.read_csv(csv_path, dtype=str)
    frame["image_path"] = [str(csv_path.parent / p) for p in frame.image_path]
    if mistake == "unknown value":
        frame.loc[1, "nodule_margins"] = "Smoothish"
    elif mistake == "seed outside":
        frame.loc[0, "coordZ"] = "950.0"
    elif mistake == "missing image":
        frame.loc[0, "image_path"] = str(target.parent / "no_such_scan.nii.gz")
    elif mistake == "missing column":
        frame = frame.drop(columns=["coordY"])
    elif mistake == "empty":
        frame = frame.iloc[:0]
    frame.to_csv(target, index=False)
    return target


BAD_INPUT = {
    "unknown value": "line 3: column 'nodule_margins' has unknown value 'Smoothish'; allowed: Smooth",
    "seed outside": "lies outside the scan",
    "missing image": "no_such_scan.nii.gz",
    "missing column": "coordY",
    "empty": "no rows",
}


@pytest.mark.slow
def test_training_on_bad_input_prints_one_clear_error(trained: dict, tmp_path: Path) -> None:
    """The one subprocess case: what ``monai.bundle run`` prints, and its exit code."""
    bad_csv = _break_csv(trained["csv"], tmp_path / "cohort.csv", "unknown value")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(BUNDLE_ROOT)}
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
        "--meta_file", "configs/metadata.json", "--bundle_root", str(tmp_path / "run"),
        "--dataset_csv", str(bad_csv), "--split_dir", str(trained["csv"].parent / "splits"),
        "--pretrained", "none", "--epochs", "1", *TINY,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert BAD_INPUT["unknown value"] in result.stderr
    assert not list((tmp_path / "run").glob("models/*.pt")), "a checkpoint was written from bad input"


@pytest.mark.parametrize(("mistake", "message"), list(BAD_INPUT.items()), ids=list(BAD_INPUT))
def test_training_refuses_bad_input_before_training(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mistake: str, message: str
) -> None:
    """The same train.json in-process (as the model-zoo tests run workflows): the user error comes up."""
    bad_csv = _break_csv(cohort, tmp_path / "cohort.csv", mistake)
    monkeypatch.chdir(BUNDLE_ROOT)
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "train.json"),
        meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(tmp_path / "run"),
        dataset_csv=str(bad_csv),
        split_dir=str(cohort.parent / "splits"),
        pretrained="none",
        epochs=1,
        model_name="lnsc-tiny-vit",
        num_workers=0,
    )
    with pytest.raises(Exception) as raised:  # noqa: PT011 - MONAI wraps it; the cause is checked
        workflow.initialize()
        workflow.run()
    user_error = find_user_error(raised.value)
    assert user_error is not None, raised.value
    assert message in user_message(user_error)
    assert not list((tmp_path / "run").glob("models/*.pt")), "a checkpoint was written from bad input"
    assert not list((tmp_path / "run").glob("models/*.pt")), "a checkpoint was written from bad input"
