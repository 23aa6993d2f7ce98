"""GPT-2's byte-level BPE tokenizer, from a local folder (vocab.json + merges.txt) or the hub name `gpt2`.

Built in notebook 00 (welcome), §3. A thin wrapper over `transformers.GPT2TokenizerFast` (the reference), so
every notebook sees the same small interface: encode, decode, eos_token_id, vocab_size, batch padding.

`load()` never hands back a broken tokenizer: offline, transformers returns an *empty* one (vocabulary of 1) for a
hub name it cannot fetch, and training on it fails much later with a NaN loss. So every load is checked against
GPT-2 facts (`FACTS`) and anything else raises `TokenizerUnavailable`, one line naming what was tried. Hub names go
through the same cache-first, quick-probe path as the weights (`gpt2lab.weights.hub_unreachable`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .data import TOKENIZER_DIR, TOKENIZER_FILES, OneLineError, data_dir, first_line, shown_path

HUB_NAME = "gpt2"


class Tokenizer:
    """encode(text) -> list[int], decode(ids) -> str, eos_token_id, vocab_size, and padded batches."""

    def __init__(self, hf_tokenizer, source: str):
        self.hf = hf_tokenizer
        self.source = source
        self.eos_token_id: int = hf_tokenizer.eos_token_id
        self.pad_token_id: int = self.eos_token_id  # GPT-2 has no pad token; padding is masked out anyway

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode(ids, clean_up_tokenization_spaces=False)

    def tokens(self, text: str) -> list[str]:
        """The BPE pieces of `text`, readable (byte-level 'Ġ' shown as a leading space)."""
        return [self.decode([i]) for i in self.encode(text)]

    def encode_batch(self, texts: list[str], padding_side: str = "right", max_length: int | None = None):
        """Token ids and attention mask, padded to the longest text: two LongTensors of shape (B, T)."""
        import torch

        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        encoded = [self.encode(t)[:max_length] if max_length else self.encode(t) for t in texts]
        if not encoded:
            raise ValueError("encode_batch needs at least one text")
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(encoded):
            span = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
        return ids, mask

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        source = shown_path(Path(self.source)) if os.path.isabs(self.source) else self.source  # a folder or hub name
        return f"Tokenizer(GPT-2 BPE, vocab {self.vocab_size}, eos {self.eos_token_id}, from {source})"


def tokens_per_line(text: str, tokenizer: Tokenizer) -> list[int]:
    """How many BPE tokens each line of `text` costs (an empty line costs 0). Built in notebook 00, §3 (exercise)."""
    return [len(tokenizer.encode(line)) for line in text.split("\n")]


def default_folder() -> Path:
    return data_dir() / TOKENIZER_DIR


class TokenizerUnavailable(OneLineError, FileNotFoundError):
    """No usable GPT-2 tokenizer: the one-line message says what was tried and how to get the files."""


HOW_TO_GET = (
    "run `python -m gpt2lab.data download` (needs internet once), or set GPT2LAB_DATA to a data folder holding "
    "gpt2-tokenizer/vocab.json and merges.txt"
)

# (what, expected): facts any intact GPT-2 BPE has. " gazed" is the *last* merge in merges.txt, so a truncated
# file fails here; an empty tokenizer (what transformers returns offline for a name it cannot fetch) fails them all.
FACTS = (
    ("vocab size", lambda hf: len(hf), 50257),
    ("eos id", lambda hf: hf.eos_token_id, 50256),
    ('"yes"', lambda hf: hf.encode("yes", add_special_tokens=False), [8505]),
    ('" gazed" (the last merge)', lambda hf: hf.encode(" gazed", add_special_tokens=False), [50255]),
)


def verify(hf_tokenizer) -> str | None:
    """None when `hf_tokenizer` is the intact GPT-2 BPE; else which fact failed (expected vs got)."""
    for what, get, expected in FACTS:
        got = get(hf_tokenizer)
        if got != expected:
            return f"{what} is {got}, expected {expected}"
    return None


@functools.lru_cache(maxsize=4)
def _load_cached(source: str, local_files_only: bool = False) -> Tokenizer:
    """A verified tokenizer from a folder or hub name; raises ValueError (not cached by lru_cache) otherwise."""
    from transformers import GPT2TokenizerFast

    from .weights import hub_cache_dir  # the cache as the environment names it now (ignored for folders)

    hf = GPT2TokenizerFast.from_pretrained(source, local_files_only=local_files_only, cache_dir=str(hub_cache_dir()))
    problem = verify(hf)
    if problem:
        raise ValueError(problem)
    return Tokenizer(hf, source)


def load(name_or_folder: str | os.PathLike | None = None, *, local_files_only: bool = False) -> Tokenizer:
    """The GPT-2 tokenizer: from `name_or_folder`, else $GPT2LAB_DATA/gpt2-tokenizer, else the hub name `gpt2`.

    Built in notebook 00 (welcome), §3. Never degrades silently: the result is checked against GPT-2 facts (`FACTS`:
    vocab 50257, eos 50256, "yes" -> 8505, the last merge), and anything else raises `TokenizerUnavailable` with one
    line naming what was tried. A hub name is looked up in the Hugging Face cache first; the hub itself is asked
    only when it answers within seconds (and never with `local_files_only=True`, as the environment check does).
    """
    tried = []
    if name_or_folder is None:
        folder = default_folder()
        if folder.is_dir():
            name_or_folder = folder
        else:
            tried.append(f"folder {shown_path(folder)}: not there")
            name_or_folder = HUB_NAME
    path = Path(name_or_folder).expanduser()
    if path.is_dir():
        missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
        if missing and not (path / "tokenizer.json").is_file():
            where = shown_path(path.resolve())
            raise TokenizerUnavailable(f"tokenizer folder {where} lacks {', '.join(missing)}: {HOW_TO_GET}")
        try:
            return _load_cached(str(path.resolve()))
        except Exception as err:
            raise TokenizerUnavailable(
                f"tokenizer folder {shown_path(path.resolve())} does not hold GPT-2's BPE ({first_line(err)}): "
                f"its files are damaged or from another tokenizer; delete them and {HOW_TO_GET}"
            ) from None
    if os.sep in str(name_or_folder) or str(name_or_folder).startswith("."):
        raise TokenizerUnavailable(f"tokenizer folder {path} does not exist: {HOW_TO_GET}")
    return _from_hub(str(name_or_folder), tried, local_files_only)


def _from_hub(name: str, tried: list[str], local_files_only: bool) -> Tokenizer:
    # the cache first (no network), then the hub only if it answers: transformers alone retries for minutes offline
    from .weights import hub_cache_dir, hub_endpoint, hub_unreachable

    try:
        return _load_cached(name, True)
    except Exception as err:  # offline, transformers hands back an empty tokenizer (vocab size 1) for a missing name
        detail = "" if "vocab size is 1," in str(err) or isinstance(err, OSError) else f" ({first_line(err)})"
        tried.append(f"Hugging Face cache at {hub_cache_dir()}: no {'usable ' if detail else ''}{name!r}{detail}")
    why = "not tried (environment check)" if local_files_only else hub_unreachable()
    if why is None:
        try:
            return _load_cached(name)
        except Exception as err:
            why = first_line(err)
    tried.append(f"hub {hub_endpoint()}: {why}")
    raise TokenizerUnavailable(f"no GPT-2 tokenizer: {'; '.join(tried)}. To get the files, {HOW_TO_GET}")
