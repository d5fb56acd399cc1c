import pytest
import torch

from selfreplay.model.transformer import ModelConfig, Transformer
from selfreplay.replay.sampling import next_token, sample

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


def test_compiled_decoding_keeps_the_full_forward_hidden_states_and_the_eager_samples():
    # one compiled step serves every position and a smaller last batch (5 = 2 + 2 + 1)
    m = model()
    tokens, hidden = sample(m, 4, 5, seed=3, batch_size=2, return_hidden=True, compile=True)
    with torch.no_grad():
        assert torch.allclose(hidden, m.hidden(tokens), atol=1e-5)
    # fused arithmetic rounds differently, so a rare draw may differ from eager decoding's
    eager = sample(m, 4, 64, seed=3, batch_size=32)
    compiled = sample(m, 4, 64, seed=3, batch_size=32, compile=True)
    assert (compiled == eager).all(1).float().mean() >= 0.9


def full_forward_sampler(m: Transformer, first: int, n: int, length: int, generator: torch.Generator,
                         temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The plain reference: the whole prefix through the full forward pass at every step, then
    torch.multinomial on the softmax (of the logits over temperature, the top_k largest kept)."""
    tokens = torch.full((n, 1), first, dtype=torch.long)
    with torch.no_grad():
        for _ in range(length - 1):
            logits = m(tokens)[:, -1] / temperature
            if top_k is not None:
                logits[logits < logits.topk(top_k, dim=-1).values[:, -1:]] = float("-inf")
            probs = logits.softmax(-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens


def two_sample_chi_square(a: torch.Tensor, b: torch.Tensor, V: int) -> tuple[float, int]:
    """Chi-square statistic that two samples of token ids come from one distribution, over the
    tokens seen at least 20 times in both together, and its degrees of freedom."""
    ca, cb = torch.bincount(a, minlength=V).double(), torch.bincount(b, minlength=V).double()
    keep = (ca + cb) >= 20
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    stat = (((ca * (nb / na).sqrt() - cb * (na / nb).sqrt()) ** 2) / (ca + cb)).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_token_frequencies_of_a_large_draw_match_the_full_forward_sampler(compile):
    # A vocabulary of 300 spans several blocks of the two-level inverse CDF (and a padded one);
    # a peaked model makes the test sensitive where most of the mass is.
    config = ModelConfig(D=32, L=2, H=8, T=20, V=300)
    m = Transformer(config)
    m.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.head.weight.mul_(3.0)
    m.eval()
    n, length = 20000, 5
    ours = sample(m, 7, n, length=length, seed=0, batch_size=5000, compile=compile)
    reference = full_forward_sampler(m, 7, n, length, torch.Generator().manual_seed(1))
    for pos in range(1, length):  # each position's marginal, which depends on every earlier draw
        stat, dof = two_sample_chi_square(ours[:, pos], reference[:, pos], config.V)
        assert dof > 20
        assert stat < dof + 6 * (2 * dof) ** 0.5, (pos, stat, dof)  # about 6 standard deviations
    # and a biased draw fails it: the reference shifted by one token id
    stat, dof = two_sample_chi_square(ours[:, 1], (reference[:, 1] + 1) % config.V, config.V)
    assert stat > dof + 6 * (2 * dof) ** 0.5


def test_tempered_top_k_draws_match_the_full_forward_sampler():
    # next_token's general path (temperature and top-k), which replay's temperature-1 draws skip
    config = ModelConfig(D=32, L=2, H=8, T=20, V=300)
    m = Transformer(config)
    m.reset_parameters(torch.Generator().manual_seed(2))
    m.eval()
    n, length, temperature, top_k = 12000, 4, 0.5, 30
    ours = sample(m, 5, n, length=length, temperature=temperature, top_k=top_k, seed=0, batch_size=4000)
    reference = full_forward_sampler(m, 5, n, length, torch.Generator().manual_seed(1), temperature, top_k)
    for pos in range(1, length):
        stat, dof = two_sample_chi_square(ours[:, pos], reference[:, pos], config.V)
        assert dof > 10
        assert stat < dof + 6 * (2 * dof) ** 0.5, (pos, stat, dof)
    stat, dof = two_sample_chi_square(ours[:, 1], (reference[:, 1] + 1) % config.V, config.V)
    assert stat > dof + 6 * (2 * dof) ** 0.5
