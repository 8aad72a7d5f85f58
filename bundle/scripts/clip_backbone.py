"""The open_clip backbone: one factory, explicit ``pretrained`` handling, LoRA on separate q/k/v.

open_clip fuses q, k and v into ``nn.MultiheadAttention.in_proj_weight``; peft's native support for
that module is one joint LoRA, whereas the paper adapts q, k and v separately. So for training each
attention is split into three ``nn.Linear`` projections (:class:`SplitQKVAttention`), peft injects
LoRA into them, and :func:`merge_lora` folds the update in and fuses the projections back into a
standard ``nn.MultiheadAttention``: an exported model has vanilla open_clip keys.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from scripts.errors import UserInputError

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "clip"
"""Bundle-local open_clip architecture configs (e.g. the tiny test/demo model)."""

ENCODERS = ("vision", "text", "both")
RANDOM_WEIGHTS = ("", "none", "null", "random")
"""``pretrained`` spellings meaning random initialisation (``None`` cannot be given on the command line)."""


def register_model_configs(config_dir: str | Path = MODEL_CONFIG_DIR) -> None:
    """Make the JSON architectures in ``config_dir`` known to open_clip (idempotent)."""
    config_dir = Path(config_dir)
    missing = [p.stem for p in config_dir.glob("*.json") if p.stem not in open_clip.list_models()]
    if missing:
        open_clip.add_model_config(config_dir)


def _hub_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _tag_is_cached(cfg: dict) -> bool:
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(cfg["hf_hub"])
        candidates = (
            [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in candidates)
    if cfg.get("url"):
        return (Path.home() / ".cache" / "clip" / os.path.basename(cfg["url"])).is_file()
    return False


def _check_pretrained_available(model_name: str, tag: str) -> None:
    """Fail fast, with advice, when a pretrained tag would need a hub that cannot be reached."""
    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = ", ".join(list_pretrained_tags_by_model(model_name)) or "none"
        raise UserInputError(
            f"pretrained '{tag}' is neither a file nor a known open_clip tag for {model_name} "
            f"(known tags: {known})"
        )
    if _tag_is_cached(cfg):
        return
    host = "huggingface.co" if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname or ""
    if _offline() or not _hub_reachable(host):
        raise UserInputError(
            f"pretrained '{tag}' for {model_name} must be downloaded from {host}, which cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network). Download the checkpoint on a machine with a "
            "network and pass its local path as `pretrained`, or use pretrained=null for random weights."
        )


def create_clip(
    model_name: str, pretrained: str | None = None, model_config_dir: str | Path | None = None
) -> nn.Module:
    """Build an open_clip CLIP model by architecture name.

    Args:
        model_name: an open_clip architecture (``ViT-B-32``) or one of the bundle's JSON configs.
        pretrained: ``None``, ``""`` or ``"none"`` for random weights, a local checkpoint file, or an
            open_clip tag such as ``openai`` (needs the hub unless cached; fails fast offline).
        model_config_dir: extra folder of open_clip JSON architecture configs (default: the bundle's).

    Returns:
        the open_clip model, on CPU, in float32.
    """
    register_model_configs(model_config_dir or MODEL_CONFIG_DIR)
    if model_name not in open_clip.list_models():
        raise UserInputError(
            f"unknown CLIP architecture '{model_name}'; use one of open_clip.list_models() or add a JSON "
            f"config to {model_config_dir or MODEL_CONFIG_DIR}"
        )
    if pretrained is not None and pretrained.strip().lower() in RANDOM_WEIGHTS:
        pretrained = None
    if pretrained:
        looks_like_path = os.sep in pretrained or Path(pretrained).suffix in {
            ".pt",
            ".bin",
            ".safetensors",
            ".pth",
        }
        if looks_like_path or Path(pretrained).exists():
            if not Path(pretrained).is_file():
                raise UserInputError(f"pretrained checkpoint file not found: {pretrained}")
        else:
            _check_pretrained_available(model_name, pretrained)
    model = open_clip.create_model(model_name, pretrained=pretrained or None, pretrained_text=False)
    logger.info("CLIP %s created with %s weights", model_name, pretrained or "random")
    return model.float()


class SplitQKVAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections, batch first.

    A drop-in for the ``nn.MultiheadAttention`` calls open_clip's residual blocks make
    (``attn(q, k, v, need_weights=False, attn_mask=mask)[0]``).

    Args:
        embed_dim: model width.
        num_heads: number of heads.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> SplitQKVAttention:
        """Split a fused, batch-first ``nn.MultiheadAttention`` (weights copied)."""
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
            raise ValueError("only batch-first self-attention with fused, biased in_proj can be split")
        split = cls(mha.embed_dim, mha.num_heads).to(mha.in_proj_weight)
        with torch.no_grad():
            for proj, weight, bias in zip(
                (split.q_proj, split.k_proj, split.v_proj),
                mha.in_proj_weight.chunk(3),
                mha.in_proj_bias.chunk(3),
                strict=True,
            ):
                proj.weight.copy_(weight)
                proj.bias.copy_(bias)
            split.out_proj.load_state_dict(mha.out_proj.state_dict())
        return split

    def to_multihead(self) -> nn.MultiheadAttention:
        """Fuse back into a standard ``nn.MultiheadAttention`` (plain ``nn.Linear`` projections only)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if not all(type(p) is nn.Linear for p in projections):
            raise RuntimeError("merge the LoRA adapters before fusing the attention projections")
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, batch_first=True).to(self.q_proj.weight)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
            mha.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
            mha.out_proj.weight.copy_(self.out_proj.weight)
            mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("SplitQKVAttention does not return attention weights")
        batch, length, _ = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)

        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # nn.MultiheadAttention: True = masked out; scaled_dot_product_attention: True = attend.
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value)), attn_mask=attn_mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim)), None


def _towers(clip: nn.Module, encoder: str) -> dict[str, nn.Module]:
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got '{encoder}'")
    towers = {"vision": clip.visual.transformer, "text": clip.transformer}
    return {name: tower for name, tower in towers.items() if encoder in (name, "both")}


def _attention_blocks(clip: nn.Module, encoder: str) -> Iterator[tuple[str, int, nn.Module]]:
    prefix = {"vision": "visual.transformer", "text": "transformer"}
    for name, tower in _towers(clip, encoder).items():
        for index, block in enumerate(tower.resblocks):
            yield prefix[name], index, block


def split_attention(clip: nn.Module, encoder: str = "both") -> None:
    """Replace every block's fused attention of the chosen towers by :class:`SplitQKVAttention`."""
    for _, _, block in _attention_blocks(clip, encoder):
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = SplitQKVAttention.from_multihead(block.attn)


def fuse_attention(clip: nn.Module) -> None:
    """Inverse of :func:`split_attention` (after :func:`merge_lora`): vanilla open_clip modules again."""
    for _, _, block in _attention_blocks(clip, "both"):
        if isinstance(block.attn, SplitQKVAttention):
            block.attn = block.attn.to_multihead()


@dataclass(frozen=True)
class LoRASettings:
    """Where and how LoRA adapts the backbone (defaults: the paper's).

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / sqrt(r) (rank-stabilised, as the paper's code).
        dropout: dropout on the LoRA input.
        encoder: ``vision``, ``text`` or ``both``.
        blocks: indices of the residual blocks to adapt; ``None`` = all.
        matrices: which of ``q``, ``k``, ``v`` to adapt.
    """

    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    encoder: str = "both"
    blocks: Sequence[int] | None = None
    matrices: Sequence[str] = ("q", "k", "v")

    def target_modules(self, clip: nn.Module) -> list[str]:
        """Full module names of the projections to adapt."""
        unknown = set(self.matrices) - {"q", "k", "v"}
        if unknown or not self.matrices:
            raise ValueError(
                f"LoRA matrices must be a non-empty subset of q, k, v; got {list(self.matrices)}"
            )
        names = []
        for prefix, index, _ in _attention_blocks(clip, self.encoder):
            if self.blocks is None or index in self.blocks:
                names += [f"{prefix}.resblocks.{index}.attn.{m}_proj" for m in self.matrices]
        if not names:
            raise ValueError(
                f"LoRA blocks {list(self.blocks or [])} select no block of the {self.encoder} tower(s)"
            )
        return names


def add_lora(clip: nn.Module, settings: LoRASettings) -> None:
    """Split the attention of the chosen towers and inject LoRA adapters (in place).

    Afterwards only the LoRA matrices of ``clip`` require gradients.
    """
    split_attention(clip, settings.encoder)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_rslora=True,
        target_modules=settings.target_modules(clip),
        bias="none",
    )
    inject_adapter_in_model(config, clip)
    for name, parameter in clip.named_parameters():
        parameter.requires_grad_("lora_" in name)


def merge_lora(clip: nn.Module) -> None:
    """Fold every LoRA update into its base projection, drop the adapters, fuse the attention back."""
    for parent in list(clip.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
    fuse_attention(clip)


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` still holds unmerged LoRA adapters."""
    return any(isinstance(m, LoraLayer) for m in module.modules())


def create_tokenizer(
    model_name: str, model_config_dir: str | Path | None = None
) -> open_clip.tokenizer.SimpleTokenizer:
    """The open_clip tokenizer of ``model_name`` (bundle configs registered first; no download)."""
    register_model_configs(model_config_dir or MODEL_CONFIG_DIR)
    return open_clip.get_tokenizer(model_name)
