"""Resume an interrupted training where it stopped.

After every epoch (once validation has run) :class:`TrainingResume` writes ``last.pt``: network,
optimizer, epoch and iteration, the best-so-far lists of the key-metric checkpoint savers and the
early-stopping counter. When training starts and that file exists, all of it is restored, so the
run continues with the next epoch, keeps the best checkpoints it already had and stops early at
the same epoch an uninterrupted run would have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver, EarlyStopHandler
from torch import nn

from scripts.atomic import atomic_path

logger = logging.getLogger(__name__)


def _key_metric_tracker(saver: CheckpointSaver) -> Any:
    # MONAI exposes load_state_dict() for this tracker but no state_dict(): read the ignite Checkpoint.
    tracker = getattr(saver, "_key_metric_checkpoint", None)
    if tracker is None:
        raise ValueError("TrainingResume tracks only CheckpointSavers with save_key_metric=True")
    return tracker


class TrainingResume:
    """Save the full training state after each epoch and restore it when training starts.

    Attach it to the trainer AFTER the ValidationHandler, so the saved state includes the epoch's
    validation (best checkpoints and early-stopping counter).

    Args:
        checkpoint: the state file (``last.pt``); restored when it exists.
        network: the trained network.
        optimizer: its optimizer.
        savers: key-metric checkpoint savers whose best-so-far lists are kept.
        early_stop: the early-stopping handler whose counter is kept.
        save: write ``last.pt`` (False on all but one process of a distributed run; all restore).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        savers: Sequence[CheckpointSaver] = (),
        early_stop: EarlyStopHandler | None = None,
        save: bool = True,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.network = network
        self.optimizer = optimizer
        self.savers = list(savers)
        self.early_stop = early_stop
        self.save_enabled = save
        for saver in self.savers:
            _key_metric_tracker(saver)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.restore)
        if self.save_enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def state(self, engine: Engine) -> dict[str, Any]:
        stopping = getattr(self.early_stop, "_handler", None) if self.early_stop else None
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "savers": [dict(_key_metric_tracker(s).state_dict()) for s in self.savers],
            "early_stop": dict(stopping.state_dict()) if stopping is not None else None,
        }

    def save(self, engine: Engine) -> None:
        """Write the state atomically: an interruption never leaves a truncated ``last.pt``."""
        with atomic_path(self.checkpoint, durable=True) as temporary:
            torch.save(self.state(engine), temporary)

    def restore(self, engine: Engine) -> None:
        if not self.checkpoint.is_file():
            return
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        engine.state.epoch = int(state["epoch"])
        engine.state.iteration = int(state["iteration"])
        for saver, saved in zip(self.savers, state["savers"], strict=True):
            saver.load_state_dict(saved)
        stopping = getattr(self.early_stop, "_handler", None) if self.early_stop else None
        if stopping is not None and state["early_stop"] is not None:
            stopping.load_state_dict(state["early_stop"])
        logger.info("resumed training from %s after epoch %d", self.checkpoint, engine.state.epoch)
