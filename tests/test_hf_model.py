import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.model.hf import (CausalLM, frozen_reference, load_causal_lm, num_parameters,  # noqa: E402
                                 with_adapters)


@pytest.fixture(params=["llama", "gpt2"])
def model_dir(request, tiny_llama_dir, tiny_gpt2_dir):
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]


def test_hidden_states_through_the_head_are_the_models_logits(model_dir):
    model, _ = load_causal_lm(model_dir)
    lm = CausalLM(model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        logits = model(tokens).logits
        hidden = lm.hidden(tokens)
    assert hidden.shape == (2, 11, model.config.hidden_size)
    assert torch.allclose(hidden @ lm.head.weight.T, logits, atol=1e-5)


def test_gpt2_head_is_the_tied_input_embedding(tiny_gpt2_dir):
    model, _ = load_causal_lm(tiny_gpt2_dir)
    assert CausalLM(model).head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_hidden_states_through_a_kv_cache_equal_the_full_pass(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir)
    lm = CausalLM(model)
    tokens = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        full = lm.hidden(tokens)
        cache = lm.new_cache(9)
        steps = [lm.hidden(tokens[:, :4], cache)] + [lm.hidden(tokens[:, t:t + 1], cache) for t in range(4, 9)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def deprecations(run) -> list[str]:
    """The FutureWarning and DeprecationWarning messages raised while run() runs, each time one is raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning))]


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_a_forward_and_a_decoding_step_through_a_kv_cache_warn_of_no_deprecation(model_dir, adapters):
    """The cache goes in under the name the installed transformers takes (`cache` on 5.x, whose
    `past_key_values` warns on every call; `past_key_values` on 4.x), for the model and for π0."""
    from peft import LoraConfig

    model, _ = load_causal_lm(model_dir)
    if adapters:
        model = with_adapters(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    lm = CausalLM(model)
    tokens = torch.randint(0, lm.config.vocab_size, (2, 6))

    def prompt_then_one_step():
        for each in (lm, frozen_reference(lm)):
            cache = each.new_cache(6)
            with torch.no_grad():
                each.hidden(tokens[:, :5], cache)
                each.hidden(tokens[:, 5:], cache)
            each.hidden(tokens)  # a training forward, no cache

    assert deprecations(prompt_then_one_step) == []


def test_models_with_transformed_logits_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    with pytest.raises(SelfReplayError, match="final_logit_softcapping"):
        CausalLM(Gemma2ForCausalLM(config))


def test_an_unknown_model_path_or_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (str(tmp_path / "missing"), "no-such-user/no-such-model-xyz"):
        with pytest.raises(SelfReplayError) as error:
            load_causal_lm(name)
        assert "\n" not in str(error.value) and name in str(error.value)


def test_lora_reference_is_the_same_network_with_adapters_disabled(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    base, _ = load_causal_lm(tiny_llama_dir)
    plain, _ = load_causal_lm(tiny_llama_dir)  # an untouched copy: what π0 must compute
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as after training: the adapted model differs from π0
    lm = CausalLM(peft_model)
    reference = frozen_reference(lm)
    assert num_parameters(lm, reference) == num_parameters(lm)  # no second copy of the network
    tokens = torch.randint(0, base.config.vocab_size, (2, 8))
    with torch.no_grad():
        expected = CausalLM(plain).hidden(tokens)
        adapted = lm.hidden(tokens)
    assert torch.allclose(reference.hidden(tokens), expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.equal(reference.head.weight, plain.lm_head.weight)


def test_full_finetuning_reference_is_a_frozen_copy(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir)
    lm = CausalLM(model)
    reference = frozen_reference(lm, dtype=torch.bfloat16)
    assert num_parameters(lm, reference) == 2 * num_parameters(lm)
    assert next(reference.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in reference.parameters())
    tokens = torch.randint(0, model.config.vocab_size, (2, 8))
    before = reference.hidden(tokens).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert torch.equal(reference.hidden(tokens).float(), before)
