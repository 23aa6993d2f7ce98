"""Methods of the experiment grid: what is trained (full or LoRA), with which optimizer, with SMART or not.

Used in notebook 09 (experiments), §1-§2; the pieces were built in notebooks 03-08. A method is written as parts
joined by "+": a base, an optimizer and optionally "smart", in any order; missing parts take defaults.

    parse_method("lora+soap").name               -> "lora-r8-qv+soap"
    parse_method("full+adamw+smart").name        -> "full+adamw+smart"
    parse_method("lora-r16-qkv+adaprelora").name -> "lora-r16-qkv+adaprelora"
    parse_method("smart").name                   -> "full+adamw+smart"
    parse_method("adaprelora").name              -> "lora-r8-qv+adaprelora"  (a LoRA-only optimizer implies LoRA)

The base is "full" or "lora[-r<rank>][-a<alpha>][-d<dropout>][-<targets>]"; targets are letters of q, k, v ("qv",
"qk") or `gpt2lab.lora.TARGETS` names joined by "." ("qkv" = one pair on the fused projection, "qkv.attn_out",
"all"). The canonical name (`Method.name`) orders the parts base, optimizer, smart and shows alpha and dropout only
when they differ from the defaults.

Optimizers come from the registry `OPTIMIZERS`; add your own with `register_optimizer` (notebook 09's exercise):

    register_optimizer("sgdm", lambda model, lr: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9), lr=1e-2, doc="SGD with momentum")

A factory is `factory(model, lr) -> torch.optim.Optimizer` holding exactly the trainable parameters (the training
loop checks). If it also takes `weight_decay`, the run's `weight_decay` setting is passed to it.

Hyper-parameters. `SETTINGS` lists every setting a grid file or the command line may set, with its type and its
meaning; `resolve_settings` computes one run's values from the defaults and the overrides (see its docstring).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..data import OneLineError
from ..lora import ALIASES, TARGETS, parse_targets


class MethodError(OneLineError, ValueError):
    """A method string, an optimizer registration or a setting that cannot be used; the message says what to do."""


# ---------------------------------------------------------------------------------------------- optimizer registry


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: its factory, its default lr, whether it needs LoRA adapters, a one-line doc.

    lr: a number (every base, every size) or a dict with keys "full", "lora" and optionally "quick" (the tiny
    models of quick mode); each value a number or a dict {task name: number}.
    """

    name: str
    factory: Callable
    lr: float | dict
    lora_only: bool = False
    doc: str = ""

    def default_lr(self, base: str, task: str, size: str) -> float:
        """The lr for a base ("full"/"lora") on a task at a size ("quick"/"full")."""
        lr = self.lr
        if isinstance(lr, dict):
            key = "quick" if size == "quick" and "quick" in lr else base
            if key not in lr:
                raise MethodError(f"optimizer {self.name!r} has no default lr for {base} ({sorted(lr)} given): "
                                  "pass --lr or set lr in the grid file")
            lr = lr[key]
        if isinstance(lr, dict):
            if task not in lr:
                raise MethodError(f"optimizer {self.name!r} has no default lr for task {task!r}: pass --lr")
            lr = lr[task]
        return float(lr)


OPTIMIZERS: dict[str, OptimizerSpec] = {}
RESERVED = ("full", "lora", "smart")
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


def register_optimizer(name: str, factory: Callable, *, lr: float | dict, lora_only: bool = False,
                       doc: str = "") -> OptimizerSpec:
    """Add (or replace) an optimizer in the registry, so that "<base>+<name>" runs it. Notebook 09, §5 (exercise).

    factory: `factory(model, lr) -> torch.optim.Optimizer` over the trainable parameters (with a `weight_decay`
    parameter it also receives the run's weight_decay). lr: the default learning rate, a number or
    {"full": x, "lora": y[, "quick": z]} (see `OptimizerSpec`). lora_only: the optimizer works on LoRA factor
    pairs (AdaPreLoRA, LoRA+), so "full+<name>" is refused. Registering a name again replaces it (rerun cells).
    """
    if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED:
        raise MethodError(f"optimizer name {name!r} must be lowercase letters, digits and '-', start with a letter "
                          f"and not be one of {', '.join(RESERVED)} (e.g. 'sgd-momentum')")
    if not callable(factory):
        raise MethodError(f"optimizer {name!r}: factory must be callable as factory(model, lr), not {factory!r}")
    _check_lr(name, lr)
    spec = OptimizerSpec(name, factory, lr, bool(lora_only), doc)
    OPTIMIZERS[name] = spec
    return spec


def _check_lr(name: str, lr) -> None:
    def positive(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)

    if positive(lr):
        return
    if isinstance(lr, dict) and lr and set(lr) <= {"full", "lora", "quick"}:
        values = [v for x in lr.values() for v in (x.values() if isinstance(x, dict) else [x])]
        if values and all(positive(v) for v in values):
            return
    raise MethodError(f"optimizer {name!r}: lr must be a positive number or a dict with keys 'full', 'lora', "
                      f"'quick' (e.g. {{'full': 2e-5, 'lora': 2e-4}}), not {lr!r}")


# The built-in factories, wired as in the notebooks that built them.
def adamw(model, lr, weight_decay=0.01):
    """Our AdamW (notebook 03) with decay_groups: matrices decay, biases/LayerNorms/embeddings do not (nb 04-06)."""
    from ..optim import AdamW, decay_groups

    return AdamW(decay_groups(model, weight_decay=weight_decay), lr=lr)


def soap(model, lr, weight_decay=0.01):
    """SOAP (notebook 07) with the same groups as AdamW, the reference's other defaults (make_soap, nb 07)."""
    from ..optim import SOAP, decay_groups

    return SOAP(decay_groups(model, weight_decay=weight_decay), lr=lr)


def adaprelora(model, lr):
    """AdaPreLoRA (notebook 08) on the model's LoRA pairs, its defaults (nb 08, §6)."""
    from ..optim import AdaPreLoRA

    return AdaPreLoRA(model, lr=lr)


def scaled_adamw(model, lr):
    """Scaled AdamW, the Riemannian-preconditioned LoRA baseline (notebook 08, §5)."""
    from ..optim import ScaledAdamW

    return ScaledAdamW(model, lr=lr)


def lora_plus(model, lr):
    """LoRA+ (notebook 08, §5): AdamW with the B factors at 16 x lr."""
    from ..optim import LoRAPlus

    return LoRAPlus(model, lr=lr)


# Default lrs at gpt2 size. Full fine-tuning: notebook 04's real-mode lrs (sonnets 5e-5, paraphrases 2e-5), kept for
# SOAP as notebook 07 does. LoRA: 2e-4, notebook 05's and 08's real-mode lr for every LoRA optimizer. Quick mode (a
# tiny random model): 3e-3, the quick-mode lr of notebooks 05, 06 and 08.
_FULL_LR = {"sonnet": 5e-5, "paraphrase": 2e-5}
register_optimizer("adamw", adamw, lr={"full": _FULL_LR, "lora": 2e-4, "quick": 3e-3},
                   doc="AdamW with weight decay on matrices only (notebooks 03-04)")
register_optimizer("soap", soap, lr={"full": _FULL_LR, "lora": 2e-4, "quick": 3e-3},
                   doc="SOAP: Adam in Shampoo's eigenbasis (notebook 07)")
register_optimizer("adaprelora", adaprelora, lr={"lora": 2e-4, "quick": 3e-3}, lora_only=True,
                   doc="AdaPreLoRA: Adafactor-preconditioned LoRA factor steps (notebook 08)")
register_optimizer("scaled-adamw", scaled_adamw, lr={"lora": 2e-4, "quick": 3e-3}, lora_only=True,
                   doc="Scaled AdamW: (B^T B)^-1 / (A A^T)^-1 preconditioned LoRA baseline (notebook 08)")
register_optimizer("lora-plus", lora_plus, lr={"lora": 2e-4, "quick": 3e-3}, lora_only=True,
                   doc="LoRA+: AdamW with lr x 16 on the B factors (notebook 08)")


# ---------------------------------------------------------------------------------------------- methods

# LoRA defaults: notebooks 05, 06 and 08 (rank 8, alpha 32, q and v, dropout 0.1: the paper's GPT-2 setting, rank 8)
LORA_DEFAULTS = {"rank": 8, "alpha": 32.0, "targets": ("q", "v"), "dropout": 0.1}


@dataclass(frozen=True)
class Method:
    """A method of the grid (notebook 09, §1): base "full" or "lora", an optimizer name, SMART on or off, and the
    LoRA settings (None for full fine-tuning). Build one with `parse_method`; `name` is its canonical string."""

    base: str = "full"
    optimizer: str = "adamw"
    smart: bool = False
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    dropout: float | None = None

    def __post_init__(self):
        if self.base not in ("full", "lora"):
            raise MethodError(f"method base must be 'full' or 'lora', not {self.base!r}")
        if self.base == "full":
            for key in LORA_DEFAULTS:
                object.__setattr__(self, key, None)
        else:
            for key, value in LORA_DEFAULTS.items():
                if getattr(self, key) is None:
                    object.__setattr__(self, key, value)
            object.__setattr__(self, "targets", parse_targets(self.targets))
            object.__setattr__(self, "alpha", float(self.alpha))
            object.__setattr__(self, "dropout", float(self.dropout))
        spec = OPTIMIZERS.get(self.optimizer)
        if spec is None:
            raise MethodError(f"unknown optimizer {self.optimizer!r}; registered: {', '.join(OPTIMIZERS)} "
                              "(add one with gpt2lab.experiments.register_optimizer)")
        if spec.lora_only and self.base != "lora":
            raise MethodError(f"{self.optimizer} updates LoRA factor pairs: use 'lora+{self.optimizer}', "
                              f"not '{self.base}+{self.optimizer}'")

    @property
    def lora(self) -> bool:
        return self.base == "lora"

    @property
    def base_name(self) -> str:
        """'full' or 'lora-r8-qv' (alpha and dropout shown when not the defaults): the loop's `method` prefix."""
        if not self.lora:
            return "full"
        parts = [f"lora-r{self.rank}"]
        if self.alpha != LORA_DEFAULTS["alpha"]:
            parts.append(f"a{self.alpha:g}")
        if self.dropout != LORA_DEFAULTS["dropout"]:
            parts.append(f"d{self.dropout:g}")
        parts.append(targets_token(self.targets))
        return "-".join(parts)

    @property
    def name(self) -> str:
        """Canonical: base, optimizer, smart ("full+adamw", "lora-r8-qv+soap+smart")."""
        return "+".join([self.base_name, self.optimizer] + (["smart"] if self.smart else []))

    def __str__(self) -> str:
        return self.name


def targets_token(targets: tuple[str, ...]) -> str:
    """("q", "v") -> "qv"; ("qkv",) -> "qkv"; ("q", "k", "v") -> "q.k.v" (not "qkv", the fused pair)."""
    if set(targets) <= {"q", "k", "v"} and len(targets) < 3:
        return "".join(targets)
    return ".".join(targets)


def _parse_targets_token(token: str, text: str) -> tuple[str, ...]:
    names = []
    for part in token.split("."):
        if part in TARGETS or part in ALIASES:
            names.append(part)
        elif part and set(part) <= {"q", "k", "v"}:
            names.extend(part)  # "qv" -> q, v
        else:
            raise MethodError(f"method {text!r}: unknown LoRA target {part!r}; use letters of q, k, v ('qv') or "
                              f"{', '.join([*TARGETS, *ALIASES])} joined by '.'")
    try:
        return parse_targets(names)
    except ValueError as err:
        raise MethodError(f"method {text!r}: {err}") from None


def _parse_lora(token: str, text: str) -> dict:
    """'lora-r16-a32-d0.05-qkv' -> {'rank': 16, 'alpha': 32.0, 'dropout': 0.05, 'targets': ('qkv',)}."""
    out: dict = {}
    for part in token.split("-")[1:]:
        if m := re.fullmatch(r"r(\d+)", part):
            out["rank"] = int(m.group(1))
        elif m := re.fullmatch(r"a(\d*\.?\d+(?:e-?\d+)?)", part):
            out["alpha"] = float(m.group(1))
        elif m := re.fullmatch(r"d(\d*\.?\d+(?:e-?\d+)?)", part):
            out["dropout"] = float(m.group(1))
        else:
            out["targets"] = _parse_targets_token(part, text)
    if out.get("rank") == 0:
        raise MethodError(f"method {text!r}: LoRA rank must be at least 1")
    return out


def parse_method(text: str | Method) -> Method:
    """'lora+soap', 'full+adamw+smart', 'lora-r16-qkv+adaprelora', 'smart', 'lora' -> Method (see the module doc)."""
    if isinstance(text, Method):
        return text
    if not isinstance(text, str) or not text.strip():
        raise MethodError(f"a method is a string such as 'lora+soap' or 'full+adamw+smart', not {text!r}")
    raw = text
    parts = [p.strip() for p in text.strip().lower().split("+")]
    base, lora, optimizer, smart = None, {}, None, False
    for part in parts:
        if part in OPTIMIZERS:
            if optimizer is not None:
                raise MethodError(f"method {raw!r} names two optimizers ({optimizer}, {part}): choose one")
            optimizer = part
        elif part == "smart":
            if smart:
                raise MethodError(f"method {raw!r} says smart twice")
            smart = True
        elif part == "full" or part == "lora" or part.startswith("lora-"):
            if base is not None:
                raise MethodError(f"method {raw!r} names two bases: choose full or lora")
            base = "full" if part == "full" else "lora"
            lora = _parse_lora(part, raw) if base == "lora" else {}
        else:
            raise MethodError(f"method {raw!r}: unknown part {part!r}; a method is <base>[+<optimizer>][+smart] with "
                              f"base full or lora[-r<rank>][-<targets>] and optimizer one of {', '.join(OPTIMIZERS)} "
                              "(add one with register_optimizer)")
    if base is None:  # "smart", "soap": full fine-tuning; "adaprelora": LoRA, the only base it works on
        base = "lora" if optimizer is not None and OPTIMIZERS[optimizer].lora_only else "full"
    return Method(base=base, optimizer=optimizer or "adamw", smart=smart, **lora)


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter a grid file or the command line may set: its types and what it means."""

    types: tuple
    doc: str
    optional: bool = False  # None allowed (the string "none" in a TOML file)


_NUM = (int, float)
SETTINGS: dict[str, Setting] = {
    # the loop (gpt2lab.train.TrainConfig)
    "lr": Setting(_NUM, "learning rate (default: the optimizer's, per base, task and size)"),
    "epochs": Setting((int,), "passes over the training set"),
    "batch_size": Setting((int,), "examples per optimizer step (the global batch under torchrun)"),
    "max_steps": Setting((int,), "stop after this many optimizer steps", optional=True),
    "warmup_steps": Setting((int,), "linear warm-up steps"),
    "schedule": Setting((str,), "'constant' or 'linear' after warm-up"),
    "grad_clip": Setting(_NUM, "max global gradient norm", optional=True),
    "patience": Setting((int,), "stop after this many evaluations without a better dev metric", optional=True),
    "eval_every": Setting((int,), "evaluate every N steps (none: every epoch)", optional=True),
    "amp": Setting((str,), "'bf16' or 'fp16' autocast on CUDA", optional=True),
    "log_every": Setting((int,), "record the training loss every N steps"),
    "length_batching": Setting((bool,), "batch examples of similar length (when the loop supports it)"),
    "compile": Setting((bool,), "torch.compile the model (when the loop supports it)"),
    "keep": Setting((str,), "files a finished run keeps: 'all' (checkpoints too: a longer budget resumes it), "
                    "'best' (best.pt and record.json) or 'record' (record.json only)"),
    # the optimizer
    "weight_decay": Setting(_NUM, "decoupled weight decay on matrices (optimizers that take it)"),
    # the data (gpt2lab.tasks)
    "train_limit": Setting((int,), "training examples (none: all)", optional=True),
    "dev_limit": Setting((int,), "dev examples (none: all)", optional=True),
    "test_limit": Setting((int,), "paraphrase test pairs loaded (none: all)", optional=True),
    "max_length": Setting((int,), "longest sequence in tokens"),
    "max_new_tokens": Setting((int,), "sonnet tokens generated for chrF"),
    # LoRA (the method's adapters)
    "rank": Setting((int,), "LoRA rank"),
    "alpha": Setting(_NUM, "LoRA alpha (scale alpha / rank)"),
    "targets": Setting((str,), "LoRA targets, e.g. 'q,v' or 'qkv,attn_out'"),
    "dropout": Setting(_NUM, "LoRA dropout"),
    # SMART (notebook 06)
    "smart_weight": Setting(_NUM, "lambda_s, the weight of the smoothness term"),
    "smart_eps": Setting(_NUM, "inf-norm radius of the embedding perturbation"),
    "smart_step_size": Setting(_NUM, "ascent step of the perturbation search (none: 100 x eps)", optional=True),
    "smart_noise_var": Setting(_NUM, "variance of the starting noise (none: eps)", optional=True),
    "smart_steps": Setting((int,), "ascent steps of the search"),
    "prox_weight": Setting(_NUM, "mu, the weight of the momentum Bregman term"),
}
LORA_KEYS = ("rank", "alpha", "targets", "dropout")
SMART_KEYS = ("smart_weight", "smart_eps", "smart_step_size", "smart_noise_var", "smart_steps", "prox_weight")
SONNET_ONLY, PARAPHRASE_ONLY = ("max_new_tokens",), ("test_limit",)
# how far a run goes or how it is watched: not in the run's folder name, so a longer budget resumes the same run
BUDGET_KEYS = ("epochs", "max_steps", "patience", "eval_every", "log_every", "compile", "keep")
LIMITED = ("train_limit", "dev_limit", "test_limit", "epochs", "max_new_tokens")  # what --limit N caps at N

# Per (size, task) defaults. "full": notebook 04's real-mode settings (sonnets 10 epochs of batch 8 with patience 3
# and 2 warm-up steps, 160 new tokens; paraphrases batch 16), 1 paraphrase epoch as notebooks 06 and 08 (the grid
# runs 8 methods x 3 seeds). "quick": a tiny random model on a few examples, one epoch: seconds per run.
TASK_DEFAULTS = {
    ("full", "sonnet"): dict(epochs=10, batch_size=8, warmup_steps=2, patience=3, max_length=1024, max_new_tokens=160,
                             train_limit=None, dev_limit=None, log_every=10),
    ("full", "paraphrase"): dict(epochs=1, batch_size=16, warmup_steps=0, patience=None, max_length=1024,
                                 train_limit=None, dev_limit=None, test_limit=None, log_every=20),
    ("quick", "sonnet"): dict(epochs=1, batch_size=2, warmup_steps=0, patience=None, max_length=64, max_new_tokens=4,
                              train_limit=4, dev_limit=2, log_every=1),
    ("quick", "paraphrase"): dict(epochs=1, batch_size=8, warmup_steps=0, patience=None, max_length=128,
                                  train_limit=16, dev_limit=8, test_limit=1, log_every=1),
}
# keep="best": a finished run's checkpoints (at gpt2 size with AdamW about 1.5 GB each, two per run) are deleted, so
# the default grid's 27 full fine-tuning runs need ~0.5 GB each (best.pt), not ~3.5 GB.
COMMON_DEFAULTS = dict(max_steps=None, schedule="constant", grad_clip=1.0, eval_every=None, length_batching=False,
                       compile=False, weight_decay=0.01, keep="best")


def defaults(method: Method, task: str, size: str, cuda: bool = False) -> dict:
    """The default settings of one run before any override (notebook 09, §2); where each comes from:

    loop and data: TASK_DEFAULTS (notebook 04's real-mode sizes; tiny ones in quick mode); amp "bf16" at full size
    on CUDA (notebooks 04-08); lr: the optimizer's registered default; weight_decay 0.01 (notebook 04's AdamW);
    LoRA: rank 8, alpha 32, q and v, dropout 0.1 (notebooks 05 and 08); SMART: notebook 06's settings, lambda_s = 1,
    eps = 1e-2 at gpt2 size and 1e-3 for the tiny model, step size 100 x eps, noise variance eps, 1 ascent step,
    mu = 1 (the paper's beta schedule for the teacher is fixed: 0.99 for the first 10% of the steps, then 0.999).
    """
    if (size, task) not in TASK_DEFAULTS:
        raise MethodError(f"no defaults for task {task!r} at size {size!r}; tasks: sonnet, paraphrase; sizes: "
                          "quick, full")
    out = {**COMMON_DEFAULTS, **TASK_DEFAULTS[size, task]}
    out["amp"] = "bf16" if size == "full" and cuda else None
    out["lr"] = OPTIMIZERS[method.optimizer].default_lr(method.base, task, size)
    if method.lora:
        out.update(rank=method.rank, alpha=method.alpha, targets=",".join(method.targets), dropout=method.dropout)
    if method.smart:
        eps = 1e-2 if size == "full" else 1e-3
        out.update(smart_weight=1.0, smart_eps=eps, smart_step_size=None, smart_noise_var=None, smart_steps=1,
                   prox_weight=1.0)
    return out


def check_setting(key: str, value, where: str):
    """The value, normalised ("none" -> None, int -> float where a float is meant), or a one-line error."""
    if key not in SETTINGS:
        raise MethodError(f"{where}: unknown key {key!r}; known: {', '.join(SETTINGS)}")
    spec = SETTINGS[key]
    if spec.optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not ok:
        names = " or ".join(t.__name__ for t in spec.types) + (" or 'none'" if spec.optional else "")
        raise MethodError(f"{where}: {key} must be {names} ({spec.doc}), not {value!r}")
    if spec.types == _NUM:
        value = float(value)
    if key == "schedule" and value not in ("constant", "linear"):
        raise MethodError(f"{where}: schedule must be 'constant' or 'linear', not {value!r}")
    if key == "amp" and value not in ("bf16", "fp16"):
        raise MethodError(f"{where}: amp must be 'bf16', 'fp16' or 'none', not {value!r}")
    if key == "keep" and value not in ("all", "best", "record"):
        raise MethodError(f"{where}: keep must be 'all', 'best' or 'record', not {value!r}")
    return value


def resolve_settings(method: Method, task: str, size: str, layers: list[dict] = (), limit: int | None = None,
                     cuda: bool = False) -> tuple[Method, dict]:
    """(method, settings) of one run: `defaults`, then each dict of `layers` in order (later wins: the grid's
    [settings], its [task.<name>], its [method."<name>"], the command line), then `limit` caps the counts.

    LoRA keys (rank, alpha, targets, dropout) change the method itself (its name shows the rank and targets); they
    are ignored for full fine-tuning, as SMART keys are for methods without SMART. The result holds the resolved
    value of every setting that applies (smart_step_size and smart_noise_var computed from eps when None).
    """
    settings = defaults(method, task, size, cuda)
    for layer in layers:
        for key, value in layer.items():
            value = check_setting(key, value, "setting")
            if key in LORA_KEYS and not method.lora or key in SMART_KEYS and not method.smart:
                continue
            if key in SONNET_ONLY and task != "sonnet" or key in PARAPHRASE_ONLY and task != "paraphrase":
                continue
            settings[key] = value
    if method.lora:
        targets = _parse_targets_token(settings["targets"].replace(",", "."), settings["targets"]) \
            if isinstance(settings["targets"], str) else tuple(settings["targets"])
        method = replace(method, rank=settings["rank"], alpha=settings["alpha"], targets=targets,
                         dropout=settings["dropout"])
        settings["targets"] = ",".join(method.targets)
        settings["alpha"] = method.alpha
    if method.smart:
        eps = settings["smart_eps"]
        if settings["smart_step_size"] is None:
            settings["smart_step_size"] = 100 * eps  # notebook 06: step size 100 x eps
        if settings["smart_noise_var"] is None:
            settings["smart_noise_var"] = eps  # notebook 06: noise variance eps
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise MethodError(f"limit must be a positive whole number, not {limit!r}")
        for key in LIMITED:
            if key in settings:
                settings[key] = limit if settings[key] is None else min(settings[key], limit)
    return method, settings


# ---------------------------------------------------------------------------------------------- building a run


def paper_beta(total_steps: int) -> Callable[[int], float]:
    """The SMART paper's teacher schedule (notebook 06, §6): beta 0.99 for the first 10% of the updates, then 0.999."""

    def beta_schedule(t: int) -> float:
        return 0.99 if t < 0.1 * total_steps else 0.999

    return beta_schedule


@dataclass
class Built:
    """What `build` returns: the model (with adapters), the objective to train (the task, or the task with SMART's
    terms), the optimizer factory for `gpt2lab.train.train` and the callbacks (SMART's teacher)."""

    model: object
    objective: object
    factory: Callable
    callbacks: list = field(default_factory=list)

    def __iter__(self):  # model, objective, factory, callbacks = build(...)
        return iter((self.model, self.objective, self.factory, self.callbacks))


def build(method: Method, task, model, settings: dict, total_steps: int, seed: int = 0) -> Built:
    """Wire a method onto a model and a task, as notebooks 05 (LoRA), 06 (SMART) and 08 (LoRA optimizers) do.

    LoRA: the adapters are drawn right after seeding torch with `seed`, so the same seed gives the same adapters for
    every optimizer. SMART: smart_objective(task, weight, eps, step_size, noise_var, steps) with a MomentumBregman
    proximal term (weight mu, the paper's beta schedule over `total_steps`), which is also a loop callback.
    """
    import torch

    from ..lora import add_lora
    from ..smart import MomentumBregman, smart_objective

    if method.lora:
        torch.manual_seed(seed)  # the same adapters for every optimizer (notebook 08)
        add_lora(model, rank=method.rank, alpha=method.alpha, targets=method.targets, dropout=method.dropout)
    objective, callbacks = task, []
    if method.smart:
        prox = MomentumBregman(task, weight=settings["prox_weight"], beta=paper_beta(total_steps))
        objective = smart_objective(task, weight=settings["smart_weight"], eps=settings["smart_eps"],
                                    step_size=settings["smart_step_size"], noise_var=settings["smart_noise_var"],
                                    steps=settings["smart_steps"], proximal=prox)
        callbacks.append(prox)
    factory = OPTIMIZERS[method.optimizer].factory
    if _takes(factory, "weight_decay"):
        factory = functools.partial(factory, weight_decay=settings["weight_decay"])
    return Built(model, objective, factory, callbacks)


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
