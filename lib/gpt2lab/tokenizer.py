"""GPT-2's byte-level BPE tokenizer, from a local folder (vocab.json + merges.txt) or the hub name `gpt2`.

Built in notebook 00 (welcome), §3. A thin wrapper over `transformers.GPT2TokenizerFast` (the reference), so
every notebook sees the same small interface: encode, decode, eos_token_id, vocab_size, batch padding.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .data import TOKENIZER_DIR, TOKENIZER_FILES, data_dir, shown_path

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


@functools.lru_cache(maxsize=4)
def _load_cached(source: str) -> Tokenizer:
    from transformers import GPT2TokenizerFast

    return Tokenizer(GPT2TokenizerFast.from_pretrained(source), source)


def load(name_or_folder: str | os.PathLike | None = None) -> Tokenizer:
    """The GPT-2 tokenizer: from `name_or_folder`, else $GPT2LAB_DATA/gpt2-tokenizer, else the hub name `gpt2`.

    Built in notebook 00 (welcome), §3.
    """
    if name_or_folder is None:
        folder = default_folder()
        name_or_folder = folder if folder.is_dir() else HUB_NAME
    path = Path(name_or_folder).expanduser()
    if path.is_dir():
        missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
        if missing and not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"tokenizer folder {path} lacks {', '.join(missing)} (run `python -m gpt2lab.data download`)"
            )
        return _load_cached(str(path.resolve()))
    if os.sep in str(name_or_folder) or str(name_or_folder).startswith("."):
        raise FileNotFoundError(f"tokenizer folder {path} does not exist (run `python -m gpt2lab.data download`)")
    return _load_cached(str(name_or_folder))  # a hub name such as "gpt2": needs internet on first use
