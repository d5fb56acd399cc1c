import torch

from selfreplay.model import ModelConfig, Transformer
from selfreplay.sampling import next_token, sample

TINY = ModelConfig(D=32, L=2, H=8, T=20, V=50)


def model():
    m = Transformer(TINY)
    m.reset_parameters(torch.Generator().manual_seed(0))
    return m.eval()


def test_samples_start_with_the_first_token_and_have_fixed_length():
    out = sample(model(), 3, num_samples=5, seed=0)
    assert out.shape == (5, TINY.T)
    assert (out[:, 0] == 3).all()
    assert out.dtype == torch.long and out.min() >= 0 and out.max() < TINY.V


def test_same_seed_same_samples_different_seed_different():
    m = model()
    a, b, c = sample(m, 1, 6, seed=7), sample(m, 1, 6, seed=7), sample(m, 1, 6, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batching_does_not_change_what_one_generator_draws_in_order():
    m = model()
    whole = sample(m, 1, 8, seed=5, batch_size=8)
    again = sample(m, 1, 8, seed=5, batch_size=8)
    assert torch.equal(whole, again)
    split = sample(m, 1, 8, seed=5, batch_size=3)
    assert split.shape == whole.shape and (split[:, 0] == 1).all()


def test_sampler_draws_from_the_model_distribution():
    # The first sampled token's empirical frequencies match softmax(logits) of the full forward pass.
    m = model()
    n = 4000
    out = sample(m, 2, n, length=2, seed=0, batch_size=4000)
    with torch.no_grad():
        probs = m(torch.tensor([[2]]))[0, -1].softmax(-1)
    freq = torch.bincount(out[:, 1], minlength=TINY.V).float() / n
    assert (freq - probs).abs().max().item() < 0.03


def test_top_k_and_top_p_truncate_and_temperature_zero_is_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_token(logits, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) <= {0, 1}
    draws = torch.stack([next_token(logits, top_p=0.5, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0}
    assert next_token(logits, temperature=0).item() == 0


def test_hidden_states_kept_while_decoding_equal_the_full_forward_pass():
    m = model()
    for length in (TINY.T, 7, 1):
        tokens, hidden = sample(m, 4, 5, length=length, seed=3, batch_size=2, return_hidden=True)
        assert torch.equal(tokens, sample(m, 4, 5, length=length, seed=3, batch_size=2))
        with torch.no_grad():
            assert hidden.shape == (5, length, TINY.D)
            assert torch.allclose(hidden, m.hidden(tokens), atol=1e-5)
