"""Export a trained network as one self-contained TorchScript predictor (``models/model.ts``).

LoRA is merged, attention fused back to open_clip's modules, the text tower dropped and the prompt
embeddings baked in as a buffer: the deploy app needs neither a tokenizer nor training code.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scripts.clip_backbone import create_tokenizer
from scripts.errors import UserInputError
from scripts.memory import release_freed_memory
from scripts.network import SemanticCLIP
from scripts.zero_shot import PromptLayout, embed_prompts, zero_shot_probabilities

logger = logging.getLogger(__name__)

LAYOUT_FILE = "semantic_outputs.json"
"""Extra file inside model.ts: the (feature, value) of every column of the ``semantic`` output."""

METADATA_FILE = "metadata.json"
"""Extra file inside model.ts: ``extra_metadata`` given at export (e.g. bundle version, demo flag)."""

PLANES_SHAPE = (9, 3, 224, 224)


@contextlib.contextmanager
def _torchscript_without_deprecation_noise() -> Iterator[None]:
    # torch 2.14 marks torch.jit deprecated; TorchScript is still what MONAI Deploy loads, on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


class SemanticCLIPPredictor(nn.Module):
    """Image-only inference: planes ``(N, 9, 3, 224, 224)`` -> dict of tensors.

    Outputs ``malignancy`` (N,) probability of the image head, ``semantic`` (N, V) zero-shot value
    probabilities (see :class:`scripts.zero_shot.PromptLayout`), ``embedding`` (N, D) and
    ``attention`` (N, 9) MIL weights.

    Args:
        network: a trained :class:`SemanticCLIP`; it is copied, not changed.
        layout: which semantic features to predict.
    """

    def __init__(self, network: SemanticCLIP, layout: PromptLayout | None = None) -> None:
        super().__init__()
        layout = layout or PromptLayout()
        network = copy.deepcopy(network).cpu().eval()
        network.merge_adapters()
        tokenizer = create_tokenizer(network.model_name)
        self.register_buffer("prompt_embedding", embed_prompts(network.encode_reports, tokenizer, layout))
        self.register_buffer("logit_scale", network.logit_scale.detach().clone())
        self.group_sizes = layout.group_sizes
        # Only the image branch is needed at inference.
        network.clip.transformer = None
        network.clip.token_embedding = None
        network.semantic_projection = None
        network.classifier_text = None
        self.network = network
        self.requires_grad_(False)  # inference only: outputs carry no autograd graph

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding, attention = self.network.encode_planes(image)
        logits = self.network.classifier_image(embedding)
        return {
            "malignancy": torch.softmax(logits, dim=-1)[:, 1],
            "semantic": zero_shot_probabilities(
                embedding, self.prompt_embedding, self.group_sizes, self.logit_scale
            ),
            "embedding": embedding,
            "attention": attention,
        }


def export_torchscript(
    network: SemanticCLIP,
    output_path: str | Path,
    checkpoint: str | Path | None = None,
    layout: PromptLayout | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Trace the predictor of ``network`` (optionally loading ``checkpoint`` first) to ``output_path``.

    The file is written under a temporary name and renamed, so a failed export leaves nothing behind.

    Args:
        network: the network as configured for training.
        output_path: where to write ``model.ts``.
        checkpoint: a state dict file saved by training (a dict holding ``network`` or the state dict).
        layout: semantic features to bake in (default: all 17).
        extra_metadata: stored beside the layout in the TorchScript extra files (e.g. bundle version).

    Returns:
        the written path.
    """
    layout = layout or PromptLayout()
    predictor = build_predictor(network, checkpoint, layout)
    example = torch.zeros(2, *PLANES_SHAPE)
    with torch.no_grad(), _torchscript_without_deprecation_noise():
        traced = torch.jit.trace(predictor, example, strict=False, check_trace=False)
    extra = {
        LAYOUT_FILE: json.dumps({"columns": layout.columns, "group_sizes": layout.group_sizes}),
        METADATA_FILE: json.dumps(extra_metadata or {}),
    }
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=output_path.parent, suffix=".tmp")
    os.close(handle)
    try:
        with _torchscript_without_deprecation_noise():
            torch.jit.save(traced, tmp_name, _extra_files=extra)
        os.replace(tmp_name, output_path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    logger.info("exported %s", output_path)
    return output_path


def load_checkpoint(network: nn.Module, checkpoint: str | Path) -> None:
    """Load a training checkpoint strictly (``{"network": state_dict}`` or a bare state dict)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("network", state)
    network.load_state_dict(state, strict=True)


def load_exported(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.jit.ScriptModule, dict, dict]:
    """Load an exported predictor, its semantic output layout and the metadata stored with it."""
    extra = {LAYOUT_FILE: "", METADATA_FILE: ""}
    with _torchscript_without_deprecation_noise():
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    return module.eval(), json.loads(extra[LAYOUT_FILE]), json.loads(extra[METADATA_FILE] or "{}")


def _storage_address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device


def share_identical_weights(modules: Sequence[nn.Module]) -> int:
    """Let weights that are equal in several loaded models use one copy; returns the bytes freed.

    Cross-validation folds fine-tuned with LoRA from one backbone differ only in the adapted attention
    projections (merged at export) and the heads: about three quarters of a ViT-B/32 image tower is
    the same in every fold, so five folds hold about two folds' worth of weights instead of five
    (``bench/bench_deploy.py`` prints the weights held). A tensor is shared only
    when its name, dtype, shape, device and every value equal those of the first model's, so outputs
    are bitwise unchanged; models that have nothing in common (full fine-tuning) keep their own copies.
    Inference only: a shared parameter changed in place would change every model that shares it.

    Args:
        modules: models of one architecture, e.g. the folds of a bundle, on one device.
    """
    first: dict[str, torch.Tensor] = {}
    freed = 0
    with torch.no_grad():
        for module in modules:
            for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
                kept = first.setdefault(name, tensor)
                if _storage_address(kept) == _storage_address(tensor):
                    continue
                if _same_kind(kept, tensor) and torch.equal(kept, tensor):
                    # rebinding .data frees this copy; the module keeps the same Parameter object
                    tensor.data = kept.data
                    freed += tensor.numel() * tensor.element_size()
    return freed


def weight_bytes(modules: Sequence[nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``, each storage counted once."""
    storages = {
        _storage_address(tensor): tensor.untyped_storage().nbytes()
        for module in modules
        for tensor in itertools.chain(module.parameters(), module.buffers())
    }
    return sum(storages.values())


@dataclass
class FoldPredictors:
    """The exported predictors of a bundle's folds, loaded for inference.

    Args:
        modules: the predictors, in fold order.
        layout: the semantic output layout they all share.
        metadata: each fold's export metadata.
    """

    modules: list[torch.jit.ScriptModule]
    layout: dict
    metadata: list[dict]

    @property
    def shared_bytes(self) -> int:
        """Bytes of weights that are identical across folds and kept once."""
        return sum(weight_bytes([module]) for module in self.modules) - weight_bytes(self.modules)


def load_fold_predictors(
    model_paths: Mapping[int, Path], device: torch.device | str = "cpu"
) -> FoldPredictors:
    """Load every fold's predictor (see :func:`exported_models`), one at a time, sharing equal weights.

    Folds are loaded one after the other and each is passed through :func:`share_identical_weights`
    with the first, so no more than one extra copy of the backbone is held while loading.

    Raises:
        UserInputError: a file is not a loadable exported predictor, or the folds predict different
            semantic outputs.
    """
    modules: list[torch.jit.ScriptModule] = []
    metadata: list[dict] = []
    layout: dict | None = None
    first = min(model_paths, default=0)
    for fold, path in model_paths.items():
        try:
            module, fold_layout, fold_metadata = load_exported(path, device)
        except Exception as error:  # corrupt, truncated, not TorchScript, no layout: all mean "cannot use"
            raise UserInputError(
                f"fold {fold}: '{path}' is not a loadable exported model ({error}); export it again"
            ) from error
        if layout is not None and fold_layout != layout:
            raise UserInputError(
                f"fold {fold}: '{path}' predicts other semantic outputs than fold {first} "
                f"('{model_paths[first]}'); export all folds with one bundle version"
            )
        layout = fold_layout
        if modules:
            share_identical_weights([modules[0], module])
        modules.append(module)
        metadata.append(fold_metadata)
    if len(modules) > 1:
        release_freed_memory()  # the copies freed by sharing would otherwise stay resident
    return FoldPredictors(modules, layout or {}, metadata)


def load_predictor(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.jit.ScriptModule, dict]:
    """Load an exported predictor and its semantic output layout."""
    module, layout, _ = load_exported(path, device)
    return module, layout


def build_predictor(
    network: SemanticCLIP, checkpoint: str | Path | None = None, layout: PromptLayout | None = None
) -> SemanticCLIPPredictor:
    """The eval-mode (CPU) predictor of ``network``, after loading ``checkpoint`` when given."""
    if checkpoint is not None:
        load_checkpoint(network, checkpoint)
    return SemanticCLIPPredictor(network, layout).eval()


_FOLD_DIR = re.compile(r"fold_(\d+)$")


def exported_models(bundle_dir: str | Path, models_dir: str | Path | None = None) -> dict[int, Path]:
    """The exported predictor of every fold of a deployable bundle, by fold index.

    A bundle holds ``models/fold_<k>/model.ts`` per cross-validation fold, or one ``models/model.ts``
    (returned as fold 0); when fold models exist, ``models/model.ts`` is ignored (with a warning).

    Args:
        bundle_dir: the bundle folder.
        models_dir: where the models are (default ``bundle_dir/models``), e.g. a model set such as
            ``models/demo/`` inside the bundle.

    Raises:
        UserInputError: the folder does not exist or holds no exported model.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserInputError(f"bundle folder '{bundle_dir}' does not exist or is not a folder")
    models = Path(models_dir) if models_dir is not None else bundle_dir / "models"
    folds = {
        int(match.group(1)): folder / "model.ts"
        for folder in (models.iterdir() if models.is_dir() else ())
        if (match := _FOLD_DIR.match(folder.name)) and (folder / "model.ts").is_file()
    }
    if folds:
        if (models / "model.ts").is_file():
            logger.warning("%s: using the fold models; models/model.ts is ignored", bundle_dir)
        return dict(sorted(folds.items()))
    if (models / "model.ts").is_file():
        return {0: models / "model.ts"}
    raise UserInputError(
        f"bundle '{bundle_dir}' has no exported model: expected {models}/fold_<k>/model.ts for each fold or "
        f"{models}/model.ts (export one with the bundle's 'export' workflow, or give a model set inside "
        "the bundle, such as bundle/models/demo)"
    )
