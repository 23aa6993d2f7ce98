"""gpt2lab.weights: the weights setting, the Hugging Face cache found offline under the name as given, one-line
failures within seconds, damaged and empty folders. No test reaches the network: the hub is faked, switched off
(HF_HUB_OFFLINE=1) or pointed at a closed local port."""

from __future__ import annotations

import socket
import time

import huggingface_hub
import pytest
import torch
import transformers
from hf_cache import place_in_hub_cache
from tiny_gpt2 import hf_tiny

from gpt2lab import weights
from gpt2lab.model import GPT2


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there, so a connection is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache of our own and a hub at a closed local port: no network, no user cache."""
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", weights.WEIGHTS_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    return cache


def test_setting_argument_then_environment_then_gpt2(monkeypatch, tmp_path):
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    assert weights.setting() == "gpt2"
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path))
    assert weights.setting() == str(tmp_path)
    assert weights.setting("gpt2-medium") == "gpt2-medium"


def test_hub_cache_filled_by_hand_is_found_offline(hub, monkeypatch):
    """A cache laid out as huggingface_hub does (tests/hf_cache.py) serves transformers, the hub and us alike."""
    ref = hf_tiny(21)
    snapshot = place_in_hub_cache(ref, hub, "gpt2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert huggingface_hub.snapshot_download("gpt2", local_files_only=True, cache_dir=hub) == str(snapshot)
    theirs = transformers.GPT2LMHeadModel.from_pretrained("gpt2", cache_dir=hub, local_files_only=True).eval()
    ids = torch.tensor([[5, 17, 300, 9]])
    with torch.no_grad():
        expected = ref(ids).logits
        assert torch.equal(theirs(ids).logits, expected)
        assert weights.resolve("gpt2") == snapshot
        assert torch.equal(weights.load_reference("gpt2")(ids).logits, expected)
        assert (GPT2.from_pretrained("gpt2").eval()(ids) - expected).abs().max().item() < 1e-5


def test_hub_name_is_used_as_given_cache_first_then_one_download(hub, monkeypatch, tmp_path):
    """"gpt2" stays "gpt2" (no rewrite to openai-community/gpt2): the cache transformers fills is the one we read."""
    hf_tiny(22).save_pretrained(tmp_path / "snap")
    calls = []

    def fake(repo, allow_patterns=None, local_files_only=False, cache_dir=None, etag_timeout=None, **kw):
        calls.append((repo, local_files_only, etag_timeout))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        assert "*.safetensors" in allow_patterns and "*.h5" not in allow_patterns and cache_dir == hub
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(weights, "hub_unreachable", lambda: None)
    assert weights.resolve("gpt2") == tmp_path / "snap"
    assert calls == [("gpt2", True, None), ("gpt2", False, weights.PROBE_TIMEOUT)]


@pytest.mark.parametrize("how", ["closed port", "HF_HUB_OFFLINE"])
def test_offline_fails_within_seconds_with_our_line(hub, monkeypatch, how):
    """Offline, both loaders fail at once (no retry loop) with one line naming what was tried and what to do."""
    online = []
    real = huggingface_hub.snapshot_download

    def spy(repo, *args, local_files_only=False, **kw):
        online.append(repo) if not local_files_only else None
        return real(repo, *args, local_files_only=local_files_only, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (GPT2.from_pretrained, weights.load_reference):
        start = time.perf_counter()
        with pytest.raises(weights.WeightsUnavailable) as err:
            load("gpt2")
        assert time.perf_counter() - start < 10
        msg = str(err.value)
        assert "\n" not in msg and f"Hugging Face cache at {hub}: no 'gpt2'" in msg
        assert ("unreachable" if how == "closed port" else "not tried (HF_HUB_OFFLINE is set)") in msg
        assert "internet once" in msg and "GPT2LAB_WEIGHTS=/path/to/folder" in msg and "setup(weights=...)" in msg
    assert online == []  # the hub was never asked to download


def test_closed_port_probe_is_fast(hub):
    start = time.perf_counter()
    assert weights.hub_unreachable().startswith("unreachable (")
    assert time.perf_counter() - start < 1


def test_truncated_safetensors_names_the_file(tmp_path, hub, monkeypatch):
    hf_tiny(23).save_pretrained(tmp_path / "w")
    file = tmp_path / "w" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    for load in (GPT2.from_pretrained, weights.load_reference):
        with pytest.raises(weights.WeightsUnavailable, match=f"file {file} is damaged .*: delete it") as err:
            load(tmp_path / "w")
        assert "\n" not in str(err.value)
    # in the hub cache: the fix is to delete the cached repo so the next load downloads it afresh
    place_in_hub_cache(tmp_path / "w", hub, "gpt2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fix = f"is damaged .*: delete {hub / 'models--gpt2'} and load again"
    with pytest.raises(weights.WeightsUnavailable, match=fix):
        GPT2.from_pretrained("gpt2")


def test_empty_folder_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(weights.WeightsUnavailable, match="has no config.json and no model.safetensors"):
        GPT2.from_pretrained(tmp_path / "empty")
    with pytest.raises(weights.WeightsUnavailable, match="local folder .*nowhere: not there"):
        weights.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(weights.WeightsUnavailable, match="local folder /.*/nowhere: not there"):
        weights.resolve("./nowhere")  # shown as an absolute path: the working directory may surprise


def test_setting_from_environment_is_what_loads(tmp_path, monkeypatch):
    ref = hf_tiny(24)
    ref.save_pretrained(tmp_path / "mine")
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "mine"))
    assert weights.resolve() == tmp_path / "mine"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(weights.load_reference()(ids).logits, ref(ids).logits)
