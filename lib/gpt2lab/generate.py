"""Text generation from a GPT-2: greedy, sampling (temperature, top-k, top-p), beam search, best-of-n.

Built in notebook 02 (gpt2), §6–§8. Every strategy runs the same loop: one forward over the prompt fills the
KV cache, then each step feeds only the newest token (positions and attention mask grow by one), picks the next
token from the last position's logits, and stops at `eos_token_id` or after `max_new_tokens`.

Batched prompts must be *left*-padded (`tokenizer.encode_batch(texts, padding_side="left")`), so that every row's
next token is appended right after its last real token. Finished rows are filled with `eos_token_id`.
Call `model.eval()` first: generate does not change the model's mode (dropout would make greedy decoding random).

Any module with GPT2's forward signature works, `model(input_ids, attention_mask, cache=...) -> logits (B, T, V)`:
a `GPT2`, a module that holds one and forwards to it (an adapter wrapper), or `torch.compile(model)`. The KV cache
is laid out for the GPT2 that `find_gpt2` finds inside (its config gives the layers, heads and `n_positions`).
When there is none (or several), generation runs WITHOUT a cache: every step re-runs the whole prefix, which gives
the same tokens, only slower.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import GPT2, KVCache

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------- pieces


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature: < 1 sharpens the distribution, > 1 flattens it. Notebook 02, §7."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 for sampling, got {temperature!r} "
                         "(use do_sample=False for greedy)")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), set the rest to -inf. Notebook 02, §7."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probabilities sum to >= p; the most
    likely token is always kept. Notebook 02, §7."""
    if not _is_number(p) or not 0.0 < p <= 1.0:  # a NaN fails the comparison too
        raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    if p == 1.0:
        return logits  # everything (float rounding of the cumulative sum must not drop the tail)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
    remove = mass_before >= p  # already enough mass without this token
    remove[..., 0] = False  # the top token always survives, whatever p and rounding do
    return logits.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def next_token_distribution(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Last-position logits (B, V) -> sampling probabilities (B, V): temperature, then top-k, then top-p."""
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return F.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------------------- checks


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def find_gpt2(model) -> GPT2 | None:
    """The GPT2 that `model` runs, or None: used for the KV cache layout, `n_positions` and the token embedding.

    Built for the method notebooks (05 lora, 06 smart), which hand wrapped models to `generate` and the tasks.
    Looked for in this order: the model itself; torch.compile's `_orig_mod` and a DataParallel-style `.module`
    (followed as far as they go); else the only GPT2 among the model's submodules. Several GPT2 submodules (say a
    model and its EMA teacher) are ambiguous: None, and the callers fall back to what needs no GPT2.
    """
    seen = set()
    while not isinstance(model, GPT2) and id(model) not in seen:
        seen.add(id(model))
        inner = [getattr(model, name, None) for name in ("_orig_mod", "module")]
        inner = [m for m in inner if isinstance(m, torch.nn.Module)]
        if not inner:
            break
        model = inner[0]
    if isinstance(model, GPT2):
        return model
    if not isinstance(model, torch.nn.Module):
        return None
    found = [m for m in model.modules() if isinstance(m, GPT2)]
    return found[0] if len(found) == 1 else None


def _validate(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p, num_beams, do_sample,
              num_return_sequences, best_of):  # fmt: skip
    if not callable(model):
        raise TypeError(f"generate expects a model called as model(input_ids, attention_mask) -> logits "
                        f"(B, T, vocab), such as a gpt2lab.model.GPT2; got {type(model).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids should be a (batch, seq) LongTensor, got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the eos token 50256 as a start)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    base = find_gpt2(model)
    n_positions = getattr(getattr(base or model, "config", None), "n_positions", None)
    total = input_ids.shape[1] + max_new_tokens
    if n_positions is not None and total > n_positions:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds the model's n_positions={n_positions}")
    # temperature only matters when sampling, but a NaN or inf there is a mistake either way
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r} (> 0 when sampling)")
    if do_sample and temperature == 0:
        raise ValueError("temperature must be > 0 when sampling, got 0 (do_sample=False is greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):  # a NaN fails the comparison
        raise ValueError(f"top_p must be a number in (0, 1] (or None), got {top_p!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search here is deterministic: use num_beams > 1 with do_sample=False")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} cannot exceed num_beams={num_beams}")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError("greedy decoding returns one sequence per prompt: set do_sample=True or num_beams > 1")
    if best_of is not None:
        if not do_sample or num_beams > 1:
            raise ValueError("best_of draws several samples: it needs do_sample=True and num_beams=1")
        if not isinstance(best_of, int) or best_of < num_return_sequences:
            raise ValueError(
                f"best_of must be an integer >= num_return_sequences={num_return_sequences}, got {best_of!r}"
            )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded for generation: encode_batch(texts, padding_side='left')")


# ----------------------------------------------------------------------------------------------------------- generate


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    do_sample: bool = False,
    eos_token_id: int | None = None,
    num_return_sequences: int = 1,
    best_of: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Continue each prompt; return prompt + new tokens, a LongTensor (B * num_return_sequences, T + n_new).

    Built in notebook 02 (gpt2), §6–§8.
    - do_sample=False, num_beams=1: greedy (argmax each step).
    - do_sample=True: sample from softmax(logits / temperature) after top-k and top-p filtering;
      `generator` makes it reproducible. best_of=n draws n samples per prompt and keeps the
      num_return_sequences with the highest mean log-probability per token (see `best_of_n`).
    - num_beams > 1: beam search (scores: sum of log-probs / generated_length ** length_penalty).
    Output rows are grouped by prompt (row i * num_return_sequences + j is prompt i's j-th sequence). The output is
    shorter than T + max_new_tokens when every row has produced `eos_token_id`.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask[None]
    _validate(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p, num_beams, do_sample,
              num_return_sequences, best_of)  # fmt: skip
    if best_of is not None:
        seqs, _ = best_of_n(
            model, input_ids, best_of, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, num_return_sequences=num_return_sequences,
            use_cache=use_cache, generator=generator,
        )  # fmt: skip
        return seqs
    if num_beams > 1:
        return beam_search(
            model, input_ids, max_new_tokens, num_beams, attention_mask=attention_mask, eos_token_id=eos_token_id,
            num_return_sequences=num_return_sequences, use_cache=use_cache, length_penalty=length_penalty,
        )  # fmt: skip
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(num_return_sequences, 0)
    seqs, _, _ = _sample_loop(
        model, input_ids, max_new_tokens, attention_mask, temperature if do_sample else None, top_k, top_p,
        eos_token_id, use_cache, generator,
    )  # fmt: skip
    return seqs


class _Stepper:
    """Feeds the model one step at a time, with or without the KV cache; keeps the attention mask in step.

    The cache is laid out for the GPT2 found inside the model (`find_gpt2`); without one, no cache: each step re-runs
    the whole prefix. The first call's output is checked to be (B, T, vocab) logits, and a model with no GPT2 inside
    that fails on it gets one line saying what generate expected, so a module of the wrong kind fails up front.
    """

    def __init__(self, model, input_ids, attention_mask, max_new_tokens: int, use_cache: bool):
        B, T = input_ids.shape
        self.model = model
        self.mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)  # (B, T)
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        base = find_gpt2(model)
        self.cache = KVCache.for_model(base, B, T + max_new_tokens) if use_cache and base is not None else None
        self.known = base is not None  # a GPT2 inside: its errors are worth seeing as they are
        self.vocab = base.config.vocab_size if base is not None else None
        self.checked = False

    def logits(self, seqs: torch.Tensor, new: int) -> torch.Tensor:
        """Last-position logits (B, V) for `seqs` (B, T_total), of which the last `new` tokens are not yet seen."""
        mask = self.mask if self.padded else None
        if self.cache is None:
            return self._call(seqs, mask)[:, -1].float()
        return self._call(seqs[:, -new:], mask, cache=self.cache)[:, -1].float()

    def _call(self, ids: torch.Tensor, mask, **kwargs) -> torch.Tensor:
        if self.checked:
            return self.model(ids, mask, **kwargs)
        what = f"{type(self.model).__name__} (generate calls model(input_ids, attention_mask) -> logits (B, T, vocab))"
        try:
            out = self.model(ids, mask, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with what generate expected, the cause chained
            if self.known:
                raise
            first = str(err).strip().split("\n")[0]
            raise TypeError(f"cannot generate with {what}: the call failed with {type(err).__name__}: {first}") from err
        expected = (*ids.shape, self.vocab or "vocab")
        if not torch.is_tensor(out) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape) or (
                self.vocab is not None and out.shape[-1] != self.vocab):  # fmt: skip
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise TypeError(f"cannot generate with {what}: expected logits {expected}, got {got}")
        self.checked = True
        return out

    def append(self, n_rows: int) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(n_rows, 1)], dim=1)  # the new token is real

    def reorder(self, index: torch.Tensor) -> None:
        self.mask = self.mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


def _sample_loop(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p, eos_token_id,
                 use_cache, generator):  # fmt: skip
    """Greedy (temperature None) or sampling. Returns (sequences, log-probs of the new tokens under the raw model
    (B, n_new), mask of the new tokens that count (B, n_new): up to and including the first eos)."""
    B, T = input_ids.shape
    stepper = _Stepper(model, input_ids, attention_mask, max_new_tokens, use_cache)
    pad = eos_token_id if eos_token_id is not None else 0
    seqs, logps, alive_steps = input_ids, [], []
    alive = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    new = T
    for _ in range(max_new_tokens):
        logits = stepper.logits(seqs, new)  # (B, V)
        if temperature is None:
            token = logits.argmax(dim=-1)  # (B,)
        else:
            probs = next_token_distribution(logits, temperature, top_k, top_p)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        token = torch.where(alive, token, torch.full_like(token, pad))
        logps.append(F.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1))
        alive_steps.append(alive.clone())
        seqs = torch.cat([seqs, token[:, None]], dim=1)  # (B, T + step + 1)
        stepper.append(B)
        new = 1
        if eos_token_id is not None:
            alive &= token != eos_token_id
            if not bool(alive.any()):
                break
    if not logps:
        empty = input_ids.new_zeros(B, 0)
        return seqs, empty.float(), empty.bool()
    return seqs, torch.stack(logps, 1), torch.stack(alive_steps, 1)


# ----------------------------------------------------------------------------------------------------------- best-of-n


def score_sequences(model, sequences: torch.Tensor, prompt_length: int, *, attention_mask=None,
                    eos_token_id: int | None = None) -> torch.Tensor:  # fmt: skip
    """Mean log-probability per new token of each row of `sequences` (B, T): the tokens after `prompt_length`, up to
    and including the first eos. Notebook 02, §8. `attention_mask` covers the prompt part (left padding)."""
    B, L = sequences.shape
    mask = torch.ones_like(sequences) if attention_mask is None else attention_mask
    if mask.shape[1] < L:
        mask = torch.cat([mask, mask.new_ones(B, L - mask.shape[1])], dim=1)
    with torch.no_grad():
        logits = model(sequences, mask).float()  # (B, L, V)
    logp = F.log_softmax(logits[:, prompt_length - 1 : -1], dim=-1)  # predicts tokens prompt_length..L-1
    new = sequences[:, prompt_length:]  # (B, n_new)
    token_logp = logp.gather(-1, new[..., None]).squeeze(-1)  # (B, n_new)
    counts = torch.ones_like(new, dtype=torch.bool)
    if eos_token_id is not None:  # count up to and including the first eos
        after_eos = (new == eos_token_id).long().cumsum(1) - (new == eos_token_id).long()
        counts = after_eos == 0
    return (token_logp * counts).sum(1) / counts.sum(1).clamp(min=1)


@torch.no_grad()
def best_of_n(model, input_ids, n: int, max_new_tokens: int, *, attention_mask=None, temperature=1.0,
              top_k=None, top_p=None, eos_token_id=None, num_return_sequences: int = 1, use_cache: bool = True,
              generator=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Sample n continuations of each prompt; keep the num_return_sequences with the highest mean log-probability
    per new token (under the model itself, temperature 1, unfiltered). Returns (sequences, their mean log-probs).

    Built in notebook 02 (gpt2), §8. The mean (not the sum) so that short samples do not win just for being short.
    """
    B = input_ids.shape[0]
    ids = input_ids.repeat_interleave(n, dim=0)  # (B * n, T)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(n, dim=0)
    seqs, logps, counted = _sample_loop(model, ids, max_new_tokens, mask, temperature, top_k, top_p, eos_token_id,
                                        use_cache, generator)  # fmt: skip
    scores = (logps * counted).sum(1) / counted.sum(1).clamp(min=1)  # (B * n,)
    best = scores.view(B, n).topk(num_return_sequences, dim=1).indices  # (B, r)
    rows = (best + torch.arange(B, device=best.device)[:, None] * n).reshape(-1)
    return seqs[rows], scores[rows]


# ----------------------------------------------------------------------------------------------------------- beams


@torch.no_grad()
def beam_search(model, input_ids, max_new_tokens: int, num_beams: int, *, attention_mask=None,
                eos_token_id=None, num_return_sequences: int = 1, use_cache: bool = True,
                length_penalty: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Beam search: keep the num_beams best partial sequences by summed log-probability. Notebook 02, §8.

    Each step scores every (beam, next token) pair, keeps the 2 * num_beams best candidates (so that enough
    survive when some end in eos), continues the best num_beams that did not end, and moves those that ended (or
    reached max length) among the top num_beams into a pool of finished hypotheses scored by
    sum log-prob / generated_length ** length_penalty. It stops when no running beam can still beat the worst
    finished one (judged at the current length). This is the same rule as transformers' default
    (early_stopping=False), so the two give the same beams.
    """
    B, T = input_ids.shape
    nb, device = num_beams, input_ids.device
    L = T + max_new_tokens
    pad = eos_token_id if eos_token_id is not None else 0
    if max_new_tokens == 0:
        return input_ids.repeat_interleave(num_return_sequences, dim=0)
    ids = input_ids.repeat_interleave(nb, dim=0)  # (B * nb, T)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(nb, dim=0)
    stepper = _Stepper(model, ids, mask, max_new_tokens, use_cache)
    running = torch.full((B, nb, L), pad, dtype=torch.long, device=device)
    running[:, :, :T] = ids.view(B, nb, T)
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: only the first may expand at step one
    finished = running.clone()
    finished_scores = torch.full((B, nb), -1e9, device=device)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    keep = 2 * nb
    top_nb = torch.arange(keep, device=device) < nb  # candidates ranked in the top num_beams
    offsets = torch.arange(B, device=device)[:, None] * nb
    cur, new = T, T
    while cur < L:
        logits = stepper.logits(running.view(B * nb, L)[:, :cur], new)  # (B * nb, V)
        V = logits.shape[-1]
        logp = F.log_softmax(logits, dim=-1).view(B, nb, V) + running_scores[:, :, None]
        cand_scores, flat = torch.topk(logp.view(B, nb * V), keep, dim=1)  # (B, 2nb)
        parent, token = flat // V, flat % V
        cand = running.gather(1, parent[:, :, None].expand(B, keep, L)).clone()  # (B, 2nb, L)
        cand[:, :, cur] = token
        ends = torch.full_like(token, cur + 1 == L, dtype=torch.bool)
        if eos_token_id is not None:
            ends |= token == eos_token_id
        # running beams for the next step: the best num_beams candidates that did not end
        best = torch.topk(cand_scores - 1e9 * ends.float(), nb, dim=1).indices  # (B, nb)
        running = cand.gather(1, best[:, :, None].expand(B, nb, L))
        running_scores = (cand_scores - 1e9 * ends.float()).gather(1, best)
        beam_parent = parent.gather(1, best)  # (B, nb)
        # finished pool: ended candidates in the top num_beams, length-normalised, merged with the pool so far
        just_finished = ends & top_nb[None]
        normed = cand_scores / ((cur + 1 - T) ** length_penalty)
        normed = normed - 1e9 * (~improvable).float() - 1e9 * (~just_finished).float()
        pool = torch.cat([finished, cand], 1)
        pool_scores = torch.cat([finished_scores, normed], 1)
        pool_done = torch.cat([is_finished, just_finished], 1)
        top = torch.topk(pool_scores, nb, dim=1).indices  # (B, nb)
        finished = pool.gather(1, top[:, :, None].expand(B, nb, L))
        finished_scores, is_finished = pool_scores.gather(1, top), pool_done.gather(1, top)
        stepper.reorder((beam_parent + offsets).view(-1))
        stepper.append(B * nb)
        cur, new = cur + 1, 1
        # can a running beam still beat the worst finished one? (judged at the current length)
        best_possible = running_scores[:, :1] / ((cur - T) ** length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()):
            break
    out = finished[:, :num_return_sequences]  # (B, r, L), already sorted best first
    # trim to the longest returned hypothesis (transformers does the same)
    lengths = _hyp_lengths(out, T, eos_token_id)
    return out[:, :, : T + int(lengths.max())].reshape(B * num_return_sequences, -1)


def _hyp_lengths(seqs: torch.Tensor, T: int, eos_token_id: int | None) -> torch.Tensor:
    new = seqs[..., T:]
    if eos_token_id is None:
        return torch.full(seqs.shape[:-1], new.shape[-1], device=seqs.device)
    is_eos = new == eos_token_id
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, new.shape[-1])
    return first
