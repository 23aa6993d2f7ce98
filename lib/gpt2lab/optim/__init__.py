"""Optimizers written from their equations; they know nothing of GPT-2 (they work on parameters and modules).

`AdamW` is built in notebook 03 (adamw); `decay_groups` (no weight decay on biases, norms and embeddings) in
notebook 04 (finetune), §3.
"""

from .adamw import AdamW, weight_decay_groups
from .groups import decay_groups, no_decay

__all__ = ["AdamW", "decay_groups", "no_decay", "weight_decay_groups"]
