"""``python -m training.evaluate``: re-evaluating predictions files, real tiny models, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BUNDLE_ROOT
from scripts.calibration import BetaCalibration, save_calibration
from scripts.cohort import read_cohort
from scripts.export import export_torchscript, load_predictor
from scripts.finding_reliability import confidence_threshold, read_finding_reliability
from scripts.network import SemanticCLIP
from scripts.transforms import LoadCT, nine_planes_for_seeds
from training.evaluate import evaluate, main
from training.metrics import auroc, average_precision, delong_test
from training.splits import make_splits, write_splits
from training.synthetic import write_synthetic_cohort

OUTPUT_FILES = {
    "predictions.csv",
    "metrics.csv",
    "metrics.json",
    "semantic_auroc.csv",
    "roc.png",
    "precision_recall.png",
    "calibration.png",
    "semantic_auroc.png",
    "report.md",
    "finding_reliability.json",
}
MARGINS = ["Smooth", "Lobulated", "Spiculated/Serrated"]


def write_case(folder: Path, n_patients: int = 48, n_folds: int = 3, seed: int = 0) -> dict[str, Path]:
    """A cohort CSV (no images), a split folder with a test set and a predictions CSV."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for n in range(int(rng.integers(1, 4))):
            label = int(rng.uniform() < 0.35)
            rows.append(
                {
                    "pid": f"P{p:03d}",
                    "nodule_id": str(n),
                    "image_path": "none.nii.gz",
                    "coordX": 0.0,
                    "coordY": 0.0,
                    "coordZ": 0.0,
                    "malignant": label,
                    "mean_diameter": ""
                    if rng.uniform() < 0.1
                    else round(abs(rng.normal(8 + 6 * label, 3)), 1),
                    "nodule_margins": rng.choice(MARGINS if label else MARGINS[:2]),
                    "pleural_attachment": rng.choice(["Present", "Absent", ""]),
                }
            )
    cohort = pd.DataFrame(rows)
    folder.mkdir(parents=True, exist_ok=True)
    cohort.to_csv(folder / "cohort.csv", index=False)
    splits, test = make_splits(cohort.groupby("pid")["malignant"].max().to_dict(), n_folds, 0.25, seed)
    write_splits(splits, test, folder / "splits")
    predictions = cohort[["pid", "nodule_id", "malignant"]].copy()
    for fold in range(n_folds):
        predictions[f"raw_{fold}"] = np.clip(
            0.3 * cohort["malignant"] + rng.normal(0.35, 0.2, len(cohort)), 0, 1
        )
    semantic = rng.dirichlet(np.ones(3), len(cohort))
    semantic[cohort["nodule_margins"].to_numpy() == "Smooth", 0] += 1.0
    semantic /= semantic.sum(axis=1, keepdims=True)
    for j, value in enumerate(MARGINS):
        predictions[f"nodule_margins={value}"] = semantic[:, j]
    predictions.to_csv(folder / "predictions.csv", index=False)
    return {
        "cohort": folder / "cohort.csv",
        "splits": folder / "splits",
        "predictions": folder / "predictions.csv",
    }


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_case(tmp_path_factory.mktemp("case"))


def run(case: dict[str, Path], out: Path, **overrides) -> Path:
    arguments = {"predictions_csv": case["predictions"], "n_resamples": 300, "seed": 0}
    arguments.update(overrides)
    return evaluate(case["cohort"], case["splits"], out, **arguments)


def split_sets(splits: Path) -> tuple[dict[int, set[str]], set[str]]:
    val = {k: set(pd.read_csv(splits / f"fold_{k}" / "val_pid.csv", dtype=str)["pid"]) for k in range(3)}
    return val, set(pd.read_csv(splits / "test_pid.csv", dtype=str)["pid"])


def test_predictions_file_end_to_end_on_all_nodules(case: dict[str, Path], tmp_path: Path) -> None:
    out = run(case, tmp_path / "eval", subset="all")
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no staging folder left
    predictions = pd.read_csv(out / "predictions.csv", dtype={"pid": str, "nodule_id": str})
    source = pd.read_csv(case["predictions"], dtype={"pid": str, "nodule_id": str})
    assert len(predictions) == len(source)
    raw = predictions[["raw_0", "raw_1", "raw_2"]].to_numpy()
    np.testing.assert_allclose(predictions["ensemble"], raw.mean(axis=1))
    # validation patients: the fold that held them out; test patients: the mean over the folds
    val, test = split_sets(case["splits"])
    for row in predictions.itertuples():
        if row.pid in test:
            assert pd.isna(row.heldout_fold) and row.model == pytest.approx(row.ensemble)
        else:
            fold = next(k for k, pids in val.items() if row.pid in pids)
            assert row.heldout_fold == fold and row.model == pytest.approx(getattr(row, f"raw_{fold}"))
    metrics = pd.read_csv(out / "metrics.csv").set_index("predictor")
    assert list(metrics.index) == ["model", "baseline_size", "baseline_semantic"]
    labels = predictions["malignant"].to_numpy()
    for name in metrics.index:
        assert metrics.loc[name, "auroc"] == pytest.approx(auroc(labels, predictions[name]))
        assert metrics.loc[name, "auprc"] == pytest.approx(average_precision(labels, predictions[name]))
        assert metrics.loc[name, "auroc_low"] < metrics.loc[name, "auroc"] < metrics.loc[name, "auroc_high"]
    test_result = delong_test(labels, predictions["model"], predictions["baseline_size"])
    assert metrics.loc["model", "delong_vs_baseline_size_p"] == pytest.approx(test_result.p_value)
    assert np.isnan(metrics.loc["baseline_size", "delong_vs_baseline_size_p"])
    semantic = pd.read_csv(out / "semantic_auroc.csv")
    assert set(semantic["feature"]) == {"nodule_margins"}  # pleural attachment has no prediction
    weighted = semantic[semantic["value"] == "weighted"].iloc[0]
    assert weighted["auroc"] > 0.7 and weighted["auroc_low"] < weighted["auroc"] < weighted["auroc_high"]
    document = json.loads((out / "metrics.json").read_text())
    assert document["predictors"]["model"]["metrics"]["auroc"]["value"] == pytest.approx(
        metrics.loc["model", "auroc"]
    )
    reliability = read_finding_reliability(out)
    assert set(reliability.features) == {"nodule_margins"} and "subset 'all'" in reliability.source
    margins = reliability.feature("nodule_margins")
    assert margins.auroc == pytest.approx(weighted["auroc"])
    assert (margins.auroc_low, margins.auroc_high) == pytest.approx(
        (weighted["auroc_low"], weighted["auroc_high"])
    )
    cohort = pd.read_csv(case["cohort"], dtype={"pid": str, "nodule_id": str})
    merged = predictions.merge(cohort[["pid", "nodule_id", "nodule_margins"]], on=["pid", "nodule_id"])
    merged = merged[merged["nodule_margins"].notna()]
    block = merged[[f"nodule_margins={m}" for m in MARGINS]].to_numpy()
    correct = np.asarray(MARGINS, dtype=object)[block.argmax(axis=1)] == merged["nodule_margins"].to_numpy()
    assert margins.n_annotated == len(merged)
    assert margins.confidence_threshold is not None  # the synthetic predictions separate margins
    assert margins.confidence_threshold == confidence_threshold(correct, block.max(axis=1))
    report = (out / "report.md").read_text()
    n_patients = predictions["pid"].nunique()
    assert f"Nodules: {len(predictions)} from {n_patients} patients" in report
    assert f"malignant {int(labels.sum())}" in report and "300 resamples" in report
    assert "![ROC](roc.png)" in report and "![Semantic AUROC](semantic_auroc.png)" in report
    assert "imputed with the training median" in report  # some diameters are missing


def test_subsets_select_test_or_validation_patients(case: dict[str, Path], tmp_path: Path) -> None:
    val, test = split_sets(case["splits"])
    on_test = pd.read_csv(run(case, tmp_path / "test", subset="test") / "predictions.csv", dtype={"pid": str})
    on_val = pd.read_csv(run(case, tmp_path / "val", subset="val") / "predictions.csv", dtype={"pid": str})
    assert set(on_test["pid"]) == test
    assert set(on_val["pid"]) == set().union(*val.values())
    np.testing.assert_allclose(on_test["model"], on_test["ensemble"])
    # the default subset is test when the split has one
    default = pd.read_csv(run(case, tmp_path / "default") / "predictions.csv", dtype={"pid": str})
    assert set(default["pid"]) == test


def test_baselines_are_fitted_on_each_folds_training_patients(case: dict[str, Path], tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    predictions = pd.read_csv(
        run(case, tmp_path / "eval", subset="val") / "predictions.csv", dtype={"pid": str, "nodule_id": str}
    )
    cohort = pd.read_csv(case["cohort"], dtype={"pid": str, "nodule_id": str})
    train = set(pd.read_csv(case["splits"] / "fold_1" / "train_pid.csv", dtype=str)["pid"])
    fitted = cohort[cohort["pid"].isin(train)]
    median = fitted["mean_diameter"].median()
    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(fitted[["mean_diameter"]].fillna(median).to_numpy(), fitted["malignant"])
    own = predictions[predictions["heldout_fold"] == 1].merge(cohort, on=["pid", "nodule_id"])
    expected = model.predict_proba(own[["mean_diameter"]].fillna(median).to_numpy())[:, 1]
    np.testing.assert_allclose(own["baseline_size"], expected, atol=1e-6)


def test_calibrated_columns_and_rerunning_an_output_give_the_same_metrics(
    case: dict[str, Path], tmp_path: Path
) -> None:
    source = pd.read_csv(case["predictions"], dtype={"pid": str, "nodule_id": str})
    for fold in range(3):
        source[f"calibrated_{fold}"] = BetaCalibration(1.2, 0.8, 0.1 * fold)(source[f"raw_{fold}"].to_numpy())
    with_calibration = tmp_path / "calibrated.csv"
    source.to_csv(with_calibration, index=False)
    first = run(case, tmp_path / "first", subset="all", predictions_csv=with_calibration)
    metrics = pd.read_csv(first / "metrics.csv").set_index("predictor")
    assert "model_calibrated" in metrics.index
    predictions = pd.read_csv(first / "predictions.csv")
    np.testing.assert_allclose(
        predictions["calibrated_ensemble"],
        predictions[["calibrated_0", "calibrated_1", "calibrated_2"]].mean(axis=1),
    )
    # our own output is a valid predictions file: re-evaluating it reproduces every number
    second = run(case, tmp_path / "second", subset="all", predictions_csv=first / "predictions.csv")
    again = pd.read_csv(second / "metrics.csv").set_index("predictor")
    pd.testing.assert_frame_equal(metrics, again)


def test_the_bootstrap_is_reproducible_per_seed(case: dict[str, Path], tmp_path: Path) -> None:
    first = json.loads((run(case, tmp_path / "a", seed=3) / "metrics.json").read_text())
    again = json.loads((run(case, tmp_path / "b", seed=3) / "metrics.json").read_text())
    other = json.loads((run(case, tmp_path / "c", seed=4) / "metrics.json").read_text())
    assert first["predictors"] == again["predictors"]
    assert (
        first["predictors"]["model"]["metrics"]["auroc"] != other["predictors"]["model"]["metrics"]["auroc"]
    )


def test_the_command_line_prints_a_summary(case: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    main(
        [
            "--predictions",
            str(case["predictions"]),
            "--cohort",
            str(case["cohort"]),
            "--split-dir",
            str(case["splits"]),
            "--out",
            str(out),
            "--bootstrap",
            "100",
            "--subset",
            "val",
        ]
    )
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "baseline_semantic" in printed and str(out / "report.md") in printed


# ------------------------------------------------------------------------------------------------
# bad input: one clear message, nothing written
# ------------------------------------------------------------------------------------------------


def expect_user_error(arguments: list[str], out: Path, capsys, message: str) -> None:
    with pytest.raises(SystemExit) as raised:
        main([*arguments, "--out", str(out), "--bootstrap", "50"])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert sum(line.startswith("error: ") for line in error.splitlines()) == 1, error
    assert message in error, error
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def copy_case(case: dict[str, Path], folder: Path) -> dict[str, Path]:
    shutil.copytree(case["splits"], folder / "splits")
    shutil.copy(case["cohort"], folder / "cohort.csv")
    shutil.copy(case["predictions"], folder / "predictions.csv")
    return {
        "cohort": folder / "cohort.csv",
        "splits": folder / "splits",
        "predictions": folder / "predictions.csv",
    }


def arguments_of(case: dict[str, Path]) -> list[str]:
    return [
        "--predictions",
        str(case["predictions"]),
        "--cohort",
        str(case["cohort"]),
        "--split-dir",
        str(case["splits"]),
    ]


def test_nan_in_a_prediction_names_column_and_lines(case: dict[str, Path], tmp_path: Path, capsys) -> None:
    bad = copy_case(case, tmp_path)
    table = pd.read_csv(bad["predictions"], dtype=str)
    table.loc[[3, 7], "raw_1"] = np.nan
    table.to_csv(bad["predictions"], index=False)
    message = (
        "predictions.csv: column 'raw_1' has 2 missing (NaN), non-numeric or out-of-[0, 1] value(s) "
        "on line(s) 5, 9"
    )
    expect_user_error(arguments_of(bad), tmp_path / "out", capsys, message)


def test_patient_in_two_validation_sets(case: dict[str, Path], tmp_path: Path, capsys) -> None:
    bad = copy_case(case, tmp_path)
    moved = pd.read_csv(bad["splits"] / "fold_0" / "val_pid.csv", dtype=str)["pid"].iloc[0]
    for name in ("val_pid.csv",):
        path = bad["splits"] / "fold_1" / name
        path.write_text(path.read_text() + f"{moved}\n")
    train = bad["splits"] / "fold_1" / "train_pid.csv"
    train.write_text("\n".join(line for line in train.read_text().splitlines() if line != moved) + "\n")
    expect_user_error(
        arguments_of(bad),
        tmp_path / "out",
        capsys,
        f"patient {moved} is in the validation sets of fold_0 and fold_1",
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("extra_patient", "lists 1 patient(s) absent from the cohort CSV: GHOST"),
        ("missing_patient", "of the cohort CSV are in no file of the split"),
        ("missing_fold", "has no fold_2/"),
        ("single_class_fold", "fold 0: the"),
    ],
)
def test_split_that_does_not_match_the_cohort(
    case: dict[str, Path], tmp_path: Path, capsys, edit: str, message: str
) -> None:
    bad = copy_case(case, tmp_path)
    if edit == "extra_patient":
        path = bad["splits"] / "fold_0" / "train_pid.csv"
        path.write_text(path.read_text() + "GHOST\n")
    elif edit == "missing_patient":
        cohort = pd.read_csv(bad["cohort"], dtype=str)
        extra = cohort.iloc[[0]].assign(pid="NEWPATIENT")
        pd.concat([cohort, extra]).to_csv(bad["cohort"], index=False)
    elif edit == "missing_fold":
        shutil.rmtree(bad["splits"] / "fold_2")
    else:
        # fold 0 trains on benign patients only
        cohort = pd.read_csv(bad["cohort"], dtype=str)
        malignant = set(cohort.loc[cohort["malignant"] == "1", "pid"])
        path = bad["splits"] / "fold_0" / "train_pid.csv"
        kept = [p for p in path.read_text().split()[1:] if p not in malignant]
        path.write_text("pid\n" + "\n".join(kept) + "\n")
        message = f"fold 0: the {int(cohort['pid'].isin(kept).sum())} training nodule(s) are all benign"
    expect_user_error(arguments_of(bad), tmp_path / "out", capsys, message)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop_rows", "lacks 2 nodule(s) (pid/nodule_id) of the evaluated subset"),
        ("unknown_row", "absent from the cohort CSV, line(s)"),
        ("wrong_label", "column 'malignant' disagrees with the cohort CSV on line(s) 2"),
        (
            "out_of_range",
            "column 'raw_0' has 1 missing (NaN), non-numeric or out-of-[0, 1] value(s) on line(s) 3",
        ),
        ("no_raw", "no raw_<k> column"),
    ],
)
def test_bad_predictions_file(case: dict[str, Path], tmp_path: Path, capsys, edit: str, message: str) -> None:
    bad = copy_case(case, tmp_path)
    table = pd.read_csv(bad["predictions"], dtype=str)
    if edit == "drop_rows":
        table = table.drop(index=[0, 1])
    elif edit == "unknown_row":
        table = pd.concat([table, table.iloc[[0]].assign(nodule_id="99")])
    elif edit == "wrong_label":
        table.loc[0, "malignant"] = str(1 - int(table.loc[0, "malignant"]))
    elif edit == "out_of_range":
        table.loc[1, "raw_0"] = "1.5"
    else:
        table = table.drop(columns=["raw_0", "raw_1", "raw_2"])
    table.to_csv(bad["predictions"], index=False)
    expect_user_error([*arguments_of(bad), "--subset", "all"], tmp_path / "out", capsys, message)


def test_existing_output_and_missing_models(case: dict[str, Path], tmp_path: Path, capsys) -> None:
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(SystemExit):
        main([*arguments_of(case), "--out", str(existing)])
    assert "already exists" in capsys.readouterr().err
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    arguments = ["--bundle", str(bundle), "--cohort", str(case["cohort"]), "--split-dir", str(case["splits"])]
    expect_user_error(arguments, tmp_path / "out", capsys, "has no exported model")


# ------------------------------------------------------------------------------------------------
# real (tiny, untrained) exported models on synthetic CTs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    cohort = write_synthetic_cohort(folder / "data", n_patients=8, nodules_per_patient=1, seed=3)
    labels = {r.pid: int(r.label) for r in read_cohort(cohort)}
    splits, test = make_splits(labels, n_folds=2, test_fraction=0.25, seed=0)
    split_dir = write_splits(splits, test, folder / "splits")
    bundle = folder / "bundle"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy(BUNDLE_ROOT / "configs" / "metadata.json", bundle / "configs" / "metadata.json")
    for fold in range(2):
        torch.manual_seed(fold)
        network = SemanticCLIP("lnsc-tiny-vit", pretrained=None, tuning="lora")
        export_torchscript(network, bundle / "models" / f"fold_{fold}" / "model.ts")
    save_calibration(
        bundle / "models" / "calibration.json",
        {0: BetaCalibration(1.5, 0.5, 0.2), 1: BetaCalibration(0.8, 1.2, -0.1)},
        {"note": "made up for the test"},
    )
    return {"cohort": cohort, "splits": split_dir, "bundle": bundle}


def test_real_tiny_models_end_to_end(tiny_bundle: dict[str, Path], tmp_path: Path) -> None:
    out = evaluate(
        tiny_bundle["cohort"],
        tiny_bundle["splits"],
        tmp_path / "eval",
        bundle=tiny_bundle["bundle"],
        subset="all",
        n_resamples=200,
        device="cpu",
        batch_size=2,
    )
    predictions = pd.read_csv(out / "predictions.csv", dtype={"pid": str, "nodule_id": str})
    assert len(predictions) == 8
    semantic = [c for c in predictions.columns if "=" in c]
    assert len(semantic) == 39 and "nodule_margins=Spiculated/Serrated" in semantic
    for fold in range(2):
        assert {f"raw_{fold}", f"calibrated_{fold}"} <= set(predictions.columns)
    calibration = {0: BetaCalibration(1.5, 0.5, 0.2), 1: BetaCalibration(0.8, 1.2, -0.1)}
    np.testing.assert_allclose(
        predictions["calibrated_1"], calibration[1](predictions["raw_1"].to_numpy()), atol=1e-9
    )
    # the raw probability is what the exported predictor gives on the bundle's preprocessing
    record = next(r for r in read_cohort(tiny_bundle["cohort"]) if r.pid == predictions["pid"].iloc[0])
    module, _ = load_predictor(tiny_bundle["bundle"] / "models" / "fold_1" / "model.ts")
    planes = nine_planes_for_seeds(LoadCT()(record.image_path), [record.seed_lps])
    with torch.no_grad():
        expected = float(module(planes)["malignancy"][0])
    assert predictions["raw_1"].iloc[0] == pytest.approx(expected, abs=1e-5)
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["predictor"]) == ["model", "model_calibrated", "baseline_size", "baseline_semantic"]
    report = (out / "report.md").read_text()
    metadata = json.loads((tiny_bundle["bundle"] / "configs" / "metadata.json").read_text())
    assert f"lung_nodule_ct_semantic_clip {metadata['version']}" in report
    assert "per-fold beta calibration from calibration.json" in report
    assert "Nodules: 8 from 8 patients; malignant 4, benign 4" in report


def test_a_calibration_file_without_a_models_fold_is_refused(
    tiny_bundle: dict[str, Path], tmp_path: Path, capsys
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle["bundle"], bundle)
    save_calibration(bundle / "models" / "calibration.json", {0: BetaCalibration(1.0, 1.0, 0.0)}, {})
    arguments = [
        "--bundle",
        str(bundle),
        "--cohort",
        str(tiny_bundle["cohort"]),
        "--split-dir",
        str(tiny_bundle["splits"]),
    ]
    expect_user_error(
        [*arguments, "--subset", "test"], tmp_path / "out", capsys, "no calibration map for fold(s) 1"
    )


def test_fold_models_or_a_single_model_are_found(tmp_path: Path) -> None:
    from scripts.export import exported_models

    single = tmp_path / "single" / "models"
    single.mkdir(parents=True)
    (single / "model.ts").write_bytes(b"")
    assert exported_models(single.parent) == {0: single / "model.ts"}
    folds = tmp_path / "folds" / "models"
    for fold in (2, 0, 1):
        (folds / f"fold_{fold}").mkdir(parents=True)
        (folds / f"fold_{fold}" / "model.ts").write_bytes(b"")
    (folds / "fold_3").mkdir()  # no model inside: not a fold model
    assert list(exported_models(folds.parent)) == [0, 1, 2]
