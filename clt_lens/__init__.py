"""clt_lens: Cross-Layer Transcoders for TransformerLens and SAELens.

Importing the package registers the "clt" architecture with SAELens, so
``sae_lens.SAE.load_from_disk(path)`` returns a :class:`CrossLayerTranscoder`.
"""

__version__ = "0.1.0"

from clt_lens.clt import (  # noqa: E402  (registers "clt" with SAELens)
    CLTConfig,
    CrossLayerTranscoder,
    convert_topk_to_jumprelu,
    run_with_clt,
)
from clt_lens.models import load_model, model_id  # noqa: E402

__all__ = [
    "CLTConfig",
    "CrossLayerTranscoder",
    "__version__",
    "convert_topk_to_jumprelu",
    "load_model",
    "model_id",
    "run_with_clt",
]
