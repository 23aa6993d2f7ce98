"""GPT-2 BPE facts on the shared vocabulary, the batch padding, and the loading errors."""

from __future__ import annotations

import socket
import time

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
    """Without a local folder the loader asks for the hub name `gpt2`: the cache first, then the hub only when it
    answers (both faked here: tests never reach the network)."""
    from gpt2lab import weights

    asked = []

    def fake(source, local_files_only=False):
        asked.append((source, local_files_only))
        if local_files_only and source != "gpt2":
            raise OSError("not cached")
        return "hub tokenizer"

    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setattr(tok_lib, "_load_cached", fake)
    assert tok_lib.load() == "hub tokenizer" and asked == [("gpt2", True)]
    monkeypatch.setattr(weights, "hub_unreachable", lambda: None)
    assert tok_lib.load("gpt2-medium") == "hub tokenizer"
    assert asked[1:] == [("gpt2-medium", True), ("gpt2-medium", False)]
    with pytest.raises(tok_lib.TokenizerUnavailable, match="hub .*: not tried"):
        tok_lib.load("gpt2-large", local_files_only=True)  # what the environment check uses: never the network


def _offline_hub(tmp_path, monkeypatch, how):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("how", ["closed port", "HF_HUB_OFFLINE"])
def test_no_files_and_no_hub_raise_one_line_within_seconds(tmp_path, monkeypatch, how):
    """Offline, transformers hands back a tokenizer with a vocabulary of 1 and no error; we refuse it."""
    _offline_hub(tmp_path, monkeypatch, how)
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path / "empty"))
    start = time.perf_counter()
    with pytest.raises(tok_lib.TokenizerUnavailable) as err:
        tok_lib.load()
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "folder " in msg and "gpt2-tokenizer: not there" in msg
    assert f"Hugging Face cache at {tmp_path / 'hf_home' / 'hub'}: no 'gpt2'" in msg
    assert ("unreachable" if how == "closed port" else "HF_HUB_OFFLINE") in msg
    assert "python -m gpt2lab.data download" in msg and "GPT2LAB_DATA" in msg


def test_truncated_merges_are_refused(tmp_path, tokenizer):
    real = tok_lib.default_folder()
    (tmp_path / "vocab.json").write_bytes((real / "vocab.json").read_bytes())
    merges = (real / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "merges.txt").write_text("".join(merges[: len(merges) // 2]), encoding="utf-8")
    with pytest.raises(tok_lib.TokenizerUnavailable, match="does not hold GPT-2's BPE .*the last merge.*download"):
        tok_lib.load(tmp_path)


def test_verify_names_the_fact_that_failed(tokenizer):
    assert tok_lib.verify(tokenizer.hf) is None

    class Tiny:
        eos_token_id = 0

        def __len__(self):
            return 1

    assert tok_lib.verify(Tiny()) == "vocab size is 1, expected 50257"
