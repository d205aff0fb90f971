"""circuit-tracer integration: transcoder-set export, offline ReplacementModel, attribution
graphs with their viewer files.

- ``write_circuit_tracer_set(clt_or_checkpoint, out_dir)``: the set circuit-tracer loads.
- ``build_replacement_model(model, transcoders)``: its ReplacementModel, without the hub.
- ``attribute_prompt(clt, prompt, out_dir=...)``: graph (.pt), scores, viewer JSON.
- ``write_viewer_features(features_dir, out_dir, scan)``: feature pages for ``clt-lens serve``.
- ``load_replacement_model(clt, model)`` + ``intervene(rm, prompt, [Intervention(...)])``:
  ablate / scale / clamp features and see what the model predicts (what ``clt-lens serve``
  runs from the graph page).
"""

from clt_lens.circuits.attribution import (
    AttributionResult,
    attribute_prompt,
    load_replacement_model,
)
from clt_lens.circuits.errors import CircuitsError
from clt_lens.circuits.export import circuit_tracer_tensors, write_circuit_tracer_set
from clt_lens.circuits.intervention import Intervention, InterventionResult, intervene
from clt_lens.circuits.loading import load_clt, load_transcoders
from clt_lens.circuits.replacement import build_replacement_model
from clt_lens.circuits.viewer_data import cantor_pair, write_viewer_features

__all__ = [
    "AttributionResult",
    "CircuitsError",
    "Intervention",
    "InterventionResult",
    "attribute_prompt",
    "build_replacement_model",
    "cantor_pair",
    "circuit_tracer_tensors",
    "intervene",
    "load_clt",
    "load_replacement_model",
    "load_transcoders",
    "write_circuit_tracer_set",
    "write_viewer_features",
]
