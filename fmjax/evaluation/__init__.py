"""Evaluation of a loaded `fmjax.api.Model`: perplexity and bits per byte over texts, preference accuracy over
preference pairs, and (with the `eval` extra) an lm-evaluation-harness adapter in `fmjax.evaluation.harness`.

  from fmjax.evaluation import perplexity, preference_accuracy
  perplexity(model, ["some text", ...], seq_len=1024).perplexity
"""

from fmjax.evaluation.perplexity import PerplexityResult, perplexity
from fmjax.evaluation.preference import PreferenceResult, preference_accuracy

__all__ = ["PerplexityResult", "PreferenceResult", "perplexity", "preference_accuracy"]
