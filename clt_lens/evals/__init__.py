"""Evaluation of a CLT: reconstruction, sparsity, replacement-model CE and KL."""

from clt_lens.evals.evaluate import EvalError, evaluate
from clt_lens.evals.report import markdown_table, write_outputs

__all__ = ["EvalError", "evaluate", "markdown_table", "write_outputs"]
