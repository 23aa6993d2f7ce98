"""Optimizers written from their equations; they know nothing of GPT-2 (they work on parameters and modules).

`AdamW` and `decay_groups` (no weight decay on biases, norms and embeddings) are built in notebook 03 (adamw), §7;
notebook 04 (finetune) trains with both. `SOAP` (Adam in the eigenbasis of Shampoo's preconditioner) is built in
notebook 07 (soap). `AdaPreLoRA` (LoRA factor steps that follow Adafactor's direction projected onto what the
adapters can reach) and its baselines `ScaledGD` / `ScaledAdamW` and `LoRAPlus` (`lora_plus_groups`) are built in
notebook 08 (adaprelora).
"""

from .adamw import AdamW
from .adaprelora import AdaPreLoRA
from .groups import decay_groups, no_decay
from .lora_baselines import LoRAPlus, ScaledAdamW, ScaledGD, lora_plus_groups
from .soap import SOAP

__all__ = ["AdaPreLoRA", "AdamW", "LoRAPlus", "SOAP", "ScaledAdamW", "ScaledGD", "decay_groups", "lora_plus_groups",
           "no_decay"]
