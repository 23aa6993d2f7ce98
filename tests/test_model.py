"""Our GPT-2 against transformers.GPT2LMHeadModel on tiny random configs: logits, padding, loss, gradients,
weight loading errors. Tolerance 1e-5 in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_gpt2 import hf_tiny, left_pad_positions, pair

from gpt2lab.model import GPT2, GPT2Config, KVCache, WeightLoadError, hf_key_map, lm_loss, position_ids_from_mask

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return pair(tmp_path_factory.mktemp("w"), seed=0)


def _batch(seed=1, B=3, T=17, V=50257):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def test_logits_match_transformers_unpadded(models):
    ref, ours = models
    ids = _batch()
    with torch.no_grad():
        got, expected = ours(ids), ref(ids).logits
    assert got.shape == (3, 17, 50257)
    assert (got - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("n_layer,n_embd,n_head,vocab", [(1, 32, 2, 100), (3, 48, 3, 50257), (2, 64, 8, 321)])
def test_logits_match_across_configs(tmp_path, n_layer, n_embd, n_head, vocab):
    ref, ours = pair(tmp_path, seed=n_layer, n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab)
    ids = _batch(seed=2, B=2, T=33, V=vocab)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < ATOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers_and_unpadded(models, side):
    ref, ours = models
    ids = _batch(seed=3, B=3, T=12)
    lengths = [12, 7, 3]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1 if side == "right" else 0
        if side == "left":
            mask[row, 12 - n :] = 1
    with torch.no_grad():
        got = ours(ids, mask)
        expected = ref(ids, attention_mask=mask, position_ids=left_pad_positions(mask)).logits
        real = mask.bool()
        assert (got[real] - expected[real]).abs().max().item() < ATOL
        assert torch.isfinite(got).all(), "padding positions must stay finite (no all-masked softmax rows)"
        for row, n in enumerate(lengths):  # each row alone, unpadded
            alone = ours(ids[row : row + 1][mask[row : row + 1].bool()].view(1, n))
            assert (got[row][real[row]] - alone[0]).abs().max().item() < ATOL


def test_right_padding_positions_are_plain(models):
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2]]


def test_loss_and_gradients_match(tmp_path):
    ref, ours = pair(tmp_path, seed=4)
    ids = _batch(seed=5, B=2, T=10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref_out = ref(ids, attention_mask=mask, labels=labels)
    loss = lm_loss(ours(ids, mask), ids, mask)
    assert abs(loss.item() - ref_out.loss.item()) < ATOL
    ref_out.loss.backward()
    loss.backward()
    ref_params = dict(ref.named_parameters())
    for src, (dst, transpose) in hf_key_map(ours.config.n_layer).items():
        g_ref = ref_params["transformer." + src].grad
        g_ref = g_ref.t() if transpose else g_ref
        g = ours.get_parameter(dst).grad
        assert (g - g_ref).abs().max().item() < 1e-5, src


def test_head_is_tied_and_parameter_count(models):
    ref, ours = models
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert ours.num_parameters() == ref.num_parameters()
    wte, wpe = ours.transformer.wte.weight.numel(), ours.transformer.wpe.weight.numel()
    assert ours.num_parameters(exclude_embeddings=True) == ours.num_parameters() - wte - wpe


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_name("gpt2"))
    assert model.num_parameters() == 124_439_808  # the released gpt2


def test_presets():
    sizes = {n: (c.n_layer, c.n_head, c.n_embd) for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
             for c in [GPT2Config.from_name(n)]}  # fmt: skip
    assert sizes == {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                     "gpt2-xl": (48, 25, 1600)}  # fmt: skip
    tiny = GPT2Config.tiny(n_layer=3)
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.vocab_size) == (3, 64, 4, 50257)
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPT2Config.from_name("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=65, n_head=4)


def test_return_hidden_and_head(models):
    _, ours = models
    ids = _batch(seed=6, B=2, T=5)
    with torch.no_grad():
        hidden = ours(ids, return_hidden=True)
        assert hidden.shape == (2, 5, 64)
        assert torch.equal(ours.head(hidden), ours(ids))


def test_written_out_attention_path_matches_fused(models):
    _, ours = models
    ids = _batch(seed=7, B=2, T=9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        maps = ours.attention_maps(ids, mask)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 9, 9)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, 9))
    assert maps[0][1].triu(1).abs().max() == 0, "no attention to future tokens"
    assert maps[0][0, :, 5:, :4].abs().max() == 0, "no attention to padding"


def test_cached_forward_matches_full(models):
    _, ours = models
    ids = _batch(seed=8, B=2, T=12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = ours(ids, mask)
        cache = KVCache.for_model(ours, batch_size=2, max_length=12)
        parts = [ours(ids[:, :5], mask[:, :5], cache=cache)]
        parts.append(ours(ids[:, 5:9], mask[:, :9], cache=cache))  # several new tokens at once
        for t in range(9, 12):
            parts.append(ours(ids[:, t : t + 1], mask[:, : t + 1], cache=cache))
    stitched = torch.cat(parts, dim=1)
    real = mask.bool()
    assert (stitched[real] - full[real]).abs().max().item() < ATOL
    assert cache.length == 12


def test_loading_original_layout_with_buffers(tmp_path):
    """The original release has no "transformer." prefix and stores causal-mask buffers; both must load."""
    from safetensors.torch import save_file

    ref = hf_tiny(9)
    state = {k.removeprefix("transformer."): v.clone() for k, v in ref.state_dict().items()}  # lm_head copy too
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    ours = GPT2.from_pretrained(tmp_path).eval()
    ids = _batch(seed=10, B=1, T=6)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < ATOL


def test_loading_pytorch_bin(tmp_path):
    ref = hf_tiny(11)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    ours = GPT2.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ids = _batch(seed=12, B=1, T=4)
        assert (ours(ids) - ref(ids).logits).abs().max().item() < ATOL


def test_one_clear_error_naming_bad_keys(tmp_path):
    ref = hf_tiny(13)
    state = dict(ref.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 100)
    state["transformer.h.0.extra.weight"] = torch.zeros(3)
    ours = GPT2(GPT2Config.tiny(n_positions=64))
    with pytest.raises(WeightLoadError) as err:
        ours.load_hf_state_dict(state)
    msg = str(err.value)
    assert "missing (1): h.1.mlp.c_fc.bias" in msg
    assert "unexpected (1): h.0.extra.weight" in msg
    assert "mis-shaped (1): h.0.attn.c_attn.weight: (100, 64) after transposing, expected (192, 64)" in msg


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="local folder .*deeper: not there"):
        GPT2.from_pretrained(tmp_path / "nope" / "deeper")
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 1, "n_embd": 32, "n_head": 2}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT2.from_pretrained(tmp_path)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Config.from_hf_dict({"scale_attn_by_inverse_layer_idx": True})


def test_shape_errors(models):
    _, ours = models
    with pytest.raises(ValueError, match="batch, seq"):
        ours(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))


def test_dropout_only_in_training(tmp_path):
    model = GPT2(GPT2Config.tiny(dropout=0.5))
    ids = _batch(seed=14, B=1, T=6)
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_hub_names_go_through_snapshot_download(tmp_path, monkeypatch):
    """No network in tests: the hub call is replaced; the name is used as given, cache first, then one download."""
    import huggingface_hub

    from gpt2lab import weights

    ref = hf_tiny(15)
    ref.save_pretrained(tmp_path / "snap")
    asked = []

    def fake_download(repo, allow_patterns=None, local_files_only=False, **kw):
        asked.append((repo, local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(weights, "hub_unreachable", lambda: None)  # the probe would touch the network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ours = GPT2.from_pretrained("gpt2", dropout=0.0).eval()
    assert asked == [("gpt2", True), ("gpt2", False)] and ours.config.n_layer == 2 and ours.config.dropout == 0.0

    def offline(repo, allow_patterns=None, **kw):
        raise OSError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(weights.WeightsUnavailable, match="OSError: hub unreachable.*GPT2LAB_WEIGHTS"):
        GPT2.from_pretrained("gpt2-medium")


def test_tied_weight_gradient_paths_agree(tmp_path):
    """The fast tied-weight path (row-sparse embedding gradient added into the head's) equals plain autograd."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config.tiny(vocab_size=97, n_positions=16))
    ids = torch.randint(0, 97, (2, 9))
    lm_loss(model(ids), ids).backward()  # fast path
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not model.transformer.wte.weight.grad.is_sparse
    model.zero_grad()
    hidden = model(ids, return_hidden=True)  # plain nn.Embedding + the head applied by hand
    lm_loss(hidden @ model.transformer.wte.weight.T, ids).backward()
    for n, p in model.named_parameters():
        assert (p.grad - fast[n]).abs().max() < 1e-6, n
    lm_loss(model(ids), ids).backward()  # accumulation on top of an existing .grad
    assert (model.transformer.wte.weight.grad - 2 * fast["transformer.wte.weight"]).abs().max() < 1e-6
    model.zero_grad(set_to_none=True)
    model.transformer.wte.weight.requires_grad_(False)  # frozen embeddings (e.g. LoRA)
    lm_loss(model(ids), ids).backward()
    assert model.transformer.wte.weight.grad is None and model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_inputs_embeds_equal_input_ids(models):
    _, ours = models
    ids = _batch(seed=16, B=2, T=7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        embeds = ours.transformer.wte(ids)
        assert torch.equal(ours(None, mask, inputs_embeds=embeds), ours(ids, mask))
    with pytest.raises(ValueError, match="inputs_embeds"):
        ours(None, inputs_embeds=torch.zeros(1, 3, 5))


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = GPT2(GPT2Config.tiny(vocab_size=97, n_positions=16))
    ids = torch.randint(0, 97, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        loss = lm_loss(logits, ids)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


def test_lm_loss_ignores_padding_on_either_side():
    """Left padding must not add a 'pad predicts the first real token' term: same loss as right padding."""
    from gpt2lab.model import GPT2, GPT2Config, lm_loss

    torch.manual_seed(0)
    model = GPT2(GPT2Config.tiny(vocab_size=97)).eval()
    seqs = [[5, 9, 2, 44, 7], [3, 8, 1]]
    losses = {}
    for side in ("right", "left"):
        ids = torch.zeros(2, 5, dtype=torch.long)
        mask = torch.zeros(2, 5, dtype=torch.long)
        for row, seq in enumerate(seqs):
            span = slice(0, len(seq)) if side == "right" else slice(5 - len(seq), 5)
            ids[row, span], mask[row, span] = torch.tensor(seq), 1
        losses[side] = lm_loss(model(ids, mask), ids, mask)
    # by hand: every real (t, t+1) pair of each sequence run alone
    terms = []
    for seq in seqs:
        ids = torch.tensor([seq])
        logp = model(ids).log_softmax(-1)[0]
        terms += [-logp[t, seq[t + 1]] for t in range(len(seq) - 1)]
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(losses["right"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(losses["left"], expected, rtol=0, atol=1e-5)


def _one_line_error(fn) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_token_ids_outside_the_vocabulary_give_one_line(models):
    """A tokenizer with a bigger vocabulary (or -100 labels fed as inputs) used to end in 'index out of range in
    self'. Checked with and without a mask, and on a cached generation step."""
    _, ours = models
    ids = _batch(seed=17, B=2, T=6)
    ids[1, 3] = 50257
    msg = _one_line_error(lambda: ours(ids))
    assert msg.startswith("input_ids[1, 3] is 50257, outside [0, 50257) (vocab_size 50257 of this model")
    assert "tokenizer with a different vocabulary" in msg
    ids[1, 3], ids[0, 5] = 7, -100
    msg = _one_line_error(lambda: ours(ids, torch.ones_like(ids)))
    assert msg.startswith("input_ids[0, 5] is -100, outside [0, 50257)") and "-100" in msg.split(":")[-1]
    cache = KVCache.for_model(ours, batch_size=1, max_length=8)
    with torch.no_grad():
        ours(ids[:1, :4], cache=cache)
    msg = _one_line_error(lambda: ours(torch.tensor([[60000]]), torch.ones(1, 5), cache=cache))
    assert msg.startswith("input_ids[0, 0] is 60000")


def test_mask_values_other_than_0_and_1_give_one_line(models):
    _, ours = models
    ids = _batch(seed=18, B=2, T=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 2, 1]])  # a 2 would silently shift the positions
    msg = _one_line_error(lambda: ours(ids, mask))
    assert msg.startswith("attention_mask[1, 3] is 2: the mask must hold only 1 (real token) and 0 (padding)")
    half = torch.ones(2, 5)
    half[0, 0] = 0.5
    assert "attention_mask[0, 0] is 0.5" in _one_line_error(lambda: ours(ids, half))
    with torch.no_grad():  # float 0./1. and boolean masks are fine and agree with the integer mask
        good = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        expected = ours(ids, good)
        assert torch.equal(ours(ids, good.float()), expected)
        assert torch.equal(ours(ids, good.bool()), expected)


def test_bad_positions_and_dtypes_give_one_line(models):
    _, ours = models
    ids = _batch(seed=19, B=1, T=3)
    msg = _one_line_error(lambda: ours(ids, position_ids=torch.tensor([[0, 1, 64]])))
    assert msg.startswith("position_ids[0, 2] is 64, outside [0, 64) (n_positions 64 of this model")
    assert "torch.float32" in _one_line_error(lambda: ours(ids.float()))
