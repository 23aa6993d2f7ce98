"""Optimizers written from their equations; they know nothing of GPT-2 (they work on parameters and modules).

`AdamW` and `decay_groups` (no weight decay on biases, norms and embeddings) are built in notebook 03 (adamw), §7;
notebook 04 (finetune) trains with both. `SOAP` (Adam in the eigenbasis of Shampoo's preconditioner) is built in
notebook 07 (soap).
"""

from .adamw import AdamW
from .groups import decay_groups, no_decay
from .soap import SOAP

__all__ = ["AdamW", "SOAP", "decay_groups", "no_decay"]
