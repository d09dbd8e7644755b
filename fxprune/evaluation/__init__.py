"""Evaluation: perplexity, the seven zero-shot tasks (lm-eval formats), plain generation, an lm-eval wrapper."""
from fxprune.evaluation.evaluate import (generate, lm_eval_model, loglikelihood, loglikelihood_rolling, perplexities,
                                         perplexity, zero_shot)

__all__ = ["perplexity", "perplexities", "zero_shot", "loglikelihood", "loglikelihood_rolling", "generate",
           "lm_eval_model"]
