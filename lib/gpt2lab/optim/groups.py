"""Parameter groups built from a model's named parameters and modules: who gets weight decay.

Built in notebook 03 (adamw), §7; notebook 04 (finetune) trains GPT-2 with it, and the method notebooks build
their own groups the same way (LoRA+ gives the B matrices their own lr; AdaPreLoRA pairs A with B by name).
Knows nothing of GPT-2: it decides by module type and by parameter name / number of dimensions.

    optimizer = AdamW(decay_groups(model, weight_decay=0.01), lr=lr)

Weight decay pulls weights toward 0. That regularises a matrix that mixes features, but for a bias, a LayerNorm
gain or shift, or an embedding row it only drags the value toward an arbitrary point (a LayerNorm gain of 0 turns
the layer off; an embedding row of a rare token decays every step it is not seen). So those get no decay, as in
BERT's and GPT-2 fine-tuning recipes (and nanoGPT for biases and LayerNorms).

Each group holds `(name, parameter)` pairs, which torch.optim (and `gpt2lab.optim.AdamW`) store as the group's
`param_names`, so the names travel with the optimizer and its state dict.
"""

from __future__ import annotations

from torch import nn

__all__ = ["NO_DECAY_MODULES", "decay_groups", "no_decay"]

# normalisation layers and embeddings: every parameter they own is exempt from weight decay
NO_DECAY_MODULES = tuple(
    m for m in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.Embedding)
    if m is not None
)


def no_decay(model: nn.Module) -> set[str]:
    """Names of the parameters that should not be decayed: biases, 1-D tensors, and those of norm / embedding layers.

    A tied parameter (GPT-2's head shares the token embedding) is exempt when ANY module holding it is exempt,
    and is named once, by its first name in `model.named_parameters()`.
    """
    first_name = {id(p): name for name, p in model.named_parameters()}
    exempt = set()
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            if isinstance(module, NO_DECAY_MODULES) or local.endswith("bias") or p.ndim < 2:
                exempt.add(first_name[id(p)])
    return exempt


def decay_groups(model: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """Two param groups of the trainable parameters: `weight_decay` for matrices, 0.0 for the rest (see `no_decay`).

    Built in notebook 03 (adamw), §7. Frozen parameters (requires_grad False) are left out; empty groups are
    dropped (torch refuses them). `group_options` (e.g. lr=...) are copied into both groups.
    """
    exempt = no_decay(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in trainable if n not in exempt], "weight_decay": weight_decay, **group_options},
        {"params": [(n, p) for n, p in trainable if n in exempt], "weight_decay": 0.0, **group_options},
    ]
    return [g for g in groups if g["params"]]
