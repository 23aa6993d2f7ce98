"""LoRA: low-rank adapters on linear layers, injected by target name, merged and unmerged in place, saved alone.

Built in notebook 05 (lora). Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv
2106.09685); rsLoRA scaling from Kalajdzievski 2023 (arXiv 2312.03732). What is here, in the notebook's order:

    §1 LoRALinear       y = x W0^T + b + s * dropout(x) A^T B^T, per column block of the output
    §2 add_lora         wrap the linear layers named by the targets, freeze everything else
    §3 merge / unmerge  fold s*B@A into W0 for inference, and give W0 back exactly
    §4 adapter files    lora_state_dict / load_lora, save_lora / load_lora_file: only the factors, fingerprinted
    §5 lora_pairs       every (A, B) pair with its scale, module and output columns (for pair optimizers)
    §6 parameter_report trainable vs total parameters
    helpers             lora_modules (the wrappers), lora_settings, base_fingerprint, parse_targets, check_settings

    model = add_lora(model, rank=8, alpha=16, targets="q,v", dropout=0.05)   # in place; returns the model
    save_lora(model, "adapters.pt"); load_lora_file(fresh_base, "adapters.pt")   # same outputs

The layer (notation: W0 is (m, n) = (out, in) as in nn.Linear; A is (r, n), B is (m_block, r)):

* A starts kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(n), 1/sqrt(n)), and B starts at zero, as in the reference
  code (microsoft/LoRA's loralib and peft), so B @ A = 0 and a fresh adapter leaves the model's output unchanged
  bit for bit: training starts from the pretrained function. (The paper's text says "random Gaussian A"; the
  code, which we follow, uses kaiming-uniform.)
* The scale is s = alpha / r, so that a change of r needs little retuning of the learning rate (Hu et al. §4.1);
  rslora=True uses alpha / sqrt(r), which keeps the updates' size stable as r grows. alpha defaults to r (s = 1).
* Dropout acts on the adapter's input only (the base path sees x unchanged); `lora_dropout` is called exactly once
  per forward, so a forward hook on it sees the adapter input x~ (optimizers that need x~ hook it there).
* One layer can hold several pairs, each writing its own column block of the output (`slices`). This is how
  "q,v" adapts GPT-2's fused q|k|v projection: two independent pairs on the q and v thirds of its output, the
  k third untouched. One pair per weight block is what factor-pair optimizers need (LoRA+, AdaPreLoRA, ...).
* LoRALinear *is* an nn.Linear that took over the base layer's own `weight` and `bias` Parameters (the same
  objects, frozen), so the model's state_dict keeps its base keys and only gains `*.lora_A.<key>` /
  `*.lora_B.<key>`; hooks, `.to()`, dtypes and `state_dict` behave as for any module.

This module works on linear layers only. The one thing it knows of a model is the table `TARGETS` below, which maps
a target name to the suffix of a linear layer's name (GPT-2's names in this course) and, for the fused
projection, to the third of its output. Models with other names can be adapted by editing that table.

Merge keeps a copy. `merge` saves each wrapped layer's original weight (a non-persistent buffer: moved by `.to()`,
never in a state_dict) before adding s*B@A, and `unmerge` puts that copy back: the original weights return bit
for bit. Subtracting s*B@A again would leave rounding errors (a unit in the last place here and there in float32,
far more in bf16); the price of exactness is one extra copy of the adapted weights while merged. While merged, the
model's own state_dict holds the merged weights: save adapters with `save_lora`, which stores the factors alone.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import OneLineError

# target name -> (suffix of the linear layer's module name, which third of the fused output or None for all of it)
TARGETS: dict[str, tuple[str, int | None]] = {
    "q": ("attn.c_attn", 0),
    "k": ("attn.c_attn", 1),
    "v": ("attn.c_attn", 2),
    "qkv": ("attn.c_attn", None),
    "attn_out": ("attn.c_proj", None),
    "fc": ("mlp.c_fc", None),
    "mlp_out": ("mlp.c_proj", None),
}
ALIASES = {"all": ("qkv", "attn_out", "fc", "mlp_out")}
BLOCK_KEYS = ("q", "k", "v")  # the ParameterDict key of each third of a fused projection
META_KEY = "lora_meta"  # the one non-tensor entry of lora_state_dict: settings and base fingerprint


class LoRAError(OneLineError, ValueError):
    """Bad LoRA settings or an adapter file that does not fit the model: the message says what to do."""


# ----------------------------------------------------------------------------------------------------------- §1 layer


class LoRALinear(nn.Linear):
    """An nn.Linear plus low-rank adapters, one (A, B) pair per column block of its output. Notebook 05, §1.

    Built from a base nn.Linear whose `weight` (out, in) and `bias` (out,) Parameters it takes over (the same
    objects, frozen). `slices` maps each pair's key ("q"/"k"/"v" for thirds of a fused projection, "all" for the
    whole output) to the output columns it writes; `lora_A[key]` is (r, in), `lora_B[key]` is (block_out, r).
    """

    def __init__(self, base: nn.Linear, slices: dict[str, slice], rank: int, alpha: float | None = None,
                 dropout: float = 0.0, rslora: bool = False):  # fmt: skip
        check_settings(rank, alpha, dropout)
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate (and randomly fill) a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: the base's state_dict keys and values stay
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)  # the base is frozen; only the factors train
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = rslora
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1].start))  # in column order
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, cols in self.slices.items():
            assert 0 <= cols.start < cols.stop <= self.out_features, (key, cols)
            A = torch.empty(rank, self.in_features, **factory)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in)), loralib's and peft's init
            self.lora_A[key] = nn.Parameter(A)  # (r, in)
            self.lora_B[key] = nn.Parameter(torch.zeros(cols.stop - cols.start, rank, **factory))  # (block_out, r)
        self.merged = False
        self.register_buffer("weight_before_merge", None, persistent=False)  # set by merge() (see module docstring)
        self.train(base.training)  # a model in eval mode stays in eval mode (new modules start in training mode)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapters' contribution to the output for an already dropped-out input x~ (..., in) -> (..., out)."""
        blocks = [self.scale * F.linear(F.linear(x, self.lora_A[key]), self.lora_B[key])  # (..., r) -> (..., block)
                  for key in self.slices]  # fmt: skip
        pieces, col = [], 0
        for block, cols in zip(blocks, self.slices.values()):
            if cols.start > col:  # an untouched block (the k third with "q,v"): exactly zero
                pieces.append(block.new_zeros(*block.shape[:-1], cols.start - col))  # dtype of the blocks (autocast)
            pieces.append(block)
            col = cols.stop
        if col < self.out_features:
            pieces.append(blocks[0].new_zeros(*blocks[0].shape[:-1], self.out_features - col))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out), the frozen base path on the undropped input
        if self.merged:  # the adapters are inside self.weight already
            return y
        x_tilde = self.lora_dropout(x)  # (..., in) called exactly once: hooks on lora_dropout see the adapter input
        return y + self.delta(x_tilde)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A placed in the adapted rows of an (out, in) matrix (zeros elsewhere), in float32 or wider."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        dW = torch.zeros(self.out_features, self.in_features, device=self.weight.device, dtype=dtype)
        for key, cols in self.slices.items():
            dW[cols] = self.scale * (self.lora_B[key].to(dtype) @ self.lora_A[key].to(dtype))  # (block_out, in)
        return dW

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s*B@A, keeping a copy of W0 for `unmerge` (a no-op when already merged)."""
        if self.merged:
            return
        self.weight_before_merge = self.weight.detach().clone()
        self.weight.copy_((self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
                           + self.delta_weight()).to(self.weight.dtype))  # fmt: skip
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give back the exact original weight saved by `merge` (a no-op when not merged)."""
        if not self.merged:
            return
        self.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None
        self.merged = False

    def base_weight(self) -> torch.Tensor:
        """The original W0, merged or not."""
        return self.weight_before_merge if self.merged else self.weight

    def extra_repr(self) -> str:
        blocks = ", ".join(f"{k}=[{s.start}:{s.stop})" for k, s in self.slices.items())
        dropout = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={dropout:g}, {blocks}"
                f"{', merged' if self.merged else ''}")  # fmt: skip


# ------------------------------------------------------------------------------------------------------- §2 add_lora


def check_settings(rank, alpha, dropout) -> None:
    """One-line errors for a rank that is not a positive integer, a non-positive alpha, a dropout outside [0, 1]."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise LoRAError(f"LoRA rank must be a positive integer (1, 2, 4, 8, 16, ...), not {rank!r}")
    if alpha is not None and not (isinstance(alpha, numbers.Real) and alpha > 0):
        raise LoRAError(f"LoRA alpha must be a positive number (or None for alpha = rank), not {alpha!r}")
    if not (isinstance(dropout, numbers.Real) and 0.0 <= dropout <= 1.0):
        raise LoRAError(f"LoRA dropout must be a probability in [0, 1], not {dropout!r}")


def parse_targets(targets) -> tuple[str, ...]:
    """Target names (a tuple/list or a comma string such as "q,v"), aliases expanded, in TARGETS order."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    names = [n for n in names if n]
    valid = ", ".join([*TARGETS, *ALIASES])
    if not names:
        raise LoRAError(f"no LoRA target given; choose from {valid} (e.g. targets='q,v')")
    expanded = []
    for n in names:
        if n not in TARGETS and n not in ALIASES:
            raise LoRAError(f"unknown LoRA target {n!r}; choose from {valid}")
        expanded.extend(ALIASES.get(n, (n,)))
    chosen = set(expanded)
    if "qkv" in chosen and chosen & set(BLOCK_KEYS):
        raise LoRAError(f"targets {', '.join(names)} adapt the fused q|k|v projection twice; use 'qkv' (one pair) "
                        f"or some of 'q', 'k', 'v' (one pair each), not both")  # fmt: skip
    return tuple(t for t in TARGETS if t in chosen)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=("q", "v"), dropout: float = 0.0,
             rslora: bool = False) -> nn.Module:  # fmt: skip
    """Wrap the linear layers named by `targets` in LoRALinear (in place), freeze the rest; return the model.

    Notebook 05, §2. targets: names from TARGETS ("q", "k", "v" = thirds of attn.c_attn, "qkv" = one pair on
    all of attn.c_attn, "attn_out", "fc", "mlp_out") or "all" (qkv + attn_out + fc + mlp_out), as a tuple/list
    or a comma string. alpha defaults to rank (scale 1); rslora=True uses alpha/sqrt(rank). The A factors are
    drawn from the global torch RNG (seed it first for reproducible adapters), layer by layer in model order.
    """
    check_settings(rank, alpha, dropout)
    names = parse_targets(targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("this model already has LoRA adapters; add them to a fresh base model (or load_lora into one)")
    # suffix -> {key: which third or None}
    wanted: dict[str, dict[str, int | None]] = {}
    for n in names:
        suffix, third = TARGETS[n]
        wanted.setdefault(suffix, {})[BLOCK_KEYS[third] if third is not None else "all"] = third
    layers = [(name, suffix) for name, module in model.named_modules() for suffix in wanted
              if (name == suffix or name.endswith("." + suffix)) and isinstance(module, nn.Linear)]  # model order
    missing = [s for s in wanted if s not in {suffix for _, suffix in layers}]
    if missing:
        raise LoRAError(f"no nn.Linear named *.{missing[0]} in this model for LoRA targets {', '.join(names)}; "
                        f"use the course's GPT-2 (or edit gpt2lab.lora.TARGETS for other layer names)")  # fmt: skip
    plans = []  # (name, base layer, slices): all checked before the model is touched
    for name, suffix in layers:
        base = model.get_submodule(name)
        slices = {}
        for key, third in wanted[suffix].items():
            if third is None:
                slices[key] = slice(0, base.out_features)
            elif base.out_features % 3:
                raise LoRAError(f"{name} has {base.out_features} outputs, not a fused q|k|v projection "
                                f"(3 equal blocks); use target 'qkv' for one pair on all of it")  # fmt: skip
            else:
                width = base.out_features // 3
                slices[key] = slice(third * width, (third + 1) * width)
        plans.append((name, base, slices))
    for p in model.parameters():  # freeze the base: the new factors will be the only trainable parameters
        p.requires_grad_(False)
    for name, base, slices in plans:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(base, slices, rank, alpha, dropout, rslora))
    return model


def _is_factor(name: str) -> bool:
    return ".lora_A." in f".{name}" or ".lora_B." in f".{name}"


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every LoRALinear, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_settings(model: nn.Module) -> dict:
    """rank, alpha, rslora, dropout and targets of a model with adapters (targets as names from TARGETS)."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("this model has no LoRA adapters; call gpt2lab.lora.add_lora(model, rank, ...) first")
    first = mods[0][1]
    targets = set()
    for name, m in mods:
        for key in m.slices:
            targets.update(t for t, (suffix, third) in TARGETS.items() if (name == suffix or name.endswith(
                "." + suffix)) and (BLOCK_KEYS[third] if third is not None else "all") == key)  # fmt: skip
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {"rank": first.rank, "alpha": first.alpha, "rslora": first.rslora, "dropout": dropout,
            "targets": [t for t in TARGETS if t in targets]}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- §3 merge


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W0 + s*B@A), in place: inference at the base's cost. Notebook 05, §3.

    A merged model equals the unmerged one in eval mode (with dropout on, the unmerged adapters see dropped-out
    inputs; the merged weight does not). Gradients do not reach the factors while merged: unmerge before training.
    """
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`, in place: the original base weights come back bit for bit (from the copy merge kept)."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model


# ------------------------------------------------------------------------------------------------ §4 adapter files


def weights_fingerprint(named_tensors) -> str:
    """16 hex digits from names, shapes, dtypes and 16 values sampled from each tensor: the recipe of the training
    loop's checkpoints (notebook 04, §6), repeated here because lora comes before the loop. Cheap and exact (no
    reduction whose rounding could vary), though not a cryptographic proof that every value is the same."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda item: item[0]):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        if flat.numel():  # float64 positions: float32 cannot hold every index of a large embedding exactly
            idx = torch.linspace(0, flat.numel() - 1, min(16, flat.numel()), dtype=torch.float64).long().to(flat.device)
            h.update(flat[idx].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model: nn.Module) -> str:
    """A fingerprint of the base weights (every parameter that is not a LoRA factor, as before any merge). It equals
    the frozen-base fingerprint the training loop stores in its checkpoints."""
    before_merge = {id(m.weight): m.base_weight() for _, m in lora_modules(model)}
    named = [(n, before_merge.get(id(p), p)) for n, p in model.named_parameters() if not _is_factor(n)]
    return weights_fingerprint(named)


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter factors (name -> tensor, on the CPU), plus one entry META_KEY holding the settings (rank,
    alpha, rslora, dropout, targets) and the fingerprint of the base they were trained on. Notebook 05, §4."""
    settings = lora_settings(model)
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if _is_factor(n)}
    state[META_KEY] = {**settings, "base_fingerprint": base_fingerprint(model), "format": 1}
    return state


def load_lora(model: nn.Module, state: dict) -> nn.Module:
    """Load adapters from `lora_state_dict` into `model`, in place; return it. Notebook 05, §4.

    The model is either a plain base (then the adapters are added first, with the stored settings) or one that had
    add_lora with the same rank, alpha and targets. One-line errors for adapters made for another base (fingerprint),
    rank, alpha or targets. Merged models are unmerged first and merged again after loading.
    """
    meta = state.get(META_KEY) if isinstance(state, dict) else None
    if not isinstance(meta, dict):
        raise LoRAError(f"not a LoRA adapter state (no {META_KEY!r} entry); make it with gpt2lab.lora.lora_state_dict")
    has = bool(lora_modules(model))
    fp = base_fingerprint(model)
    if fp != meta["base_fingerprint"]:
        raise LoRAError(f"these adapters were trained on another base model (fingerprint {meta['base_fingerprint']}, "
                        f"this model's is {fp}); load the same base weights first")  # fmt: skip
    if has:
        mine = lora_settings(model)
        for key in ("rank", "alpha", "rslora", "targets"):
            if mine[key] != meta[key]:
                raise LoRAError(f"adapter {key} {meta[key]!r} does not match this model's LoRA {key} "
                                f"{mine[key]!r}; load them into a plain base model (or add_lora with "
                                f"{key}={meta[key]!r})")  # fmt: skip
    else:  # the random A drawn here is overwritten below: keep the global RNG where it was (a seed fixes a run)
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            add_lora(model, meta["rank"], meta["alpha"], meta["targets"], meta["dropout"], meta["rslora"])
    params = dict(model.named_parameters())
    tensors = {k: v for k, v in state.items() if k != META_KEY}
    expected = {n for n in params if _is_factor(n)}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        more = ", ..." if len(odd) > 3 else ""
        raise LoRAError(f"adapter names do not match this model's ({', '.join(odd[:3])}{more}); "
                        f"were they saved from a model with another number of layers?")  # fmt: skip
    merged = [m for _, m in lora_modules(model) if m.merged]
    for m in merged:
        m.unmerge()
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise LoRAError(f"adapter {name} has shape {tuple(value.shape)}, this model's is "
                                f"{tuple(params[name].shape)}; load them into their own base")  # fmt: skip
            params[name].copy_(value)
    for m in merged:
        m.merge()
    return model


def save_lora(model: nn.Module, path) -> Path:
    """Write the adapters alone (lora_state_dict) to `path`; a few hundred KB instead of the whole model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lora_state_dict(model), path)
    return path


def load_lora_file(model: nn.Module, path) -> nn.Module:
    """Read a file written by `save_lora` and `load_lora` it into `model` (a plain base or one with the same LoRA)."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"no adapter file at {path}; write one with gpt2lab.lora.save_lora(model, path)")
    return load_lora(model, torch.load(path, map_location="cpu", weights_only=True))


# ------------------------------------------------------------------------------------------------------- §5 pairs


@dataclass
class LoRAPair:
    """One adapter pair, for optimizers that treat (A, B) together (LoRA+, AdaPreLoRA, ...). Notebook 05, §5.

    The pair adds scale * x~ A^T B^T to columns `out_slice` of `module`'s output; x~ is the output of
    `module.lora_dropout` (hook it), dL/dy the gradient at `module`'s output (restricted to out_slice).
    """

    name: str  # "transformer.h.0.attn.c_attn.q"
    A: nn.Parameter  # (r, n), n = in_features
    B: nn.Parameter  # (m, r), m = width of the output block
    scale: float
    module: LoRALinear
    out_slice: slice


def lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Every (A, B) pair of the model, in model order (and column order within a layer)."""
    return [LoRAPair(f"{name}.{key}", m.lora_A[key], m.lora_B[key], m.scale, m, cols)
            for name, m in lora_modules(model) for key, cols in m.slices.items()]  # fmt: skip


# ------------------------------------------------------------------------------------------------------- §6 report


class ParameterReport(dict):
    """{"trainable": int, "total": int, "fraction": float}; prints as one line."""

    def __str__(self) -> str:
        return (f"trainable parameters: {self['trainable']:,} of {self['total']:,} "
                f"({100 * self['fraction']:.3f}%)")  # fmt: skip


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable vs total parameters (a tied weight counted once). Notebook 05, §6."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return ParameterReport(trainable=trainable, total=total, fraction=trainable / total if total else 0.0)
