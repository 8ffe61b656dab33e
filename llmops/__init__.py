"""LLMOps: orchestrated, gated retraining of a fine-tuned causal language model."""
