"""Cross-layer transcoders (SAELens architecture "clt").

Importing this package registers "clt" with SAELens, so ``sae_lens.SAE.load_from_disk(path)``
returns a CrossLayerTranscoder.
"""

from clt_lens.clt.config import CLTConfig, CLTSpec, CLTTrainingConfig
from clt_lens.clt.convert import convert_topk_to_jumprelu
from clt_lens.clt.losses import CLTStepOutput
from clt_lens.clt.model import CrossLayerTranscoder
from clt_lens.clt.saelens_interop import TrainingCrossLayerTranscoder, layer_transcoder, register
from clt_lens.clt.splice import run_with_clt

register()

__all__ = [
    "CLTConfig",
    "CLTSpec",
    "CLTStepOutput",
    "CLTTrainingConfig",
    "CrossLayerTranscoder",
    "TrainingCrossLayerTranscoder",
    "convert_topk_to_jumprelu",
    "layer_transcoder",
    "register",
    "run_with_clt",
]
