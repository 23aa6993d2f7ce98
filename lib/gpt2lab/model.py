"""GPT-2: token + position embeddings, pre-LayerNorm transformer blocks, a tied language-model head.

Built in notebook 02 (gpt2). What is here, in the notebook's order:

    §1 GPT2Config          sizes of gpt2 / gpt2-medium / gpt2-large / gpt2-xl, and tiny configs for tests
    §2 embeddings          token embedding + position embedding (`GPT2.embed`)
    §3 Block               x + attn(ln_1(x)), then x + mlp(ln_2(x)); MLP = Linear -> GELU(tanh) -> Linear
    §4 GPT2                blocks, final LayerNorm, head tied to the token embedding (`GPT2.head`)
    §5 from_pretrained     released weights (hub name or local folder) through an explicit key map
    §6 KVCache             past keys/values, so generation feeds one new token per step (used by `generate`)

Padding: `model(input_ids, attention_mask)` takes a (B, T) 0/1 mask, right or left padding. Position ids follow
the *real* tokens: position = (number of real tokens before this one), i.e. `cumsum(mask) - 1` (clamped at 0 on
padding). With right padding that is just 0..T-1; with left padding the first real token gets position 0, so a
padded row gives the same logits on its real tokens as the unpadded sequence (transformers gives the same numbers
when passed these position_ids, which is what its `generate` does).

Modules are honoured in training as in eval: `forward` calls every submodule (`transformer.wte`, each block's
Linears, `ln_f`, `lm_head`, ...), so hooks fire the same way with or without gradients and a replaced submodule
(a LoRA wrapper, a plain nn.Linear head) takes effect. The training-speed trick for the tied weight lives inside
the two modules that share it (`TiedEmbedding`, `TiedHead`) and switches itself off when they are replaced.

Bad input ends in one ValueError line naming the value and where it is (token ids outside the vocabulary, mask
values other than 0/1, positions past n_positions), not in a traceback from inside torch.

References: Radford et al. 2019, "Language models are unsupervised multitask learners" (GPT-2); Vaswani et al. 2017.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CausalSelfAttention, combined_mask

# ----------------------------------------------------------------------------------------------------------- config

_PRESETS = {  # (n_layer, n_head, n_embd), from the GPT-2 paper's table 2 and the released checkpoints
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}


@dataclass
class GPT2Config:
    """Sizes and switches of a GPT-2 model. Built in notebook 02 (gpt2), §1.

    `dropout` is used for all three of GPT-2's dropouts (embeddings, attention weights, residual branches), as in
    the released configs (0.1 each). `bias=False` drops the Linear/LayerNorm biases (not loadable from the released
    weights, which have them).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    bias: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPT2Config:
        """The config of a released model: "gpt2", "gpt2-medium", "gpt2-large" or "gpt2-xl"."""
        key = name.split("/")[-1]
        if key not in _PRESETS:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(_PRESETS)}")
        n_layer, n_head, n_embd = _PRESETS[key]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)

    @classmethod
    def tiny(cls, **overrides) -> GPT2Config:
        """A tiny config for tests and quick mode: 2 layers, 64 dims, 4 heads, 128 positions, full vocab, no dropout."""
        base = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, dropout=0.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> GPT2Config:
        """From a transformers GPT-2 `config.json` (a dict); refuses options this implementation does not have."""
        unsupported = {
            "n_inner": lambda v: v is not None and v != 4 * hf.get("n_embd", 768),
            "activation_function": lambda v: v not in (None, "gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_by_inverse_layer_idx": bool,
            "reorder_and_upcast_attn": bool,
            "add_cross_attention": bool,
            "scale_attn_weights": lambda v: v is False,
        }
        bad = [f"{k}={hf[k]!r}" for k, is_bad in unsupported.items() if k in hf and is_bad(hf[k])]
        if bad:
            raise ValueError(f"this GPT-2 implementation does not support {', '.join(bad)} in config.json")
        cfg = dict(
            vocab_size=hf.get("vocab_size", 50257),
            n_positions=hf.get("n_positions", 1024),
            n_embd=hf.get("n_embd", 768),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            dropout=hf.get("resid_pdrop", 0.1),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
        cfg.update(overrides)
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------- blocks


class MLP(nn.Module):
    """Linear (C -> 4C) -> GELU (tanh approximation, as GPT-2 was trained) -> Linear (4C -> C) -> dropout.

    Built in notebook 02 (gpt2), §3.
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel for the tanh-GELU (the same function as GPT-2's 0.5x(1+tanh(...)) formula)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). Built in notebook 02, §3.

    LayerNorm before each sub-layer (GPT-2's change from the original transformer) keeps the residual stream
    an untouched sum, which trains stably at depth.
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, layer: int = 0, return_weights: bool = False):
        """x (B, T, C) -> (B, T, C); with `return_weights`, also the attention weights (B, nh, T, T_k)."""
        a = self.attn(self.ln_1(x), mask, cache, layer, return_weights)
        a, weights = a if return_weights else (a, None)
        x = x + a  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return (x, weights) if return_weights else x


# ----------------------------------------------------------------------------------------------------------- cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated up to `max_length` positions.

    Built in notebook 02 (gpt2), §6. Each forward with a cache writes its T new keys/values at positions
    [length, length + T) of every layer and attends over [0, length + T); the model then advances `length`.
    `reorder(index)` picks batch rows (beam search keeps the beams' histories this way).
    """

    def __init__(self, n_layer, batch_size, n_head, head_size, max_length, device=None, dtype=torch.float32):
        shape = (batch_size, n_head, max_length, head_size)  # (B, nh, T_max, hs)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_length = max_length
        self.length = 0

    @classmethod
    def for_model(cls, model: GPT2, batch_size: int, max_length: int | None = None) -> KVCache:
        c = model.config
        max_length = max_length or c.n_positions
        p = next(model.parameters())  # device and dtype (wte may be wrapped, e.g. by an adapter)
        return cls(c.n_layer, batch_size, c.n_head, c.n_embd // c.n_head, max_length, p.device, p.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) after the past ones; return past + new: two (B, nh, length + T, hs) views."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_length} allocated")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (in that order), e.g. the surviving beams' parents."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


# ----------------------------------------------------------------------------------------------------------- model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions that count real tokens only: cumsum(mask) - 1, 0 on left padding.

    Built in notebook 02 (gpt2), §2. Right padding gives 0..T-1 on the real tokens; left padding starts the
    real tokens at 0, exactly as if the padding were not there.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


class TiedEmbedding(nn.Embedding):
    """The token embedding `transformer.wte`: an nn.Embedding whose weight `lm_head` shares. Notebook 02, §2 and §4.

    `wte(input_ids)` is a plain lookup. `GPT2.forward` passes `tie=` only with gradients on, when its own `TiedHead`
    uses the same weight in the same forward. Then the weight gradient sent back is row-sparse (the B*T looked-up
    rows) if the head's dense gradient was computed in this same backward pass, and autograd adds the rows into that
    dense matrix in place. If the head's gradient did not come (a hook replaced the logits, a loss that skips them),
    the rows go back as an ordinary dense gradient: `.grad` is always the dense tensor plain autograd would give.
    """

    def forward(self, input_ids: torch.Tensor, tie: _Tie | None = None) -> torch.Tensor:
        if tie is None:
            return super().forward(input_ids)  # (B, T, C)
        return _TiedLookup.apply(input_ids, self.weight, tie)  # (B, T, C)


class TiedHead(nn.Linear):
    """The language-model head `lm_head`: an nn.Linear (no bias) whose weight is `transformer.wte.weight`.

    Notebook 02, §4. Same numbers as nn.Linear; its weight gradient comes out as one fresh contiguous (vocab, C)
    matrix (`_TiedHead`), into which the embedding's gradient can be added in place. Replace it (`model.lm_head =
    ...`) and the model uses the replacement, with plain autograd.
    """

    def forward(self, hidden: torch.Tensor, tie: _Tie | None = None) -> torch.Tensor:
        weight = self.weight if tie is None else tie.head_weight
        logits = _TiedHead.apply(hidden, weight, tie)  # (B, T, vocab)
        return logits if self.bias is None else logits + self.bias  # GPT-2's head has no bias; honour one if set


class _Tie:
    """What one training forward's `TiedEmbedding` and `TiedHead` share: the head's view of the weight and the id of
    the backward pass in which the head sent its dense gradient."""

    def __init__(self, head_weight: torch.Tensor):
        self.head_weight = head_weight
        self.head_task = None


class GPT2(nn.Module):
    """The GPT-2 language model. Built in notebook 02 (gpt2), §4.

    `model(input_ids, attention_mask=None)` -> logits (B, T, vocab). Module names follow the released checkpoints
    (transformer.wte, transformer.h.0.attn.c_attn, ...), so the key map in `from_pretrained` stays short.
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=TiedEmbedding(config.vocab_size, config.n_embd),  # token embedding (an nn.Embedding)
                wpe=nn.Embedding(config.n_positions, config.n_embd),  # position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = TiedHead(config.n_embd, config.vocab_size, bias=False)  # an nn.Linear
        self.lm_head.weight = self.transformer.wte.weight  # tied: the same matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two terms to the stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- pieces, each an exercise in notebook 02

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, inputs_embeds=None, _tie=None):
        """Token embedding + position embedding, then dropout: (B, T) ids -> (B, T, C). Notebook 02, §2.

        `inputs_embeds` (B, T, C) replaces the token lookup (e.g. to perturb the embeddings).
        """
        if inputs_embeds is not None:
            tok = inputs_embeds  # (B, T, C)
        elif _tie is not None:
            tok = self.transformer.wte(input_ids, tie=_tie)  # (B, T, C); only passed to our own TiedEmbedding
        else:
            tok = self.transformer.wte(input_ids)  # (B, T, C)
        return self.transformer.drop(tok + self.transformer.wpe(position_ids))

    def head(self, hidden: torch.Tensor, _tie=None) -> torch.Tensor:
        """Final hidden states (after ln_f) -> logits: hidden @ wteᵀ, (B, T, C) -> (B, T, vocab). Notebook 02, §4.

        Calls the `lm_head` module, so hooks on it fire and a replaced head takes effect.
        """
        return self.lm_head(hidden) if _tie is None else self.lm_head(hidden, tie=_tie)  # (B, T, vocab)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (the tied head counted once); `exclude_embeddings` leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    # -- forward

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or the final hidden states (B, T, C) with `return_hidden`.

        attention_mask: (B, T) of 0/1 (right or left padding), or (B, past + T) when a `cache` holds past tokens.
        position_ids: default from the mask (see the module docstring), else past + 0..T-1.
        cache: a `KVCache`; the new keys/values are stored and `cache.length` advances by T.
        inputs_embeds: (B, T, C) token embeddings used instead of looking up input_ids (pass input_ids=None).
        """
        tie = None if return_hidden or inputs_embeds is not None else self._tie()
        hidden, _ = self._run(input_ids, attention_mask, position_ids, cache, False, inputs_embeds, tie)
        if return_hidden:
            return hidden  # (B, T, C)
        return self.head(hidden, **({} if tie is None else {"_tie": tie}))  # (B, T, vocab)

    def _tie(self) -> _Tie | None:
        """The speed pairing of `transformer.wte` and `lm_head` for one training forward, or None.

        Only when both are still this file's modules (exact types: a subclass or wrapper may not take `tie=`), share
        one weight that wants a gradient, gradients are on, and `embed`/`head` are not overridden by a subclass. Then
        the head's weight gradient is one dense (vocab, C) matrix and the embedding adds its B*T rows into it in place
        (see `TiedEmbedding`) instead of zero-filling and adding a second dense matrix (38M floats for gpt2) each step.
        Anything else: plain modules, plain autograd.
        """
        wte, head = self.transformer.wte, self.lm_head
        if not (torch.is_grad_enabled() and type(wte) is TiedEmbedding and type(head) is TiedHead):
            return None
        if type(self).embed is not GPT2.embed or type(self).head is not GPT2.head:
            return None
        if head.weight is not wte.weight or not wte.weight.requires_grad:
            return None
        # the head reads the weight through an identity created *before* the embedding lookup: see _ReachedLast
        return _Tie(_ReachedLast.apply(wte.weight))

    def hidden_states(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """The final hidden states (after ln_f), (B, T, C): `forward(..., return_hidden=True)`."""
        return self.forward(input_ids, attention_mask, return_hidden=True, **kwargs)

    def attention_maps(self, input_ids, attention_mask=None) -> list[torch.Tensor]:
        """Attention weights of every layer, a list of (B, nh, T, T) tensors (for heatmaps; runs the written-out
        attention, not the fused kernel)."""
        _, maps = self._run(input_ids, attention_mask, None, None, return_weights=True)
        return maps

    def _run(self, input_ids, attention_mask, position_ids, cache, return_weights, inputs_embeds=None, tie=None):
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.n_embd:
                raise ValueError(
                    f"inputs_embeds should be (batch, seq, {self.config.n_embd}), got {inputs_embeds.shape}"
                )
            B, T, _ = inputs_embeds.shape
            device = inputs_embeds.device
        elif input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids should be (batch, seq) token ids, got {shape}")
        elif input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids should hold integer token ids (torch.long), got dtype {input_ids.dtype}")
        else:
            B, T = input_ids.shape
            device = input_ids.device
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens is longer than n_positions={self.config.n_positions}")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                "(batch, past + new tokens)"
            )
        unpadded = self._check_values(None if inputs_embeds is not None else input_ids, attention_mask, position_ids)
        if attention_mask is not None:
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)[:, past:]  # (B, T)
            if unpadded:
                attention_mask = None  # nothing padded: take the fast causal path
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]  # (1, T)
        # None -> the fused kernel's own causal masking; otherwise a boolean (B, 1, T, past + T) mask
        mask = None if attention_mask is None else combined_mask(attention_mask, T, past + T, device=device)
        speed = {} if tie is None else {"_tie": tie}  # only our own embed/head get the private argument
        x = self.embed(input_ids, position_ids, inputs_embeds, **speed)  # (B, T, C)
        maps = []
        for i, block in enumerate(self.transformer.h):
            if return_weights:
                x, w = block(x, mask, cache, i, return_weights=True)
                maps.append(w)
            else:
                x = block(x, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x), maps  # (B, T, C)

    def _check_values(self, input_ids, attention_mask, position_ids) -> bool:
        """Raise one ValueError line for token ids outside [0, vocab_size), mask values other than 0/1 or positions
        outside [0, n_positions); return whether the mask (if any) has no padding.

        Cost: every flag is one tiny reduction, and all come back in ONE host read. With a mask that read is needed
        anyway (the fused no-padding path is chosen on the host), so the checks add no device sync. Without a mask,
        tensors on an accelerator are not checked (that would add a sync per forward, i.e. per generated token):
        there the lookup fails on its own, as it does in transformers.
        """
        V, P = self.config.vocab_size, self.config.n_positions
        host_read_free = attention_mask is not None or all(
            t is None or t.device.type == "cpu" for t in (input_ids, position_ids)
        )
        flags = {}  # name -> 0-d bool tensor, True = something is wrong (or, for "unpadded", all real)
        if attention_mask is not None:
            m = attention_mask
            if m.dtype != torch.bool:
                flags["mask"] = ((m != 0) & (m != 1)).any()
            flags["unpadded"] = m.all()
        if host_read_free:
            for name, t, hi in (("ids", input_ids, V), ("positions", position_ids, P)):
                if t is not None and t.numel():
                    lo_val, hi_val = torch.aminmax(t)
                    flags[name] = (lo_val < 0) | (hi_val >= hi)
        if not flags:
            return True
        values = dict(zip(flags, torch.stack(list(flags.values())).tolist()))  # the one host read
        if values.get("ids"):
            _raise_out_of_range("input_ids", input_ids, V, f"vocab_size {V}", _TOKENIZER_HINT)
        if values.get("positions"):
            _raise_out_of_range("position_ids", position_ids, P, f"n_positions {P}", "")
        if values.get("mask"):
            row, col = ((attention_mask != 0) & (attention_mask != 1)).nonzero()[0].tolist()
            raise ValueError(
                f"attention_mask[{row}, {col}] is {attention_mask[row, col].item()}: the mask must hold only 1 (real "
                "token) and 0 (padding), e.g. the tokenizer's attention_mask"
            )
        return bool(values.get("unpadded", True))

    # -- weights

    @classmethod
    def from_pretrained(cls, name_or_folder: str | os.PathLike, *, dropout: float | None = None) -> GPT2:
        """GPT-2 with released weights: a hub name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" or an
        "owner/name" repo) or a local folder with config.json and model.safetensors (or pytorch_model.bin).

        Built in notebook 02 (gpt2), §5. Weights go through `hf_key_map` (explicit names, Conv1D transposes);
        any missing, unexpected or mis-shaped key raises one `WeightLoadError` listing them all.
        """
        from .weights import read_state_dict, resolve

        folder: Path = resolve(name_or_folder)  # offline: one line of ours (WeightsUnavailable) within seconds
        overrides = {} if dropout is None else {"dropout": dropout}
        config = GPT2Config.from_hf_dict(json.loads((folder / "config.json").read_text()), **overrides)
        model = cls(config)
        model.load_hf_state_dict(read_state_dict(folder))
        return model

    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor]) -> None:
        """Copy a transformers-layout GPT-2 state dict into this model (see `hf_key_map`), strictly."""
        ours = self.state_dict()
        key_map = hf_key_map(self.config.n_layer)
        # checkpoints saved from GPT2LMHeadModel prefix "transformer."; the original release does not
        state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
        missing, mis_shaped, loaded = [], [], {}
        for src, (dst, transpose) in key_map.items():
            if src not in state:
                missing.append(src)
                continue
            w = state[src].t() if transpose else state[src]
            if tuple(w.shape) != tuple(ours[dst].shape):
                how = " after transposing" if transpose else ""
                mis_shaped.append(f"{src}: {tuple(w.shape)}{how}, expected {tuple(ours[dst].shape)}")
                continue
            loaded[dst] = w
        unexpected = [k for k in state if k not in key_map and not _ignorable(k)]
        if missing or unexpected or mis_shaped:
            parts = [
                f"{label} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
                if keys
            ]
            raise WeightLoadError(f"GPT-2 checkpoint does not fit {self.config}: " + "; ".join(parts))
        with torch.no_grad():
            for dst, w in loaded.items():
                ours[dst].copy_(w)


class _TiedHead(torch.autograd.Function):
    """logits = hidden @ Wᵀ, with the weight gradient computed as one fresh (vocab, C) matrix. Used by `TiedHead`.

    Same numbers as nn.Linear. Why a Function: autograd's own weight gradient for `x @ W.t()` comes out as a
    transposed view, which the engine will not add the embedding's gradient into in place; this one can be.
    Under autocast the backward runs in the gradient's dtype and casts back, as autocast's own linear does.
    With a `tie`, the backward records its pass, so the embedding knows the dense gradient joins its rows.
    """

    @staticmethod
    def forward(ctx, hidden, weight, tie):
        ctx.save_for_backward(hidden, weight)
        ctx.tie = tie
        return F.linear(hidden, weight)  # (B, T, vocab)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (B*T, vocab)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (g @ weight.to(g.dtype)).view(hidden.shape).to(hidden.dtype)  # (B, T, C)
        if ctx.needs_input_grad[1]:
            h = hidden.reshape(-1, hidden.shape[-1]).to(g.dtype)  # (B*T, C)
            grad_weight = g.t().mm(h).to(weight.dtype)  # (vocab, C), contiguous
            if ctx.tie is not None:
                ctx.tie.head_task = torch._C._current_graph_task_id()
        return grad_hidden, grad_weight, None


class _ReachedLast(torch.autograd.Function):
    """Identity on the tied weight, placed in front of the head. Created before the embedding lookup, so autograd
    runs it after the embedding's backward: the sparse rows reach the weight first and the dense head gradient is
    then added to them in place (the other order makes autograd copy the dense gradient). Only speed depends on
    this order; the summed gradient is the same either way."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TiedLookup(torch.autograd.Function):
    """Token lookup whose weight gradient is row-sparse (only the B*T looked-up rows) when the tied head's dense
    gradient is known to join it in this backward pass, and the ordinary dense gradient otherwise. Used by
    `TiedEmbedding`.

    The head runs after the embedding in the forward, so its backward runs first: by the time this backward runs,
    `tie.head_task` says whether the head sent its (vocab, C) gradient in the *current* pass (a pass id, so a stale
    mark from an earlier backward never counts). Rows + dense then sum to a dense .grad, as usual, while skipping the
    zero-fill and the addition of a second dense (vocab, C) gradient (38M floats for gpt2) on every training step.
    """

    @staticmethod
    def forward(ctx, input_ids, weight, tie):
        ctx.save_for_backward(input_ids)
        ctx.tie = tie
        ctx.num_weights, ctx.dtype = weight.shape[0], weight.dtype
        return F.embedding(input_ids, weight)  # (B, T, C)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (input_ids,) = ctx.saved_tensors
        if ctx.tie.head_task != torch._C._current_graph_task_id():  # None (never sent) never equals a pass id
            # no dense gradient from the head in this pass: the ordinary embedding gradient (what nn.Embedding gives)
            dense = torch.ops.aten.embedding_dense_backward(grad, input_ids, ctx.num_weights, -1, False)
            return None, dense, None
        rows = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)  # (B*T, C); repeated ids simply add up
        shape = (ctx.num_weights, grad.shape[-1])
        return None, torch.sparse_coo_tensor(input_ids.reshape(1, -1), rows, shape, check_invariants=False), None


_TOKENIZER_HINT = (
    "were the ids made by a tokenizer with a different vocabulary (or are they labels with -100 for ignored tokens)?"
)


def _raise_out_of_range(name: str, t: torch.Tensor, limit: int, what: str, hint: str):
    bad = (t < 0) | (t >= limit)
    where = bad.nonzero()[0].tolist()
    index = ", ".join(map(str, where))
    raise ValueError(
        f"{name}[{index}] is {t[tuple(where)].item()}, outside [0, {limit}) ({what} of this model; "
        f"{int(bad.sum())} value(s) out of range){': ' + hint if hint else ''}"
    )


class WeightLoadError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; the message names every offending key."""


def hf_key_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """transformers GPT-2 key -> (our key, transpose?). Built in notebook 02 (gpt2), §5.

    The released checkpoints store the four projection matrices as "Conv1D" weights of shape (in, out), the
    transpose of nn.Linear's (out, in): those are transposed. The head is tied to wte, so it has no entry.
    """
    m = {
        "wte.weight": ("transformer.wte.weight", False),
        "wpe.weight": ("transformer.wpe.weight", False),
        "ln_f.weight": ("transformer.ln_f.weight", False),
        "ln_f.bias": ("transformer.ln_f.bias", False),
    }
    for i in range(n_layer):
        for name, transpose in (
            ("ln_1.weight", False),
            ("ln_1.bias", False),
            ("attn.c_attn.weight", True),
            ("attn.c_attn.bias", False),
            ("attn.c_proj.weight", True),
            ("attn.c_proj.bias", False),
            ("ln_2.weight", False),
            ("ln_2.bias", False),
            ("mlp.c_fc.weight", True),
            ("mlp.c_fc.bias", False),
            ("mlp.c_proj.weight", True),
            ("mlp.c_proj.bias", False),
        ):
            m[f"h.{i}.{name}"] = (f"transformer.h.{i}.{name}", transpose)
    return m


def _ignorable(key: str) -> bool:
    # lm_head.weight: tied to wte (some checkpoints store the copy); attn.bias / attn.masked_bias: causal-mask
    # buffers of older checkpoints, not parameters
    return key == "lm_head.weight" or key.endswith(".attn.bias") or key.endswith(".attn.masked_bias")


# ----------------------------------------------------------------------------------------------------------- loss


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at t predict input_ids at t+1; pairs touching padding are ignored.

    Built in notebook 02 (gpt2), §4. A target counts only when it and the position predicting it are both real
    tokens, so left and right padding give the same loss. With right padding this is the number transformers gives
    with labels=input_ids and -100 on padding (with left padding theirs also counts a pad predicting the first token).
    """
    B, T, V = logits.shape
    targets = input_ids
    if attention_mask is not None:
        real = attention_mask.bool()  # (B, T)
        real_pair = torch.cat([real[:, :-1] & real[:, 1:], real[:, :1] & False], dim=1)  # (B, T): t and t+1 real
        targets = F.pad(input_ids[:, 1:], (0, 1), value=-100).masked_fill(~real_pair, -100)  # (B, T)
    else:
        # shift the targets, not the logits: slicing the (B, T, vocab) logits would copy them (and their gradient)
        targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T): the last position predicts nothing
    return F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(-1), ignore_index=-100)


__all__ = [
    "GPT2",
    "GPT2Config",
    "Block",
    "MLP",
    "KVCache",
    "TiedEmbedding",
    "TiedHead",
    "WeightLoadError",
    "hf_key_map",
    "lm_loss",
    "position_ids_from_mask",
]
