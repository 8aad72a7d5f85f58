"""Importing the authors' checkpoints: the paper's forward pass, strictness, LoRA merge rule, layout.

State dicts are random but in exactly the authors' layout (key names, order, extras) read from
training/data/reference_checkpoint.json (:mod:`training.reference_layout`), shrunk to the tiny
open_clip geometry of the bundle's test config. The imported model is compared with the paper's
forward pass written here with plain torch ops.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from scripts.errors import UserInputError
from scripts.export import load_checkpoint, load_predictor
from scripts.network import SemanticCLIP
from training import reference_layout
from training.import_reference import (
    KNOWN_EXTRAS,
    LORA_MATRIX_SUFFIXES,
    import_reference,
    import_settings,
    main,
    parse_args_text,
    plan_conversion,
    reference_model_name,
)

#: The authors' state-dict layout (key names, shapes, args.txt examples).
REFERENCE = reference_layout.reference_layout()
TINY_CONFIG = json.loads(
    (BUNDLE_ROOT / "configs" / "clip" / "lnsc-tiny-vit.json").read_text(encoding="utf-8")
)
TINY_QUICKGELU = "lnsc-tiny-vit-quickgelu"
OUT_DIM = 32  # the authors' out_dim, shrunk (256 in the paper)
VARIANTS = ("lora", "ft")
EOT = 49407  # OpenAI CLIP's end-of-text token, the largest id: the text tower pools at argmax


# ---------------------------------------------------------------- the authors' layout, tiny geometry


def tiny_dimension_map() -> dict[int, int]:
    """Reference (ViT-B/32) widths -> tiny widths, derived from the reference layout itself."""
    vision = reference_layout.reference_shape("ft", "vision_model.class_embedding")[0]
    text = reference_layout.reference_shape("ft", "ln_final.weight")[0]
    embed = reference_layout.reference_shape("ft", "vision_model.proj")[1]
    out = reference_layout.reference_shape("ft", "classifier_image.weight")[1]
    tiny_vision, tiny_text = TINY_CONFIG["vision_cfg"]["width"], TINY_CONFIG["text_cfg"]["width"]
    pairs = [
        (vision, tiny_vision), (3 * vision, 3 * tiny_vision), (4 * vision, 4 * tiny_vision),
        (text, tiny_text), (3 * text, 3 * tiny_text), (4 * text, 4 * tiny_text),
        (embed, TINY_CONFIG["embed_dim"]), (out, OUT_DIM),
    ]  # fmt: skip
    mapping: dict[int, int] = {}
    for ref, tiny in pairs:
        assert mapping.setdefault(ref, tiny) == tiny, f"reference width {ref} maps to two tiny widths"
    return mapping


def tiny_layout(variant: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every reference key (same order) of the blocks the tiny model has, with tiny shapes."""
    dims = tiny_dimension_map()
    layers = {"vision_model.": TINY_CONFIG["vision_cfg"]["layers"], "": TINY_CONFIG["text_cfg"]["layers"]}
    layout = []
    for entry in reference_layout.reference_entries(variant):
        key = entry["key"]
        block = re.search(r"resblocks\.(\d+)\.", key)
        tower = "vision_model." if key.startswith("vision_model.") else ""
        if block and int(block[1]) >= layers[tower]:
            continue
        layout.append((key, tuple(dims.get(d, d) for d in entry["shape"])))
    return layout


def random_reference_state(variant: str, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict in the authors' layout, tiny geometry; LoRA B matrices are non-zero."""
    return reference_layout.random_reference_state(variant, seed, layout=tiny_layout(variant))


def write_checkpoint_dir(
    root: Path, variant: str, states: list[dict[str, torch.Tensor]], args_text: str | None = None
) -> Path:
    """``args.txt`` + ``fold_k/best_both.pt`` as the authors' train.py writes them (tiny out_dim)."""
    text = args_text or reference_layout.args_text(variant, len(states), out_dim=OUT_DIM)
    text = re.sub(r"\bk_end=\d+", f"k_end={len(states)}", text)
    return reference_layout.write_checkpoint_dir(root, variant, states, text)


# ---------------------------------------------------------------- the paper's forward pass, plain torch


def layer_norm(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def attention_weights(state: dict, prefix: str, lora_scaling: float | None) -> tuple:
    """(q, k, v, out) weight/bias pairs of one block, from either layout (optionally re-adding LoRA)."""
    if f"{prefix}.q_proj.weight" in state:
        pairs = []
        for m in "qkv":
            weight = state[f"{prefix}.{m}_proj.weight"]
            if lora_scaling is not None:  # the authors' evaluate.py fold-0 double merge
                lora = state[f"{prefix}.{m}_proj.w_lora_B"] @ state[f"{prefix}.{m}_proj.w_lora_A"]
                weight = weight + lora * lora_scaling
            pairs.append((weight, state[f"{prefix}.{m}_proj.bias"]))
        pairs.append((state[f"{prefix}.proj.weight"], state[f"{prefix}.proj.bias"]))
        return tuple(pairs)
    weights = state[f"{prefix}.in_proj_weight"].chunk(3)
    biases = state[f"{prefix}.in_proj_bias"].chunk(3)
    out = (state[f"{prefix}.out_proj.weight"], state[f"{prefix}.out_proj.bias"])
    return (*zip(weights, biases, strict=True), out)


def residual_block(x: torch.Tensor, state: dict, prefix: str, heads: int, mask, lora_scaling) -> torch.Tensor:
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = attention_weights(state, f"{prefix}.attn", lora_scaling)
    batch, length, width = x.shape
    h = layer_norm(x, state, f"{prefix}.ln_1")

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, heads, width // heads).transpose(1, 2)

    q, k, v = split(h @ wq.T + bq), split(h @ wk.T + bk), split(h @ wv.T + bv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + attended @ wo.T + bo
    h = layer_norm(x, state, f"{prefix}.ln_2")
    h = h @ state[f"{prefix}.mlp.c_fc.weight"].T + state[f"{prefix}.mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as in OpenAI CLIP
    return x + h @ state[f"{prefix}.mlp.c_proj.weight"].T + state[f"{prefix}.mlp.c_proj.bias"]


def paper_image_forward(
    state: dict, planes: torch.Tensor, lora_scaling: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Planes (N, 9, 3, H, W) -> (L2-normalised MIL embedding, malignancy probability)."""
    cfg = TINY_CONFIG["vision_cfg"]
    nodules, n_planes = planes.shape[:2]
    conv = state["vision_model.conv1.weight"]
    x = F.conv2d(planes.flatten(0, 1), conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = state["vision_model.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["vision_model.positional_embedding"]
    x = layer_norm(x, state, "vision_model.ln_pre")
    for i in range(cfg["layers"]):
        prefix = f"vision_model.transformer.resblocks.{i}"
        x = residual_block(x, state, prefix, cfg["width"] // cfg["head_width"], None, lora_scaling)
    features = layer_norm(x[:, 0], state, "vision_model.ln_post") @ state["vision_model.proj"]
    features = features.view(nodules, n_planes, -1)
    projected = torch.relu(
        features @ state["image_projection.projector.0.weight"].T + state["image_projection.projector.0.bias"]
    )
    hidden = torch.tanh(
        projected @ state["image_projection.attention.0.weight"].T
        + state["image_projection.attention.0.bias"]
    )
    scores = (
        hidden @ state["image_projection.attention.2.weight"].T + state["image_projection.attention.2.bias"]
    )
    weights = scores.squeeze(-1).softmax(dim=1)
    pooled = (weights.unsqueeze(-1) * projected).sum(dim=1)
    embedding = pooled / pooled.norm(dim=-1, keepdim=True)
    logits = embedding @ state["classifier_image.weight"].T + state["classifier_image.bias"]
    return embedding, logits.softmax(dim=-1)[:, 1]


def paper_text_forward(state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens (N, 77) -> L2-normalised projection-head embedding (eval mode: no dropout)."""
    cfg = TINY_CONFIG["text_cfg"]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    length = tokens.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(cfg["layers"]):
        x = residual_block(x, state, f"transformer.resblocks.{i}", cfg["heads"], causal, None)
    x = layer_norm(x, state, "ln_final")
    text = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ state["text_projection"]
    projected = (
        text @ state["semantic_projection.projection.weight"].T + state["semantic_projection.projection.bias"]
    )
    hidden = (
        F.gelu(projected) @ state["semantic_projection.fc.weight"].T + state["semantic_projection.fc.bias"]
    )
    embedding = layer_norm(hidden + projected, state, "semantic_projection.layer_norm")
    return embedding / embedding.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with OpenAI CLIP's QuickGELU (the authors' model is OpenAI CLIP)."""
    folder = tmp_path_factory.mktemp("clip_configs")
    (folder / f"{TINY_QUICKGELU}.json").write_text(json.dumps({**TINY_CONFIG, "quick_gelu": True}))
    return folder


@pytest.fixture(scope="module")
def planes() -> torch.Tensor:
    return torch.randn(2, 9, 3, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    for row, length in enumerate((5, 11)):
        tokens[row, 0] = 49406
        tokens[row, 1:length] = torch.randint(1, 49000, (length - 1,), generator=generator)
        tokens[row, length] = EOT
    return tokens


@pytest.fixture(scope="module", params=VARIANTS)
def imported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_config_dir: Path
):
    """An imported two-fold bundle of each variant, with the source state dicts."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"import_{variant}")
    states = [random_reference_state(variant, seed) for seed in (10, 11)]
    ckpt = write_checkpoint_dir(root / "ckpt", variant, states)
    bundle = import_reference(
        ckpt, root / "bundle", model_name=TINY_QUICKGELU, model_config_dir=model_config_dir
    )
    return {"variant": variant, "states": states, "ckpt": ckpt, "bundle": bundle}


def expect_user_error(tmp_path: Path, match: str, **kwargs) -> UserInputError:
    """Importing must fail with ``match`` in the message and leave no folder behind."""
    out = tmp_path / "out"
    kwargs.setdefault("model_name", TINY_QUICKGELU)
    with pytest.raises(UserInputError, match=match) as caught:
        import_reference(kwargs.pop("ckpt"), out, **kwargs)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "staging folder left behind"
    return caught.value


# ---------------------------------------------------------------- tests: faithful import


def test_exported_predictors_reproduce_the_papers_forward_pass(imported: dict, planes: torch.Tensor) -> None:
    for fold, state in enumerate(imported["states"]):
        module, _ = load_predictor(imported["bundle"] / "models" / f"fold_{fold}" / "model.ts")
        with torch.no_grad():
            outputs = module(planes)
            embedding, probability = paper_image_forward(state, planes)
        torch.testing.assert_close(outputs["embedding"], embedding, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs["malignancy"], probability, atol=1e-5, rtol=1e-5)
    first, second = (paper_image_forward(s, planes)[1] for s in imported["states"])
    assert not torch.allclose(first, second, atol=1e-4), "folds must hold their own weights"


def test_bundle_configs_build_and_strictly_load_the_imported_network(
    imported: dict, planes: torch.Tensor, tokens: torch.Tensor
) -> None:
    bundle = imported["bundle"]
    parser = ConfigParser()
    parser.read_config(
        [str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "imported.json")]
    )
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, SemanticCLIP) and network.tuning == "full"
    load_checkpoint(network, bundle / "models" / "fold_1" / "model.pt")
    network.eval()
    state = imported["states"][1]
    with torch.no_grad():
        outputs = network(planes)
        embedding, probability = paper_image_forward(state, planes)
        torch.testing.assert_close(outputs["image_embedding"], embedding, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            outputs["image_logits"].softmax(-1)[:, 1], probability, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            network.encode_reports(tokens), paper_text_forward(state, tokens), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(network.clip.logit_scale, state["logit_scale"])


def test_evaluate_config_stack_loads_the_imported_checkpoint(imported: dict) -> None:
    bundle = imported["bundle"]
    stack = [str(bundle / "configs" / name) for name in ("train.json", "evaluate.json", "imported.json")]
    parser = ConfigParser()
    parser.read_config(stack)
    parser["bundle_root"] = str(bundle)
    assert parser.get_parsed_content("checkpoint") == f"{bundle}/models/fold_0/model.pt"
    network = parser.get_parsed_content("network_def")  # train.json's pretrained 'openai' is overridden
    assert network.tuning == "full" and network.model_name == TINY_QUICKGELU
    load_checkpoint(network, parser.get_parsed_content("checkpoint"))


def test_stored_lora_matrices_are_not_added_again(imported: dict, planes: torch.Tensor) -> None:
    state = imported["states"][0]
    if imported["variant"] != "lora":  # full fine-tuning stores no LoRA matrices: nothing to add
        assert not any("lora" in key for key in state)
        return
    assert all(state[k].abs().sum() > 0 for k in state if k.endswith(".w_lora_B"))
    module, _ = load_predictor(imported["bundle"] / "models" / "fold_0" / "model.ts")
    with torch.no_grad():
        outputs = module(planes)
        merged = paper_image_forward(state, planes)
        double_merged = paper_image_forward(state, planes, lora_scaling=1 / math.sqrt(2))
    for got, as_trained, double in zip(
        (outputs["embedding"], outputs["malignancy"]), merged, double_merged, strict=True
    ):
        torch.testing.assert_close(got, as_trained, atol=1e-5, rtol=1e-5)
        assert (got - double).abs().max() > 1e-3


def test_bundle_layout_record_and_override(imported: dict) -> None:
    bundle, ckpt, variant = imported["bundle"], imported["ckpt"], imported["variant"]
    models = bundle / "models"
    assert sorted(p.name for p in models.iterdir()) == ["fold_0", "fold_1", "import_record.json"]
    assert {p.name for p in (models / "fold_0").iterdir()} == {"model.pt", "model.ts"}
    for name in ("configs/inference.json", "configs/evaluate.json", "scripts/network.py", "LICENSE"):
        assert (bundle / name).is_file()
    assert (bundle / "configs" / "clip" / f"{TINY_QUICKGELU}.json").is_file()
    assert not list(bundle.rglob("__pycache__"))
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.")]

    record = json.loads((models / "import_record.json").read_text())
    assert record["variant"] == variant and record["model_name"] == TINY_QUICKGELU
    assert record["args"]["tuning"] == variant and record["args"]["params"] == ["q", "k", "v"]
    assert record["source_dir"] == str(ckpt.resolve())
    assert [f["source_fold"] for f in record["folds"]] == [0, 1]
    import hashlib

    for fold in record["folds"]:
        source = ckpt / fold["source"]
        assert fold["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert fold["dropped_keys"] == sorted(KNOWN_EXTRAS)
    assert record["args_sha256"] == hashlib.sha256((ckpt / "args.txt").read_bytes()).hexdigest()
    if variant == "lora":
        assert "not added a second time" in record["note"]
        assert record["folds"][0]["ignored_lora_tensors"] == 2 * 3 * 2 * 2  # A, B x q, k, v x blocks x towers
        assert record["folds"][0]["ignored_lora_update_max_relative_norm"] > 0
    else:
        assert record["note"] is None and record["folds"][0]["ignored_lora_tensors"] == 0

    override = json.loads((bundle / "configs" / "imported.json").read_text())
    assert override["model_name"] == TINY_QUICKGELU and override["network_def#tuning"] == "full"
    assert override["pretrained"] is None and override["network_def#embed_dim"] == OUT_DIM


def test_lora_merge_note_is_logged_once(tmp_path: Path, model_config_dir: Path, caplog) -> None:
    import training.import_reference as importer

    importer._merged_note_logged.clear()
    states = [random_reference_state("lora", seed) for seed in (1, 2)]
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", "lora", states)
    with caplog.at_level("INFO", logger="training.import_reference"):
        import_reference(ckpt, tmp_path / "out", model_name=TINY_QUICKGELU, model_config_dir=model_config_dir)
    notes = [r for r in caplog.records if "not added a second time" in r.getMessage()]
    assert len(notes) == 1 and "docs/method.md" in notes[0].getMessage()


# ---------------------------------------------------------------- tests: the real ViT-B/32 layout


@pytest.fixture(scope="module")
def vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    args = parse_args_text(REFERENCE["variants"]["lora"]["args_txt_example"])
    settings = import_settings(args, Path("args.txt"), None)
    assert settings.model_name == "ViT-B-32-quickgelu" and settings.embed_dim == 256
    network = SemanticCLIP(settings.model_name, pretrained=None, embed_dim=settings.embed_dim, tuning="full")
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_reference_key_maps_onto_vit_b32(variant: str, vit_b32_shapes: dict) -> None:
    source = {e["key"]: tuple(e["shape"]) for e in reference_layout.reference_entries(variant)}
    assert len(source) == REFERENCE["variants"][variant]["num_state_dict_entries"]
    plan = plan_conversion(source, vit_b32_shapes, variant)
    assert plan.ok, (plan.missing[:3], plan.unexpected[:3], plan.mismatched[:3])
    assert set(plan.sources) == set(vit_b32_shapes)
    lora = {k for k in source if k.endswith(LORA_MATRIX_SUFFIXES)}
    assert len(lora) == REFERENCE["variants"][variant]["num_lora_tensors"]
    assert set(plan.dropped) == set(KNOWN_EXTRAS) | lora
    used = {k for keys in plan.sources.values() for k in keys}
    assert used | set(plan.dropped) == set(source)
    heads = [
        k
        for k in source
        if k.split(".")[0] in {"image_projection", "semantic_projection", "classifier_image"}
    ]
    assert all(plan.sources[k] == (k,) for k in heads)  # the heads' names already match the authors'


def test_args_examples_parse_without_eval(tmp_path: Path) -> None:
    args = parse_args_text(REFERENCE["variants"]["lora"]["args_txt_example"])
    assert args["tuning"] == "lora" and args["model"] == "openai_ViT-B/32"
    assert args["params"] == ["q", "k", "v"] and args["r"] == 2 and args["lr"] == 0.0001
    assert args["augmentation"] is False
    marker = tmp_path / "pwned"
    hostile = parse_args_text(f"Namespace(model=__import__('os').system('touch {marker}'), tau=inf)")
    assert not marker.exists() and "system" in str(hostile["model"]) and hostile["tau"] == float("inf")


def test_openai_model_names_map_to_quickgelu_architectures() -> None:
    assert reference_model_name("openai_ViT-B/32") == "ViT-B-32-quickgelu"
    assert reference_model_name("openai_ViT-B/16") == "ViT-B-16-quickgelu"
    with pytest.raises(UserInputError, match="--model-name"):
        reference_model_name("openai_RN50")


# ---------------------------------------------------------------- tests: strictness and bad input


MUTATIONS = {
    "unexpected": (lambda state, key: state.__setitem__(key, torch.zeros(3)), "unexpected keys: {key} (1)"),
    "missing": (lambda state, key: state.pop(key), "missing keys: {key} (1)"),
    "shape": (
        lambda state, key: state.__setitem__(key, torch.zeros(3, OUT_DIM)),
        f"shape mismatches: {{key}}: (3, {OUT_DIM}) vs expected (2, {OUT_DIM}) (1)",
    ),
}


@pytest.mark.parametrize(
    ("variant", "mutation", "key"),
    [
        ("lora", "unexpected", "vision_model.extra_head.weight"),
        ("ft", "unexpected", "classifier_extra.bias"),
        ("lora", "missing", "vision_model.ln_post.bias"),
        ("lora", "missing", "transformer.resblocks.1.attn.k_proj.weight"),
        ("lora", "missing", "vision_model.transformer.resblocks.0.attn.proj.bias"),
        ("ft", "missing", "vision_model.transformer.resblocks.0.attn.out_proj.weight"),
        ("ft", "shape", "classifier_image.weight"),
    ],
)
def test_strict_loading_names_the_file_and_keys(
    tmp_path: Path, model_config_dir: Path, variant: str, mutation: str, key: str
) -> None:
    mutate, message = MUTATIONS[mutation]
    bad = random_reference_state(variant, 1)
    mutate(bad, key)
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", variant, [random_reference_state(variant, 0), bad])
    error = expect_user_error(
        tmp_path, re.escape(message.format(key=key)), ckpt=ckpt, model_config_dir=model_config_dir
    )
    assert "fold_1/best_both.pt" in str(error)


def test_unexpected_and_missing_keys_are_counted(tmp_path: Path, model_config_dir: Path) -> None:
    state = random_reference_state("ft", 0)
    for key in [k for k in state if k.startswith("semantic_projection.")]:
        state[key.replace("semantic_projection.", "text_head.")] = state.pop(key)
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", "ft", [state])
    error = expect_user_error(tmp_path, r"missing keys: .*\(6 in all\); unexpected keys: .*\(6 in all\)",
                              ckpt=ckpt, model_config_dir=model_config_dir)  # fmt: skip
    assert "semantic_projection.fc.weight" in str(error) and "text_head." in str(error)


def test_layout_must_match_args_tuning(tmp_path: Path, model_config_dir: Path) -> None:
    ft_args = REFERENCE["variants"]["ft"]["args_txt_example"].replace("out_dim=256", f"out_dim={OUT_DIM}")
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", "lora", [random_reference_state("lora", 0)], ft_args)
    expect_user_error(
        tmp_path, r"tuning='ft' but the file holds LoRA", ckpt=ckpt, model_config_dir=model_config_dir
    )


def test_unknown_layout_and_non_state_dict_files(tmp_path: Path, model_config_dir: Path) -> None:
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", "ft", [{"weight": torch.zeros(2)}])
    expect_user_error(tmp_path, "unknown checkpoint layout", ckpt=ckpt, model_config_dir=model_config_dir)
    torch.save({"epoch": 3}, ckpt / "fold_0" / "best_both.pt")
    expect_user_error(tmp_path, r"best_both\.pt: expected a dict whose key 'model'", ckpt=ckpt,
                      model_config_dir=model_config_dir)  # fmt: skip
    (ckpt / "fold_0" / "best_both.pt").write_bytes(b"not a checkpoint")
    expect_user_error(
        tmp_path, r"best_both\.pt: cannot be loaded", ckpt=ckpt, model_config_dir=model_config_dir
    )


def test_missing_fold_folder_is_named(tmp_path: Path, model_config_dir: Path) -> None:
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", "ft", [random_reference_state("ft", 0)])
    (ckpt / "args.txt").write_text(REFERENCE["variants"]["ft"]["args_txt_example"])  # k_end=5: folds 0..4
    expect_user_error(tmp_path, r"fold_1 not found \(fold 1\)", ckpt=ckpt, model_config_dir=model_config_dir)
    expect_user_error(tmp_path, r"fold_0/best_clip\.pt not found", ckpt=ckpt, folds=[0],
                      checkpoint_name="best_clip.pt", model_config_dir=model_config_dir)  # fmt: skip


@pytest.mark.parametrize(
    ("args_text", "match"),
    [
        (None, r"args\.txt not found"),
        ("dict(lr=0.1, tuning='ft')", r"args\.txt: expected one line 'Namespace"),
        ("Namespace(model='openai_ViT-B/32', tuning=", r"args\.txt: not a Namespace"),
        ("Namespace(model='openai_ViT-B/32', tuning='linear')", r"tuning='linear' is not supported"),
        ("Namespace(model='openai_ViT-B/32', tuning=os.environ)", r"'tuning' is missing or not a"),
        ("Namespace(tuning='ft')", r"'model' is missing"),
    ],
)
def test_bad_checkpoint_folder_gets_a_clear_message(
    tmp_path: Path, args_text: str | None, match: str
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if args_text is not None:
        (ckpt / "args.txt").write_text(args_text)
    expect_user_error(tmp_path, match, ckpt=ckpt)


def test_gelu_architecture_is_refused_for_openai_weights(tmp_path: Path) -> None:
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", "ft", [random_reference_state("ft", 0)])
    expect_user_error(tmp_path, "QuickGELU", ckpt=ckpt, model_name="lnsc-tiny-vit")


def test_existing_output_is_not_touched(tmp_path: Path) -> None:
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", "ft", [random_reference_state("ft", 0)])
    (tmp_path / "out").mkdir()
    with pytest.raises(UserInputError, match="already exists"):
        import_reference(ckpt, tmp_path / "out", model_name=TINY_QUICKGELU)
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "bundle")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "args.txt not found" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "bundle"), "--folds", "0,x"])
    assert not (tmp_path / "bundle").exists()
