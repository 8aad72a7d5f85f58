"""Fold models keep one copy of the weights they have in common, and predict exactly as before."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from deploy_app.inference import BundleModels
from scripts.errors import UserInputError
from scripts.export import (
    export_torchscript,
    exported_models,
    load_exported,
    load_fold_predictors,
    share_identical_weights,
    weight_bytes,
)
from scripts.network import SemanticCLIP
from scripts.vocabulary import FEATURES
from scripts.zero_shot import PromptLayout
from training.demo_bundle import TINY_MODEL, build_untrained_bundle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FOLDS = 3


@pytest.fixture(scope="module")
def lora_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_untrained_bundle(
        tmp_path_factory.mktemp("lora") / "bundle", folds=FOLDS, shared_backbone=True
    )


@pytest.fixture(scope="module")
def planes() -> torch.Tensor:
    return torch.randn(2, 9, 3, 224, 224, generator=torch.Generator().manual_seed(7))


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(module.named_parameters(), module.named_buffers()))


def _load_separately(bundle: Path) -> list[torch.jit.ScriptModule]:
    return [load_exported(path)[0] for path in exported_models(bundle).values()]


def _outputs(modules: list[torch.jit.ScriptModule], planes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return [module(planes) for module in modules]


def test_lora_folds_differ_only_in_adapted_projections_heads_and_prompts(lora_bundle: Path) -> None:
    first, *others = _load_separately(lora_bundle)
    reference = _tensors(first)
    for other in others:
        differing = {
            name for name, tensor in _tensors(other).items() if not torch.equal(tensor, reference[name])
        }
        in_proj = {
            name for name in reference if name.startswith("network.clip.visual.") and "in_proj_weight" in name
        }
        assert in_proj <= differing  # LoRA on q, k, v of every block, merged at export
        assert all(name in in_proj or not name.startswith("network.clip.visual.") for name in differing), (
            "only the adapted projections of the image tower may differ"
        )
        assert "network.clip.visual.conv1.weight" not in differing


def test_sharing_frees_exactly_the_equal_tensors_and_keeps_outputs_bitwise(
    lora_bundle: Path, planes: torch.Tensor
) -> None:
    modules = _load_separately(lora_bundle)
    before = _outputs(modules, planes)
    reference = _tensors(modules[0])
    equal_bytes = sum(
        tensor.numel() * tensor.element_size()
        for module in modules[1:]
        for name, tensor in _tensors(module).items()
        if torch.equal(tensor, reference[name])
    )
    separate = weight_bytes(modules)

    freed = share_identical_weights(modules)

    assert freed == equal_bytes > 0
    assert weight_bytes(modules) == separate - freed
    for module in modules[1:]:
        for name, tensor in _tensors(module).items():
            shares = tensor.untyped_storage().data_ptr() == reference[name].untyped_storage().data_ptr()
            assert shares == torch.equal(tensor, reference[name]), name
    for old, new in zip(before, _outputs(modules, planes), strict=True):
        assert old.keys() == new.keys()
        for key in old:
            assert torch.equal(old[key], new[key]), key
    assert share_identical_weights(modules) == 0  # nothing left to share


def test_independently_initialised_models_share_only_their_constant_initialisations(tmp_path: Path) -> None:
    bundle = build_untrained_bundle(tmp_path / "bundle", folds=2)  # other seed per fold, as full tuning
    first, second = _load_separately(bundle)
    constants = {
        name for name, tensor in _tensors(second).items() if torch.equal(tensor, _tensors(first)[name])
    }
    assert share_identical_weights([first, second]) > 0
    for name, tensor in _tensors(second).items():
        shared = tensor.data_ptr() == _tensors(first)[name].data_ptr()
        assert shared == (name in constants), name
    random_weights = [
        "network.clip.visual.conv1.weight",
        "network.clip.visual.transformer.resblocks.0.attn.in_proj_weight",
        "network.classifier_image.weight",
    ]
    assert not constants.intersection(random_weights)


def _holding(tensor: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.register_buffer("weight", tensor)
    return module


@pytest.mark.parametrize(
    "other",
    [torch.ones(2, 4, dtype=torch.float64), torch.ones(4, 2), torch.full((2, 4), 2.0)],
    ids=["other dtype", "other shape", "other values"],
)
def test_tensors_that_are_not_identical_are_not_shared(other: torch.Tensor) -> None:
    first, second = _holding(torch.ones(2, 4)), _holding(other)
    assert share_identical_weights([first, second]) == 0
    assert second.weight.data_ptr() != first.weight.data_ptr()


def test_equal_tensors_under_the_same_name_are_shared() -> None:
    first, second = nn.Linear(4, 2), nn.Linear(4, 2)
    with torch.no_grad():
        second.weight.copy_(first.weight)
    assert share_identical_weights([first, second]) == first.weight.numel() * 4
    assert second.weight.data_ptr() == first.weight.data_ptr()
    assert second.bias.data_ptr() != first.bias.data_ptr()
    assert isinstance(second.weight, nn.Parameter)


def test_bundle_models_hold_the_backbone_once_and_predict_as_separate_folds(
    lora_bundle: Path, planes: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    separate = _load_separately(lora_bundle)
    with caplog.at_level(logging.INFO, logger="deploy_app.inference"):
        models = BundleModels.load(lora_bundle)
    assert len(models.predictors) == FOLDS
    assert weight_bytes(models.predictors) < weight_bytes(separate) / 2
    assert "identical across folds shared" in caplog.text
    expected = torch.stack([out["malignancy"] for out in _outputs(separate, planes)]).numpy()
    assert (models.predict(planes)["malignancy_per_fold"] == expected).all()


def test_loaded_folds_report_what_they_share(lora_bundle: Path) -> None:
    folds = load_fold_predictors(exported_models(lora_bundle))
    separate = weight_bytes(_load_separately(lora_bundle))
    assert folds.shared_bytes == separate - weight_bytes(folds.modules) > separate / 2
    assert len(folds.metadata) == FOLDS and all(m["untrained_demo"] for m in folds.metadata)
    assert folds.layout["columns"]


def test_a_corrupt_fold_model_is_named(lora_bundle: Path, tmp_path: Path) -> None:
    paths = dict(exported_models(lora_bundle))
    broken = tmp_path / "model.ts"
    broken.write_bytes(paths[1].read_bytes()[:1000])
    paths[1] = broken
    with pytest.raises(UserInputError, match=r"fold 1: '.*model\.ts' is not a loadable exported model"):
        load_fold_predictors(paths)


def test_folds_with_other_semantic_outputs_are_refused(lora_bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "model.ts"
    layout = PromptLayout(features=FEATURES[:1])
    export_torchscript(SemanticCLIP(TINY_MODEL, pretrained=None, tuning="lora"), other, layout=layout)
    paths = {0: exported_models(lora_bundle)[0], 1: other}
    with pytest.raises(UserInputError, match="fold 1: .* predicts other semantic outputs than fold 0"):
        load_fold_predictors(paths)
