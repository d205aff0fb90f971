"""Training: config, loop, checkpoints, distribution."""

from clt_lens.training.config import TrainConfig
from clt_lens.training.runner import CLTTrainingRunner
from clt_lens.training.trainer import Trainer, TrainingDiverged, train

__all__ = ["CLTTrainingRunner", "TrainConfig", "Trainer", "TrainingDiverged", "train"]
