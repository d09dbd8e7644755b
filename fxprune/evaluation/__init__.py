"""Evaluation: perplexity, the seven zero-shot tasks (lm-eval formats), plain generation, an lm-eval wrapper."""
