"""SAELens-style runner: ``CLTTrainingRunner(cfg).run()`` mirrors LanguageModelSAETrainingRunner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clt_lens.training.config import TrainConfig
from clt_lens.training.trainer import Trainer


class CLTTrainingRunner:
    """Train a CLT on a TransformerLens model, like SAELens's LanguageModelSAETrainingRunner.

    ``override_model`` / ``override_source`` replace what the config names (a notebook's
    model object, or any object with ``next()``, ``state_dict()``, ``load_state_dict()``,
    ``close()`` and ``info``); the run is then not reproducible from the config alone.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        override_model: Any = None,
        override_source: Any = None,
        resume: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.trainer = Trainer(cfg, model=override_model, source=override_source, resume=resume)

    def run(self):
        """Train and return the CrossLayerTranscoder (also saved under ``cfg.out_dir/final``)."""
        return self.trainer.train()
