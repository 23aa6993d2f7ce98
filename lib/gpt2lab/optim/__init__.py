"""Optimizers written from their equations; they know nothing of GPT-2 (they work on parameters and modules).

`AdamW` and `decay_groups` (no weight decay on biases, norms and embeddings) are built in notebook 03 (adamw), §7;
notebook 04 (finetune) trains with both.
"""

from .adamw import AdamW
from .groups import decay_groups, no_decay

__all__ = ["AdamW", "decay_groups", "no_decay"]
