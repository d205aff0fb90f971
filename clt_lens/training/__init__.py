"""Training: config, runner (builds a run), trainer (its loop), checkpoints, distribution.

The one entry point is ``CLTTrainingRunner(cfg).run()`` (``clt-lens train`` on the command
line, under ``torchrun`` for several processes).
"""

from clt_lens.clt.config import CLTSpec
from clt_lens.source_config import SourceConfig
from clt_lens.training.config import TrainConfig
from clt_lens.training.runner import CLTTrainingRunner
from clt_lens.training.trainer import TrainingDiverged

__all__ = ["CLTSpec", "CLTTrainingRunner", "SourceConfig", "TrainConfig", "TrainingDiverged"]
