"""Import the authors' released checkpoints into a deployable bundle: ``python -m training.import_reference``.

``python -m training.import_reference CKPT_DIR --out BUNDLE_DIR [--folds 0,1,...]`` reads
``CKPT_DIR/args.txt`` (the training arguments as a ``Namespace(...)`` repr) and every
``CKPT_DIR/fold_k/best_both.pt`` (``{'model': state_dict}`` in the OpenAI CLIP layout of the authors'
code), maps each state dict onto :class:`scripts.network.SemanticCLIP` with plain open_clip keys
(``tuning='full'``) and writes a copy of this project's bundle with, per fold,
``models/fold_k/model.pt`` (``{"network": state_dict}``, loadable strictly by
``scripts.export.load_checkpoint``) and the exported TorchScript ``models/fold_k/model.ts``, plus
``models/import_record.json`` and ``configs/imported.json``, the config override that makes the
bundle's ``inference.json`` / ``evaluate.json`` build the matching network.

Both variants of the authors' code are supported: full fine-tuning (``tuning='ft'``, fused
``in_proj_weight`` attention) and LoRA (``tuning='lora'``, separate ``q_proj``/``k_proj``/``v_proj``
and ``proj`` linears with ``w_lora_A``/``w_lora_B``). A LoRA checkpoint is saved after ``eval()``,
which merges the update into the q/k/v weights, so the saved q/k/v weights *are* the weights as
trained and the stored LoRA matrices are ignored (adding them again would double-count the update;
see docs/method.md, "The authors' released checkpoints").

Loading is strict: every key of the network must come from the file and every key of the file must
be used (or be a known extra), with matching shapes; otherwise one message names the file, the
missing and the unexpected keys. The output folder appears only complete.

One module of about 700 lines by choice: reading ``args.txt``, the key mapping, its strict check and
the bundle it writes are one conversion whose steps share the settings and the messages.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

# torch and open_clip take seconds to import: the functions that use them import them, so that --help,
# a bad argument and a missing checkpoint folder answer at once.
from scripts.bundle_files import BUNDLE_ROOT
from scripts.errors import UserInputError, exit_on_user_error

if TYPE_CHECKING:
    import torch

    from scripts.network import SemanticCLIP

logger = logging.getLogger(__name__)

ARGS_FILE = "args.txt"
DEFAULT_CHECKPOINT_NAME = "best_both.pt"
RECORD_FILE = "import_record.json"
OVERRIDE_CONFIG = "imported.json"
SUPPORTED_TUNING = {"lora": "lora", "ft": "ft"}
"""``tuning`` in args.txt -> expected attention layout of the state dict."""

KNOWN_EXTRAS = frozenset({"pred_criterion_val.weight"})
"""Keys of the authors' state dict that are not model weights (the validation loss's class weights)."""

LORA_MATRIX_SUFFIXES = (".w_lora_A", ".w_lora_B")
_merged_note_logged: list[bool] = []
"""Set once the merged-LoRA note has been logged in this process (it is said once, not per fold)."""
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "models", "runs", "eval", "data")
"""Not copied from the project's bundle: caches, weights and run outputs (which may hold patient data)."""

MERGED_LORA_NOTE = (
    "LoRA checkpoint: the authors save after eval(), which merges the LoRA update into the q/k/v "
    "weights, so the saved q/k/v weights are the weights as trained; the stored w_lora_A/w_lora_B "
    "matrices were ignored, not added a second time. (The authors' evaluate.py adds them again for "
    "fold 0 only, so its raw_0 column differs from the model as trained; fold 0 here is the model as "
    "trained. See docs/method.md, 'The authors' released checkpoints'.)"
)

_PREFIX_TO_SOURCE = (("clip.visual.", "vision_model."), ("clip.", ""))
"""open_clip (SemanticCLIP) key prefix -> the authors' prefix; heads keep their names."""


@dataclass(frozen=True)
class Unparsed:
    """An args.txt value that is not a Python literal (kept as its source text)."""

    text: str

    def __str__(self) -> str:
        return f"<not a literal: {self.text}>"


def parse_args_text(text: str, source: str | Path = ARGS_FILE) -> dict[str, Any]:
    """Parse the one-line ``Namespace(key=value, ...)`` repr of the authors' training arguments.

    Never evaluates code: the call is parsed with :mod:`ast` and each value with
    :func:`ast.literal_eval`; ``inf``/``nan`` become floats, other non-literals :class:`Unparsed`.

    Args:
        text: the content of args.txt.
        source: the file, for messages.

    Returns:
        argument name -> value.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise UserInputError(
            f"{source}: not a Namespace(...) repr of the training arguments ({error.msg})"
        ) from None
    call = tree.body
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "Namespace"
        and not call.args
        and all(keyword.arg for keyword in call.keywords)
    ):
        raise UserInputError(
            f"{source}: expected one line 'Namespace(name=value, ...)' as train.py writes it, "
            f"got '{text.strip()[:60]}'"
        )
    parsed: dict[str, Any] = {}
    for keyword in call.keywords:
        parsed[keyword.arg] = _literal(keyword.value)
    return parsed


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in {"inf", "nan"}:
        return float(node.id)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return Unparsed(ast.unparse(node))


def read_args(ckpt_dir: Path) -> dict[str, Any]:
    """Read and parse ``ckpt_dir/args.txt``."""
    path = ckpt_dir / ARGS_FILE
    if not path.is_file():
        raise UserInputError(
            f"{path} not found: CKPT_DIR must be the authors' checkpoint folder holding args.txt and "
            "fold_k/best_both.pt"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: cannot be read as text ({error})") from None
    return parse_args_text(text, path)


def _argument(args: Mapping[str, Any], name: str, kind: type, source: Path) -> Any:
    """A required argument of args.txt, of type ``kind``."""
    value = args.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserInputError(f"{source}: '{name}' is missing or not a {kind.__name__}: {value!s}")
    return value


def reference_model_name(model: str) -> str:
    """The open_clip architecture of the authors' ``--model`` (``openai_ViT-B/32`` -> ``ViT-B-32-quickgelu``).

    OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain ``ViT-B-32`` uses GELU, so
    the ``-quickgelu`` variant is the architecture that computes what the authors' model computes.

    Args:
        model: the ``model`` value of args.txt.

    Returns:
        an open_clip model name.
    """
    import open_clip

    match = re.fullmatch(r"openai_(?P<arch>[A-Za-z0-9]+-[A-Za-z0-9]+/\d+)(?:@(?P<res>\d+)px)?", model)
    if not match:
        raise UserInputError(
            f"args.txt model '{model}' is not an OpenAI CLIP model this importer knows "
            "(e.g. 'openai_ViT-B/32'); pass --model-name with the matching open_clip architecture"
        )
    name = match["arch"].replace("/", "-") + (f"-{match['res']}" if match["res"] else "") + "-quickgelu"
    if name not in open_clip.list_models():
        raise UserInputError(
            f"args.txt model '{model}': open_clip has no architecture '{name}'; pass --model-name"
        )
    return name


def attention_layout(keys: Iterable[str]) -> str:
    """``lora`` when attention uses separate q/k/v linears, ``ft`` when only fused ``in_proj_weight``."""
    keys = list(keys)
    split = any(re.search(r"\.attn\.[qkv]_proj\.", key) for key in keys)
    fused = any(key.endswith(".attn.in_proj_weight") for key in keys)
    if split:
        return "lora"
    if fused:
        return "ft"
    raise UserInputError(
        "unknown checkpoint layout: no attention weights (neither '.attn.in_proj_weight' nor "
        "'.attn.q_proj/k_proj/v_proj') - not a state dict of the authors' CLIP model"
    )


def source_key_alternatives(target_key: str, variant: str) -> list[tuple[str, ...]]:
    """The authors' key(s) a SemanticCLIP key is made of, alternatives in order of preference.

    A fused ``in_proj_weight``/``in_proj_bias`` is either stored as is or as ``q_proj``, ``k_proj``,
    ``v_proj`` stacked along dim 0; ``out_proj`` is ``proj`` in the LoRA attention module. Blocks
    without LoRA keep the fused layout, so both alternatives are tried. The first alternative is the
    variant's own naming (used in messages when neither is present).

    Args:
        target_key: a key of ``SemanticCLIP(..., tuning='full').state_dict()``.
        variant: ``lora`` or ``ft``.

    Returns:
        a list of key tuples; a tuple of three is concatenated along dim 0.
    """
    key = target_key
    for prefix, source_prefix in _PREFIX_TO_SOURCE:
        if key.startswith(prefix):
            key = source_prefix + key[len(prefix) :]
            break
    fused = re.fullmatch(r"(?P<block>.+\.attn)\.in_proj_(?P<param>weight|bias)", key)
    out = re.fullmatch(r"(?P<block>.+\.attn)\.out_proj\.(?P<param>weight|bias)", key)
    if fused:
        split = tuple(f"{fused['block']}.{m}_proj.{fused['param']}" for m in "qkv")
        options = [(key,), split]
    elif out:
        options = [(key,), (f"{out['block']}.proj.{out['param']}",)]
    else:
        return [(key,)]
    return options[::-1] if variant == "lora" else options


@dataclass
class ConversionPlan:
    """How the authors' state dict becomes a SemanticCLIP state dict, and what does not fit.

    Attributes:
        sources: target key -> source keys (several are concatenated along dim 0).
        dropped: source keys deliberately not used (known extras, merged LoRA matrices).
        missing: the authors' key names the file lacks.
        unexpected: source keys nothing uses.
        mismatched: ``key: shape in file vs expected`` lines.
    """

    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def plan_conversion(
    source_shapes: Mapping[str, Sequence[int]], target_shapes: Mapping[str, Sequence[int]], variant: str
) -> ConversionPlan:
    """Match the authors' keys to the network's keys by name and shape (no tensors needed).

    Args:
        source_shapes: the authors' key -> shape.
        target_shapes: SemanticCLIP key -> shape.
        variant: ``lora`` or ``ft`` (which stored extras are expected).

    Returns:
        the plan; :attr:`ConversionPlan.ok` tells whether the state dict loads strictly.
    """
    plan = ConversionPlan()
    used: set[str] = set()
    for target, shape in target_shapes.items():
        options = source_key_alternatives(target, variant)
        present = [option for option in options if all(k in source_shapes for k in option)]
        if not present:
            partial = [option for option in options if any(k in source_shapes for k in option)]
            reported = partial[0] if partial else options[0]
            plan.missing += [k for k in reported if k not in source_shapes]
            continue
        option = present[0]
        plan.sources[target] = option
        used.update(option)
        # q, k and v each hold a third of the rows of the fused in_proj.
        piece_shape = (shape[0] // len(option), *shape[1:]) if len(option) > 1 else tuple(shape)
        for key in option:
            if tuple(source_shapes[key]) != piece_shape:
                plan.mismatched.append(f"{key}: {tuple(source_shapes[key])} vs expected {piece_shape}")
    for key in source_shapes:
        if key in used:
            continue
        if key in KNOWN_EXTRAS or (variant == "lora" and key.endswith(LORA_MATRIX_SUFFIXES)):
            plan.dropped.append(key)
        else:
            plan.unexpected.append(key)
    return plan


def _first(keys: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > count else f" ({len(keys)})")


def check_plan(plan: ConversionPlan, source_file: str | Path) -> None:
    """Raise :class:`UserInputError` naming the file, missing, unexpected and mis-shaped keys."""
    if plan.ok:
        return
    problems = []
    if plan.missing:
        problems.append(f"missing keys: {_first(plan.missing)}")
    if plan.unexpected:
        problems.append(f"unexpected keys: {_first(plan.unexpected)}")
    if plan.mismatched:
        problems.append(f"shape mismatches: {_first(plan.mismatched)}")
    raise UserInputError(
        f"{source_file} does not match the model (wrong --model-name or args.txt for this "
        f"checkpoint?): {'; '.join(problems)}"
    )


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, Sequence[int]],
    variant: str,
    source_file: str | Path,
) -> tuple[dict[str, torch.Tensor], ConversionPlan]:
    """The SemanticCLIP state dict of one of the authors' state dicts (strict; see :func:`plan_conversion`).

    Args:
        state: the authors' state dict.
        target_shapes: SemanticCLIP key -> shape (``tuning='full'``: plain open_clip keys).
        variant: ``lora`` or ``ft``.
        source_file: the checkpoint file, for messages.

    Returns:
        the converted state dict (q/k/v stacked into ``in_proj``) and the plan used.
    """
    import torch

    plan = plan_conversion({k: tuple(v.shape) for k, v in state.items()}, target_shapes, variant)
    check_plan(plan, source_file)
    converted = {
        target: state[keys[0]] if len(keys) == 1 else torch.cat([state[k] for k in keys], dim=0)
        for target, keys in plan.sources.items()
    }
    return converted, plan


def lora_update_ratio(state: Mapping[str, torch.Tensor], scaling: float) -> float | None:
    """Largest ``||B A s||_F / ||W||_F`` over the stored LoRA matrices (how much a double merge shifts W)."""
    ratios = []
    for key in state:
        if key.endswith(".w_lora_A"):
            base = key[: -len(".w_lora_A")]
            lora_b, weight = state.get(base + ".w_lora_B"), state.get(base + ".weight")
            if lora_b is None or weight is None:
                continue
            update = (lora_b.float() @ state[key].float()) * scaling
            ratios.append(float(update.norm() / weight.float().norm().clamp_min(1e-12)))
    return max(ratios) if ratios else None


def load_reference_state(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` (weights only) of a ``{'model': state_dict}`` checkpoint file."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt, truncated or non-weights-only pickle
        raise UserInputError(
            f"{path}: cannot be loaded as a weights-only torch checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserInputError(
            f"{path}: expected a dict whose key 'model' holds the state dict (as the authors' "
            f"best_both.pt), got {type(checkpoint).__name__}"
            + (f" with keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict) else "")
        )
    return state


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fold_folders(ckpt_dir: Path, args: Mapping[str, Any]) -> list[int]:
    """Default folds: range(k_start, k_end) of args.txt, else every ``fold_<k>`` folder found."""
    start, end = args.get("k_start"), args.get("k_end")
    if isinstance(start, int) and isinstance(end, int) and 0 <= start < end:
        return list(range(start, end))
    found = sorted(
        int(p.name.split("_", 1)[1]) for p in ckpt_dir.glob("fold_*") if re.fullmatch(r"fold_\d+", p.name)
    )
    if not found:
        raise UserInputError(f"{ckpt_dir}: no fold_<k> folders found")
    return found


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


@dataclass(frozen=True)
class ImportSettings:
    """The network the checkpoints are imported into (from args.txt and the command line).

    Args:
        variant: ``lora`` or ``ft`` (the authors' ``tuning``).
        model_name: open_clip architecture.
        embed_dim: joint embedding width (the authors' ``out_dim``).
        dropout: text projection head dropout (the authors' ``dropout``).
        temperature: initial temperature (the authors' ``tau``; the logit scale itself is loaded).
        lora_scaling: alpha / sqrt(r) of the authors' LoRA (only to report the ignored update).
    """

    variant: str
    model_name: str
    embed_dim: int
    dropout: float
    temperature: float
    lora_scaling: float | None


def import_settings(args: Mapping[str, Any], args_path: Path, model_name: str | None) -> ImportSettings:
    """Validate the arguments the import needs and pick the open_clip architecture."""
    import open_clip

    tuning = _argument(args, "tuning", str, args_path)
    if tuning not in SUPPORTED_TUNING:
        raise UserInputError(
            f"{args_path}: tuning='{tuning}' is not supported; the importer reads the authors' "
            f"{' and '.join(repr(t) for t in SUPPORTED_TUNING)} checkpoints"
        )
    model = _argument(args, "model", str, args_path)
    name = model_name or reference_model_name(model)
    if name not in open_clip.list_models():
        raise UserInputError(
            f"--model-name '{name}' is not an open_clip architecture nor in --model-config-dir"
        )
    quick_gelu = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    if model.startswith("openai_") and not quick_gelu:
        raise UserInputError(
            f"{args_path}: model '{model}' was trained with QuickGELU but architecture '{name}' uses GELU; "
            "use its '-quickgelu' variant (or a config with \"quick_gelu\": true)"
        )
    rank, alpha = _optional(args, "r", None), _optional(args, "alpha", None)
    return ImportSettings(
        variant=SUPPORTED_TUNING[tuning],
        model_name=name,
        embed_dim=int(_optional(args, "out_dim", 256)),
        dropout=float(_optional(args, "dropout", 0.1)),
        temperature=float(_optional(args, "tau", 0.07)),
        lora_scaling=alpha / math.sqrt(rank) if rank and alpha is not None and rank > 0 else None,
    )


def _optional(args: Mapping[str, Any], name: str, default: float | None) -> float | None:
    """A numeric argument, or ``default`` when args.txt lacks it or it is not a number."""
    if name not in args:
        return default
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        logger.warning("args.txt %s=%r is not a number; using %r", name, value, default)
        return default
    return value


def build_network(settings: ImportSettings, model_config_dir: Path | None = None) -> SemanticCLIP:
    """The SemanticCLIP (plain open_clip keys, random weights) the checkpoints are loaded into."""
    from scripts.network import SemanticCLIP

    return SemanticCLIP(
        settings.model_name,
        pretrained=None,
        embed_dim=settings.embed_dim,
        dropout=settings.dropout,
        temperature=settings.temperature,
        tuning="full",
        model_config_dir=model_config_dir,
    )


def override_config(settings: ImportSettings) -> dict[str, Any]:
    """``configs/imported.json``: layered after inference.json or train.json + evaluate.json."""
    return {
        "model_name": settings.model_name,
        "pretrained": None,
        "tuning": "full",
        "network_def#pretrained": None,
        "network_def#tuning": "full",
        "network_def#embed_dim": settings.embed_dim,
        "network_def#dropout": settings.dropout,
        "checkpoint": "$@ckpt_dir + '/fold_0/model.pt'",
    }


def usage_lines() -> list[str]:
    """Commands that run the imported bundle (recorded in import_record.json)."""
    return [
        "python -m monai.bundle run --config_file \"['configs/inference.json','configs/imported.json']\" "
        "--meta_file configs/metadata.json --bundle_root BUNDLE --checkpoint BUNDLE/models/fold_K/model.pt",
        "python -m monai.bundle run --config_file "
        "\"['configs/train.json','configs/evaluate.json','configs/imported.json']\" "
        "--meta_file configs/metadata.json --bundle_root BUNDLE --checkpoint BUNDLE/models/fold_K/model.pt",
        "TorchScript predictors (deploy app, cross-validation): BUNDLE/models/fold_K/model.ts",
    ]


def _resolve_folds(
    ckpt_dir: Path, args: Mapping[str, Any], folds: Sequence[int] | None, name: str
) -> list[tuple[int, Path]]:
    """(source fold, checkpoint file) of each fold to import; every file must exist."""
    folds = list(folds) if folds is not None else _fold_folders(ckpt_dir, args)
    if not folds:
        raise UserInputError("--folds selects no fold")
    if len(set(folds)) != len(folds):
        raise UserInputError(f"--folds lists a fold twice: {folds}")
    paths = []
    for k in folds:
        folder = ckpt_dir / f"fold_{k}"
        if not folder.is_dir():
            raise UserInputError(f"{folder} not found (fold {k}); choose the folds present with --folds")
        if not (folder / name).is_file():
            raise UserInputError(f"{folder / name} not found (fold {k}); check --checkpoint-name")
        paths.append((k, folder / name))
    return paths


def import_reference(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    folds: Sequence[int] | None = None,
    checkpoint_name: str = DEFAULT_CHECKPOINT_NAME,
    model_name: str | None = None,
    model_config_dir: str | Path | None = None,
    bundle_root: str | Path = BUNDLE_ROOT,
) -> Path:
    """Write a bundle holding the authors' fold checkpoints as SemanticCLIP weights and TorchScript.

    Args:
        ckpt_dir: the authors' checkpoint folder (``args.txt``, ``fold_k/<checkpoint_name>``).
        out_dir: the bundle folder to create (must not exist).
        folds: source folds to import (default: ``k_start..k_end-1`` of args.txt, else all found);
            they are written as ``models/fold_0 ..`` in this order.
        checkpoint_name: the file in each fold folder.
        model_name: open_clip architecture (default: from args.txt's ``model``).
        model_config_dir: folder of extra open_clip JSON architectures (copied into the bundle).
        bundle_root: the project bundle to copy.

    Returns:
        the written bundle folder.
    """
    ckpt_dir, out_dir, bundle_root = Path(ckpt_dir), Path(out_dir), Path(bundle_root)
    if not ckpt_dir.is_dir():
        raise UserInputError(f"{ckpt_dir} is not a folder: pass the authors' checkpoint folder")
    if out_dir.exists():
        raise UserInputError(f"{out_dir} already exists; remove it or choose another --out")
    config_dir = Path(model_config_dir) if model_config_dir else None
    if config_dir is not None and not config_dir.is_dir():
        raise UserInputError(f"--model-config-dir {config_dir} is not a folder")
    args_path = ckpt_dir / ARGS_FILE
    args = read_args(ckpt_dir)
    from scripts.clip_backbone import register_model_configs  # heavy: after the checks of the folders

    if config_dir is not None:
        register_model_configs(config_dir)
    register_model_configs()
    settings = import_settings(args, args_path, model_name)
    fold_files = _resolve_folds(ckpt_dir, args, folds, checkpoint_name)
    unparsed = sorted(k for k, v in args.items() if isinstance(v, Unparsed))
    if unparsed:
        logger.warning("args.txt values kept as text (not Python literals): %s", ", ".join(unparsed))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing.", dir=out_dir.parent))
    try:
        shutil.copytree(bundle_root, staging, ignore=COPY_IGNORE, dirs_exist_ok=True)
        custom_config = config_dir / f"{settings.model_name}.json" if config_dir else None
        if custom_config is not None and custom_config.is_file():
            shutil.copy2(custom_config, staging / "configs" / "clip" / custom_config.name)
        metadata = json.loads((staging / "configs" / "metadata.json").read_text(encoding="utf-8"))
        network = build_network(settings, config_dir)
        target_shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
        records = []
        for index, (source_fold, path) in enumerate(tqdm(fold_files, desc="importing folds", unit="fold")):
            fold_metadata = {
                **metadata,
                "imported_from": {"variant": settings.variant, "source_fold": source_fold},
            }
            record = {"fold": index, "source_fold": source_fold, "source": str(path.relative_to(ckpt_dir))}
            record |= _import_fold(
                network, target_shapes, settings, path, staging / "models" / f"fold_{index}", fold_metadata
            )
            records.append(record)
        del network
        import_record = {
            "tool": "training.import_reference",
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_dir": str(ckpt_dir.resolve()),
            "checkpoint_name": checkpoint_name,
            "args_sha256": sha256_of(args_path),
            "args": _json_safe(args),
            "variant": settings.variant,
            "model_name": settings.model_name,
            "network": {
                "tuning": "full",
                "pretrained": None,
                "embed_dim": settings.embed_dim,
                "dropout": settings.dropout,
            },
            "note": MERGED_LORA_NOTE if settings.variant == "lora" else None,
            "config_override": f"configs/{OVERRIDE_CONFIG}",
            "usage": usage_lines(),
            "folds": records,
        }
        (staging / "configs" / OVERRIDE_CONFIG).write_text(
            json.dumps(override_config(settings), indent=4) + "\n", encoding="utf-8"
        )
        (staging / "models" / RECORD_FILE).write_text(
            json.dumps(import_record, indent=2) + "\n", encoding="utf-8"
        )
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "imported %d fold(s) (%s, %s) into %s", len(records), settings.variant, settings.model_name, out_dir
    )
    return out_dir


def _import_fold(
    network: SemanticCLIP,
    target_shapes: Mapping[str, Sequence[int]],
    settings: ImportSettings,
    source: Path,
    fold_dir: Path,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Convert, load, save and export one fold; only this fold's tensors are alive meanwhile."""
    import torch

    from scripts.export import export_torchscript

    state = load_reference_state(source)
    layout = attention_layout(state)
    if layout != settings.variant:
        raise UserInputError(
            f"{source}: args.txt says tuning='{settings.variant}' but the file holds "
            f"{'LoRA (q_proj/k_proj/v_proj)' if layout == 'lora' else 'fused (in_proj_weight)'} attention"
        )
    converted, plan = convert_state_dict(state, target_shapes, settings.variant, source)
    lora_matrices = [k for k in plan.dropped if k.endswith(LORA_MATRIX_SUFFIXES)]
    if lora_matrices and not _merged_note_logged:
        _merged_note_logged.append(True)
        logger.info("%s (%d LoRA tensors per fold)", MERGED_LORA_NOTE, len(lora_matrices))
    ratio = None
    if lora_matrices and settings.lora_scaling is not None:
        ratio = lora_update_ratio(state, settings.lora_scaling)
    class_weights = state.get("pred_criterion_val.weight")
    network.load_state_dict(converted, strict=True)
    del state, converted
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"network": network.state_dict()}, fold_dir / "model.pt")
    export_torchscript(network, fold_dir / "model.ts", extra_metadata=metadata)
    return {
        "sha256": sha256_of(source),
        "model_pt": str(Path("models") / fold_dir.name / "model.pt"),
        "model_ts": str(Path("models") / fold_dir.name / "model.ts"),
        "dropped_keys": sorted(k for k in plan.dropped if not k.endswith(LORA_MATRIX_SUFFIXES)),
        "ignored_lora_tensors": len(lora_matrices),
        "ignored_lora_update_max_relative_norm": ratio,
        "class_weights": class_weights.tolist() if class_weights is not None else None,
    }


def _fold_list(text: str) -> list[int]:
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers, got '{text}'") from None
    if any(k < 0 for k in folds):
        raise argparse.ArgumentTypeError(f"fold numbers are >= 0, got '{text}'")
    return folds


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", type=Path, help="the authors' folder with args.txt and fold_k/")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--folds", type=_fold_list, default=None, help="e.g. 0,1,2 (default: all)")
    parser.add_argument("--checkpoint-name", default=DEFAULT_CHECKPOINT_NAME)
    parser.add_argument("--model-name", default=None, help="open_clip architecture (default: from args.txt)")
    parser.add_argument("--model-config-dir", type=Path, default=None, help="extra open_clip JSON configs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = import_reference(
        args.ckpt_dir, args.out, args.folds, args.checkpoint_name, args.model_name, args.model_config_dir
    )
    print(f"bundle written: {out} (see {out / 'models' / RECORD_FILE})")


if __name__ == "__main__":
    main()
