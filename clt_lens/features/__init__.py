"""Feature statistics of a CLT and their exports.

- ``compute_feature_stats`` (``clt-lens features``): one streaming pass over held-out tokens
  writes the features directory (``format.py`` describes it; ``validate_features_dir`` checks it).
- ``write_dashboard``: SAE-Dashboard HTML for chosen features of a source layer (optional extra).
- ``write_dashboard_batches`` / ``write_neuronpedia_export``: Neuronpedia's formats.
- ``upload_features`` (``clt-lens upload``): send the features to a Neuronpedia server.

Submodules are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FeaturesConfig": "clt_lens.features.config",
    "compute_feature_stats": "clt_lens.features.stats",
    "load_clt": "clt_lens.clt.loading",
    "read_manifest": "clt_lens.features.format",
    "iter_features": "clt_lens.features.format",
    "validate_feature": "clt_lens.features.format",
    "validate_features_dir": "clt_lens.features.format",
    "FeaturesFormatError": "clt_lens.features.format",
    "write_dashboard": "clt_lens.features.dashboard",
    "to_hooked_sae_transformer": "clt_lens.features.dashboard",
    "DashboardUnavailableError": "clt_lens.features.dashboard",
    "write_dashboard_batches": "clt_lens.features.neuronpedia",
    "write_neuronpedia_export": "clt_lens.features.neuronpedia",
    "upload_features": "clt_lens.features.upload",
    "UploadError": "clt_lens.features.upload",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
