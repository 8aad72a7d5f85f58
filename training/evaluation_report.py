"""The evaluation's results and its report: metrics with CIs, tables, plots and Markdown.

:func:`compute_results` scores every predictor (:mod:`training.metrics`: AUROC, AUPRC, operating
points, Brier score, ECE with patient-level bootstrap CIs; DeLong's paired test against each
baseline; zero-shot semantic AUROC per feature). :func:`write_outputs` writes ``predictions.csv``,
``metrics.csv``, ``metrics.json``, ``semantic_auroc.csv``, ``roc.png``, ``precision_recall.png``,
``calibration.png``, ``semantic_auroc.png`` (when a feature can be scored), ``report.md`` and
``finding_reliability.json`` (each scored feature's AUROC and confidence threshold, see
:mod:`scripts.finding_reliability`; copy it beside the models' ``calibration.json`` when the
evaluated subset is the validation data) into a temporary sibling of the output folder, renamed into
place at the end.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from scripts.cohort import NoduleRecord
from scripts.finding_reliability import (
    RELIABILITY_FILE,
    FeatureReliability,
    FindingReliability,
    confidence_threshold,
)
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES
from training.baselines import BASELINE_SEMANTIC, BASELINE_SIZE, BASELINES
from training.metrics import (
    N_CALIBRATION_BINS,
    BinaryEvaluation,
    DeLongResult,
    SemanticEvaluation,
    binary_metric_names,
    calibration_bins,
    delong_test,
    evaluate_binary,
    evaluate_semantic_feature,
    patient_resample_counts,
)
from training.model_outputs import MODEL, MODEL_CALIBRATED
from training.staging import new_output_folder

logger = logging.getLogger(__name__)

PREDICTOR_TITLES = {
    MODEL: "Model (fold ensemble)",
    MODEL_CALIBRATED: "Model, beta-calibrated",
    BASELINE_SIZE: "Baseline: size (mean diameter)",
    BASELINE_SEMANTIC: "Baseline: radiologist semantic features + size",
}


@dataclass
class Results:
    """Everything computed, ready to be written."""

    binary: dict[str, BinaryEvaluation]
    delong: dict[str, dict[str, DeLongResult]]
    semantic: dict[str, SemanticEvaluation]
    n_resamples: int
    seed: int
    thresholds: dict[str, float | None]


def compute_results(
    labels: np.ndarray,
    pids: Sequence[str],
    predictors: dict[str, np.ndarray],
    semantic_probabilities: dict[str, np.ndarray],
    records: list[NoduleRecord],
    n_resamples: int,
    seed: int,
) -> Results:
    """Binary metrics with CIs, DeLong tests against each baseline and the semantic AUROCs."""
    counts = patient_resample_counts(pids, n_resamples, seed) if n_resamples > 0 else None
    binary: dict[str, BinaryEvaluation] = {}
    total = n_resamples * len(predictors)
    with tqdm(total=total, desc="bootstrap", unit="resample", disable=total == 0) as bar:
        for name, scores in predictors.items():
            binary[name] = evaluate_binary(labels, scores, counts, progress=bar.update)
    delong: dict[str, dict[str, DeLongResult]] = {}
    for name, scores in predictors.items():
        delong[name] = {}
        for baseline in BASELINES:
            if baseline != name and baseline in predictors:
                try:
                    delong[name][baseline] = delong_test(labels, scores, predictors[baseline])
                except ValueError as error:  # fewer than 2 of a class: no variance estimate
                    logger.warning("DeLong test of %s vs %s not computed: %s", name, baseline, error)
    semantic: dict[str, SemanticEvaluation] = {}
    thresholds: dict[str, float | None] = {}
    for feature in FEATURES:
        names = [f"{feature.column}={v.name}" for v in feature.values]
        if not all(n in semantic_probabilities for n in names):
            continue
        probabilities = np.column_stack([semantic_probabilities[n] for n in names])
        truth = [r.semantics.get(feature.column) for r in records]
        evaluation = evaluate_semantic_feature(truth, probabilities, [v.name for v in feature.values], counts)
        if evaluation is not None:
            semantic[feature.column] = evaluation
            thresholds[feature.column] = feature_confidence_threshold(
                truth, probabilities, feature.value_names()
            )
    return Results(binary, delong, semantic, n_resamples, seed, thresholds)


def feature_confidence_threshold(
    truth: Sequence[str | None], probabilities: np.ndarray, values: Sequence[str]
) -> float | None:
    """The confidence threshold of one feature (:func:`scripts.finding_reliability.confidence_threshold`)
    on its annotated nodules: the predicted value is the most probable one, as the deploy app reports it.
    """
    known = np.array([bool(t) for t in truth])
    predicted = np.asarray(values, dtype=object)[np.argmax(probabilities, axis=1)]
    correct = predicted == np.array([t or "" for t in truth], dtype=object)
    return confidence_threshold(correct[known], probabilities.max(axis=1)[known])


def finding_reliability(results: Results, context: dict[str, Any]) -> FindingReliability:
    """The record the deploy app reads: per scored feature, its weighted AUROC and threshold."""
    features = {
        column: FeatureReliability(
            column,
            auroc=evaluation.weighted.value,
            auroc_low=evaluation.weighted.low if math.isfinite(evaluation.weighted.low) else None,
            auroc_high=evaluation.weighted.high if math.isfinite(evaluation.weighted.high) else None,
            n_annotated=evaluation.n_annotated,
            confidence_threshold=results.thresholds[column],
            threshold_basis="validation",
        )
        for column, evaluation in results.semantic.items()
    }
    source = (
        f"{context.get('bundle_name', '')} {context.get('bundle_version', '')}, subset "
        f"'{context.get('subset', '')}' ({context.get('protocol', '')}), "
        f"{context.get('n_nodules', 0)} nodules"
    )
    return FindingReliability(features, source.strip())


def metrics_table(results: Results) -> pd.DataFrame:
    """One row per predictor: every metric with its CI, then DeLong against each baseline."""
    rows = []
    for name, evaluation in results.binary.items():
        row: dict[str, Any] = {"predictor": name}
        row.update(evaluation.as_row())
        row["bootstrap_resamples"] = evaluation.n_resamples
        row["bootstrap_skipped"] = evaluation.n_skipped
        for baseline in BASELINES:
            test = results.delong[name].get(baseline)
            row[f"delong_vs_{baseline}_auc_difference"] = test.difference if test else math.nan
            row[f"delong_vs_{baseline}_z"] = test.z if test else math.nan
            row[f"delong_vs_{baseline}_p"] = test.p_value if test else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def semantic_table(results: Results) -> pd.DataFrame:
    """Per feature: one row per observed value (one-vs-rest) and a ``weighted`` row with the CI."""
    rows = []
    for column, evaluation in results.semantic.items():
        for value, positives, score in zip(
            evaluation.values, evaluation.positives, evaluation.aurocs, strict=True
        ):
            rows.append(
                {
                    "feature": column,
                    "value": value,
                    "n_annotated": evaluation.n_annotated,
                    "n_positive": positives,
                    "prevalence": positives / evaluation.n_annotated,
                    "auroc": score,
                    "auroc_low": math.nan,
                    "auroc_high": math.nan,
                }
            )
        rows.append(
            {
                "feature": column,
                "value": "weighted",
                "n_annotated": evaluation.n_annotated,
                "n_positive": sum(evaluation.positives),
                "prevalence": 1.0,
                "auroc": evaluation.weighted.value,
                "auroc_low": evaluation.weighted.low,
                "auroc_high": evaluation.weighted.high,
            }
        )
    columns = [
        "feature",
        "value",
        "n_annotated",
        "n_positive",
        "prevalence",
        "auroc",
        "auroc_low",
        "auroc_high",
    ]
    return pd.DataFrame(rows, columns=columns)


def _plot_curves(
    folder: Path, labels: np.ndarray, predictors: dict[str, np.ndarray], results: Results
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, scores in predictors.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        estimate = results.binary[name].estimates["auroc"]
        axis.plot(fpr, tpr, label=f"{PREDICTOR_TITLES[name]} ({estimate.value:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(
        xlabel="False-positive rate", ylabel="Sensitivity", title="ROC (AUROC)", xlim=(0, 1), ylim=(0, 1.01)
    )
    axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "roc.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, scores in predictors.items():
        precision, recall, _ = precision_recall_curve(labels, scores)
        estimate = results.binary[name].estimates["auprc"]
        axis.step(recall, precision, where="post", label=f"{PREDICTOR_TITLES[name]} ({estimate.value:.3f})")
    axis.axhline(
        labels.mean(), color="grey", linestyle=":", linewidth=1, label=f"prevalence {labels.mean():.3f}"
    )
    axis.set(xlabel="Recall (sensitivity)", ylabel="Precision", title="Precision-recall (AUPRC)")
    axis.set(xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "precision_recall.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, scores in predictors.items():
        bins = calibration_bins(labels, scores, N_CALIBRATION_BINS)
        filled = bins["count"] > 0
        estimate = results.binary[name].estimates["ece"]
        axis.plot(
            bins["mean_probability"][filled],
            bins["fraction_positive"][filled],
            marker="o",
            label=f"{PREDICTOR_TITLES[name]} (ECE {estimate.value:.3f})",
        )
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(
        xlabel="Mean predicted probability (10 equal-width bins)",
        ylabel="Fraction malignant",
        title="Reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axis.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "calibration.png", dpi=120)
    plt.close(figure)


def _plot_semantic(folder: Path, results: Results) -> bool:
    if not results.semantic:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(results.semantic)
    values = np.array([results.semantic[c].weighted.value for c in columns])
    low = np.array([results.semantic[c].weighted.low for c in columns])
    high = np.array([results.semantic[c].weighted.high for c in columns])
    errors = np.vstack([values - low, high - values]) if np.all(np.isfinite(low)) else None
    figure, axis = plt.subplots(figsize=(6.5, 0.45 * len(columns) + 1.5))
    positions = np.arange(len(columns))
    axis.barh(positions, values, xerr=errors, color="tab:blue", capsize=3)
    axis.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_yticks(positions, [FEATURE_BY_COLUMN[c].title for c in columns], fontsize=8)
    axis.invert_yaxis()
    axis.set(xlim=(0, 1), xlabel="Prevalence-weighted one-vs-rest AUROC", title="Zero-shot semantic AUROC")
    figure.tight_layout()
    figure.savefig(folder / "semantic_auroc.png", dpi=120)
    plt.close(figure)
    return True


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def with_ci(value: float, low: float, high: float) -> str:
    """``value [low, high]`` with three decimals, ``value`` alone without a CI, ``n/a`` for NaN."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if math.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


_METRIC_GROUPS = (
    ("Discrimination", ("auroc", "auprc"), ("AUROC", "AUPRC")),
    ("Calibration", ("brier", "ece"), ("Brier score", "ECE")),
)


def _metric_tables(results: Results) -> list[str]:
    """Markdown tables of the binary metrics: discrimination, operating points, calibration."""
    names = binary_metric_names()
    targets = [n.removeprefix("threshold_at_") for n in names if n.startswith("threshold_at_")]
    groups: list[tuple[str, list[str], list[str]]] = [(t, list(k), list(h)) for t, k, h in _METRIC_GROUPS]
    for target in targets:
        percent = target.removeprefix("sens")
        keys = [f"{m}_at_{target}" for m in ("threshold", "fpr", "specificity", "precision")]
        headers = ["threshold", "false-positive rate", "specificity", "precision"]
        groups.insert(-1, (f"Operating point at {percent} % sensitivity", keys, headers))
    lines: list[str] = []
    for title, keys, headers in groups:
        rows = []
        for name, evaluation in results.binary.items():
            cells = []
            for key in keys:
                estimate = evaluation.estimates[key]
                if key.startswith("threshold_at_"):
                    cells.append(f"{estimate.value:.4f}")
                else:
                    cells.append(with_ci(estimate.value, estimate.low, estimate.high))
            rows.append([PREDICTOR_TITLES[name], *cells])
        lines += [f"### {title}", "", _markdown_table(["predictor", *headers], rows), ""]
    return lines


def render_report(context: dict[str, Any], results: Results, has_semantic_plot: bool) -> str:
    """The Markdown report: settings, counts, tables and the plots."""
    lines = [
        "# Evaluation report",
        "",
        f"- Bundle: {context['bundle_name']} {context['bundle_version']}".rstrip(),
        f"- Source of the model outputs: {context['source']}",
        f"- Cohort: `{context['cohort']}`",
        f"- Split: `{context['split_dir']}`; folds {', '.join(map(str, context['folds']))}",
        f"- Subset: {context['subset']} ({context['protocol']})",
        f"- Nodules: {context['n_nodules']} from {context['n_patients']} patients; "
        f"malignant {context['n_malignant']}, benign {context['n_benign']}",
        f"- Calibration: {context['calibration']}",
        (
            f"- Bootstrap: {results.n_resamples} resamples of patients (cluster bootstrap: all nodules of a "
            f"drawn patient), seed {results.seed}, 95 % percentile intervals; resamples holding one class "
            "are skipped (counts in metrics.csv)"
            if results.n_resamples
            else "- Bootstrap: none (point estimates only)"
        ),
        "- ECE: 10 equal-width bins of the predicted probability (resampling inflates it, so its percentile "
        "interval can lie above the point estimate); operating points: the highest threshold reaching the "
        "sensitivity",
        "",
        "## Malignancy",
        "",
        "Value [95 % CI] per predictor.",
        "",
        *_metric_tables(results),
        "### DeLong test against the baselines (paired, two-sided; nodules treated as independent)",
        "",
        _markdown_table(
            ["predictor", "baseline", "AUROC difference", "z", "p"],
            [
                [
                    PREDICTOR_TITLES[name],
                    PREDICTOR_TITLES[baseline],
                    f"{t.difference:+.3f}",
                    f"{t.z:.2f}",
                    f"{t.p_value:.3g}",
                ]
                for name, tests in results.delong.items()
                for baseline, t in tests.items()
                # the baselines against each other once: the richer one against the simpler one
                if not (name in BASELINES and BASELINES.index(name) < BASELINES.index(baseline))
            ],
        ),
        "",
        "![ROC](roc.png) ![Precision-recall](precision_recall.png) ![Reliability](calibration.png)",
        "",
        "## Zero-shot semantic findings",
        "",
    ]
    if results.semantic:
        lines += [
            _markdown_table(
                ["feature", "annotated", "values (n)", "one-vs-rest AUROC", "weighted AUROC"],
                [
                    [
                        FEATURE_BY_COLUMN[column].title,
                        ev.n_annotated,
                        ", ".join(f"{v} ({n})" for v, n in zip(ev.values, ev.positives, strict=True)),
                        ", ".join(f"{a:.3f}" for a in ev.aurocs),
                        with_ci(ev.weighted.value, ev.weighted.low, ev.weighted.high),
                    ]
                    for column, ev in results.semantic.items()
                ],
            ),
            "",
        ]
        if has_semantic_plot:
            lines += ["![Semantic AUROC](semantic_auroc.png)", ""]
    else:
        lines += [
            "No semantic feature could be scored (no semantic predictions, or no feature annotated with at "
            "least two values).",
            "",
        ]
    if context["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in context["notes"]), ""]
    return "\n".join(lines)


def write_outputs(
    out_dir: Path,
    predictions: pd.DataFrame,
    results: Results,
    labels: np.ndarray,
    predictors: dict[str, np.ndarray],
    context: dict[str, Any],
) -> Path:
    """Write every output into a temporary sibling of ``out_dir`` and rename it into place."""
    out_dir = Path(out_dir)
    with new_output_folder(out_dir) as staging:
        predictions.to_csv(staging / "predictions.csv", index=False)
        metrics_table(results).to_csv(staging / "metrics.csv", index=False)
        semantic_table(results).to_csv(staging / "semantic_auroc.csv", index=False)
        document = {
            "context": {k: v for k, v in context.items()},
            "predictors": {
                name: {
                    "metrics": {m: vars(e) for m, e in evaluation.estimates.items()},
                    "bootstrap_resamples": evaluation.n_resamples,
                    "bootstrap_skipped": evaluation.n_skipped,
                    "delong": {b: vars(t) for b, t in results.delong[name].items()},
                }
                for name, evaluation in results.binary.items()
            },
            "semantic": {
                column: {
                    "values": list(ev.values),
                    "positives": list(ev.positives),
                    "aurocs": list(ev.aurocs),
                    "weighted": vars(ev.weighted),
                    "n_annotated": ev.n_annotated,
                    "bootstrap_skipped": ev.n_skipped,
                }
                for column, ev in results.semantic.items()
            },
        }
        # NaN is not JSON: write null
        text = json.dumps(_json_safe(document), indent=2, allow_nan=False)
        (staging / "metrics.json").write_text(text + "\n")
        reliability = finding_reliability(results, context).to_json()
        (staging / RELIABILITY_FILE).write_text(json.dumps(reliability, indent=2, allow_nan=False) + "\n")
        _plot_curves(staging, labels, predictors, results)
        has_semantic_plot = _plot_semantic(staging, results)
        (staging / "report.md").write_text(render_report(context, results, has_semantic_plot))
    return out_dir


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value
