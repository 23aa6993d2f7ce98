"""Optimizers written from their equations; they know nothing of GPT-2 (they work on parameter lists).

`AdamW` is built in notebook 03 (adamw).
"""

from .adamw import AdamW, weight_decay_groups

__all__ = ["AdamW", "weight_decay_groups"]
