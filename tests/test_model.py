import pytest
import torch

from selfreplay.errors import SelfReplayError
from selfreplay.model.transformer import KVCache, ModelConfig, Transformer

TINY = ModelConfig(D=32, L=2, H=8, T=24, V=64)


def make_model(seed=0, config=TINY):
    model = Transformer(config)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def test_parameter_counts_follow_the_reference():
    config = ModelConfig(D=128, L=4, H=32, T=128, V=4096)
    model = Transformer(config)
    assert config.non_embedding_params == 12 * 4 * 128**2
    assert model.num_params(embeddings=False) == config.non_embedding_params
    assert model.num_params() == config.params == 12 * 4 * 128**2 + 2 * 4096 * 128


def test_reference_init_scales():
    config = ModelConfig(D=256, L=2, H=64, T=16, V=512)
    model = Transformer(config)
    assert model.blocks[0].up.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert model.blocks[0].down.weight.std().item() == pytest.approx(1024**-0.5, rel=0.05)
    assert model.head.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_model_is_causal():
    model = make_model()
    x = torch.randint(0, TINY.V, (2, TINY.T))
    y = x.clone()
    y[:, 10:] = torch.randint(0, TINY.V, (2, TINY.T - 10))
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-6)


def test_kv_cache_matches_full_forward_at_every_position():
    model = make_model()
    x = torch.randint(0, TINY.V, (3, TINY.T))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(TINY, batch_size=3)
        steps = torch.cat([model(x[:, i:i + 1], cache=cache, start=i) for i in range(TINY.T)], dim=1)
        # a prefill of several tokens, then single steps, must agree too
        cache = KVCache(TINY, batch_size=3)
        chunks = torch.cat([model(x[:, :7], cache=cache, start=0), model(x[:, 7:15], cache=cache, start=7),
                            *[model(x[:, i:i + 1], cache=cache, start=i) for i in range(15, TINY.T)]], dim=1)
    assert (steps - full).abs().max().item() <= 1e-4
    assert (chunks - full).abs().max().item() <= 1e-4


def test_single_token_decoding_step_matches_full_forward_at_every_position():
    # Transformer.decode, the sampler's step (queries and keys rotated by one matrix product),
    # gives the full forward pass's hidden states, in float32 and in bf16 (to bf16 rounding)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        model = make_model(seed=2).to(dtype)
        x = torch.randint(0, TINY.V, (3, TINY.T))
        with torch.no_grad():
            full = model.hidden(x)
            cache = KVCache(TINY, batch_size=3, dtype=KVCache.storage_dtype(dtype, "cpu"))
            steps = torch.stack([model.decode(x[:, i], cache, i) for i in range(TINY.T)], dim=1)
        assert steps.dtype == dtype
        assert (steps.float() - full.float()).abs().max().item() <= tolerance
    with pytest.raises(ValueError, match="beyond the model's context"):
        model.decode(x[:, 0], cache, TINY.T)


def test_decoding_step_of_a_model_with_lora_adapters_matches_its_full_forward():
    # the step adds residuals inside plain linear layers' products; adapters must still count
    from selfreplay.model.lora import add_lora

    model = make_model(seed=3)
    add_lora(model, rank=4)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "B") and isinstance(module.B, torch.nn.Parameter):
                module.B.normal_(0.0, 0.1)  # non-zero adapters (they start at zero)
        x = torch.randint(0, TINY.V, (3, TINY.T))
        full = model.hidden(x)
        cache = KVCache(TINY, batch_size=3)
        steps = torch.stack([model.decode(x[:, i], cache, i) for i in range(TINY.T)], dim=1)
    assert (steps - full).abs().max().item() <= 1e-5


def test_bf16_model_decodes_through_a_float32_cache_on_cpu_and_matches_its_full_forward():
    # the sampler keeps a bf16 model's keys and values in float32 on CPU (KVCache.storage_dtype)
    assert KVCache.storage_dtype(torch.bfloat16, "cpu") == torch.float32
    assert KVCache.storage_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    model = make_model(seed=1).to(torch.bfloat16)
    x = torch.randint(0, TINY.V, (3, TINY.T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(TINY, batch_size=3, dtype=KVCache.storage_dtype(torch.bfloat16, "cpu"))
        steps = torch.cat([model(x[:, :5], cache=cache, start=0),
                           *[model(x[:, i:i + 1], cache=cache, start=i) for i in range(5, TINY.T)]], dim=1)
    assert steps.dtype == torch.bfloat16 and cache.k.dtype == torch.float32
    # full-sequence attention runs in float32 on CPU too, so the two paths agree to bf16 rounding:
    # a logit of magnitude 2-4 is rounded to a multiple of 2^-6, so allow ~2 units of that
    torch.testing.assert_close(steps.float(), full.float(), atol=1e-2, rtol=1e-2)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = make_model(seed=3)
    model.save_pretrained(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"weights.safetensors", "config.yaml"}
    loaded = Transformer.from_pretrained(tmp_path / "run").eval()
    assert loaded.config == model.config
    x = torch.randint(0, TINY.V, (2, TINY.T))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_loading_a_directory_without_weights_is_a_clear_error(tmp_path):
    make_model().save_pretrained(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(SelfReplayError, match="no weights.safetensors"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(SelfReplayError, match="no config.yaml"):
        Transformer.from_pretrained(tmp_path / "missing")


def test_bad_shapes_are_rejected():
    with pytest.raises(SelfReplayError, match="multiple of the head dimension"):
        ModelConfig(D=100, H=64)


def test_attention_under_bf16_autocast_keeps_float32_and_matches_the_float32_model():
    from selfreplay.model.transformer import causal_attention

    q, k, v = (torch.randn(2, 4, 16, 8).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_attention(q, k, v)
    direct = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), direct, atol=1e-2)
    model = make_model()
    x = torch.randint(0, TINY.V, (2, TINY.T))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x).float()
    with torch.no_grad():
        full = model(x)
    assert (mixed - full).abs().max().item() < 0.1 and torch.equal(model.head(model.hidden(x)), full)
