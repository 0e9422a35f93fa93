"""Training, evaluation, checkpoints and metrics of the reference fusion models."""

from fusionlens.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from fusionlens.train.loop import NonFiniteLossError, TrainConfig, TrainResult, evaluate, train
from fusionlens.train.losses import LossConfig, simplebev_loss
from fusionlens.train.metrics import IoUAccumulator, condition_tags

__all__ = [
    "IoUAccumulator", "LossConfig", "NonFiniteLossError", "TrainConfig", "TrainResult", "condition_tags",
    "evaluate", "load_checkpoint", "load_model", "save_checkpoint", "simplebev_loss", "train",
]
