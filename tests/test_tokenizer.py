"""GPT-2 BPE facts on the shared vocabulary, the batch padding, and the loading errors."""

from __future__ import annotations

import pytest

from gpt2lab import tokenizer as tok_lib


def test_vocabulary_facts(tokenizer):
    assert tokenizer.vocab_size == len(tokenizer) == 50257
    assert tokenizer.eos_token_id == 50256 and tokenizer.decode([50256]) == "<|endoftext|>"
    assert tokenizer.encode("yes") == [8505] and tokenizer.encode("no") == [3919]
    assert tokenizer.encode(" yes") == [3763]
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.tokens("Hello world") == ["Hello", " world"]


def test_sonnet_round_trip(tokenizer, sonnet_data):
    from gpt2lab.data import load_sonnets

    for sonnet in load_sonnets("train")[:20] + load_sonnets("dev", gold=True):
        ids = tokenizer.encode(sonnet.text)
        assert tokenizer.decode(ids) == sonnet.text
    import torch

    assert tokenizer.decode(torch.tensor(ids)) == sonnet.text  # tensors decode too


def test_tokens_per_line(tokenizer):
    assert tok_lib.tokens_per_line("Hello world\n\n yes", tokenizer) == [2, 0, 1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_batch_pads_and_masks(tokenizer, side):
    ids, mask = tokenizer.encode_batch(["Hello world", "yes"], padding_side=side)
    assert ids.shape == mask.shape == (2, 2)
    assert mask.tolist() == ([[1, 1], [1, 0]] if side == "right" else [[1, 1], [0, 1]])
    assert ids[1][mask[1].bool()].tolist() == [8505]
    assert ids[1][~mask[1].bool()].tolist() == [tokenizer.pad_token_id]
    with pytest.raises(ValueError, match="padding_side must be"):
        tokenizer.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="at least one text"):
        tokenizer.encode_batch([])


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks vocab.json, merges.txt"):
        tok_lib.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tok_lib.load(tmp_path / "nope")


def test_default_folder_comes_from_data_dir(tmp_path, monkeypatch, tokenizer):
    from gpt2lab.data import data_dir

    real = data_dir() / "gpt2-tokenizer"
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    assert tok_lib.default_folder() == tmp_path.resolve() / "gpt2-tokenizer"
    (tmp_path / "gpt2-tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "gpt2-tokenizer" / name).write_bytes((real / name).read_bytes())
    loaded = tok_lib.load()
    assert loaded.source == str((tmp_path / "gpt2-tokenizer").resolve()) and loaded.encode("no") == [3919]


def test_hub_name_when_no_local_folder(tmp_path, monkeypatch):
    """Without a local folder the loader asks for the hub name `gpt2` (faked here: tests never reach the network)."""
    asked = []
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setattr(tok_lib, "_load_cached", lambda source: asked.append(source) or "hub tokenizer")
    assert tok_lib.load() == "hub tokenizer" and asked == ["gpt2"]
    assert tok_lib.load("gpt2-medium") == "hub tokenizer" and asked[-1] == "gpt2-medium"
