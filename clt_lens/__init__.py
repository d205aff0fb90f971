"""clt_lens: Cross-Layer Transcoders for TransformerLens and SAELens."""

__version__ = "0.1.0"
