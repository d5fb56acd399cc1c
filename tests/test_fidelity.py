import json

import pytest
import torch
import torch.nn.functional as F

from selfreplay.config import ModelConfig
from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.fidelity import (
    ReplayFidelity,
    distinct_ngrams,
    replay_fidelity,
    sample_nll,
)
from selfreplay.model.transformer import Transformer

V, EOS, BOS = 200, 9, 0


def healthy_pool(n=32, t=48, stop_at_eos=True, seed=0):
    """BOS, then random tokens of a 200-word vocabulary, each sample ending at EOS between 60 % and
    100 % of its room, padded after (mask False)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, V, (n, t), generator=g)
    tokens[:, 0] = BOS
    mask = torch.ones(n, t, dtype=torch.bool)
    for i, end in enumerate(torch.randint(int(0.6 * t), t, (n,), generator=g).tolist()):
        tokens[i, end] = EOS
        if stop_at_eos:
            tokens[i, end + 1:], mask[i, end + 1:] = 0, False
    return tokens, mask


def test_a_healthy_pool_gives_no_warning():
    tokens, mask = healthy_pool()
    fidelity = replay_fidelity(tokens, mask, EOS, nll_samples=4.1, nll_old=4.0)
    assert fidelity.warnings() == []
    assert fidelity.eos_rate == 1.0 and fidelity.distinct_3 > 0.9 and fidelity.short_rate == 0.0
    assert replay_fidelity(*healthy_pool(stop_at_eos=False), EOS).warnings() == []


def test_a_repetition_loop_warns_about_repetition():
    tokens = torch.tensor([17, 42, 99] * 16).repeat(32, 1)  # [32, 48], every sample the same 3-token cycle
    fidelity = replay_fidelity(tokens, None, EOS)
    assert fidelity.distinct_3 == pytest.approx(3 / (32 * 45))
    warnings = fidelity.warnings()
    assert len(warnings) == 1 and "repeat" in warnings[0]


def test_samples_that_stop_at_position_2_warn_about_collapsed_length():
    tokens, mask = healthy_pool()
    tokens[:, 2], tokens[:, 3:], mask[:, 3:] = EOS, 0, False  # BOS, one word, EOS
    warnings = replay_fidelity(tokens, mask, EOS).warnings()
    assert any("collapsed" in w for w in warnings) and any("stop within" in w for w in warnings)
    tokens, mask = healthy_pool(stop_at_eos=False)  # no mask: the sample goes on past its early EOS
    tokens[:, 2] = EOS
    warnings = replay_fidelity(tokens, None, EOS).warnings()
    assert len(warnings) == 1 and "stop within" in warnings[0]


def test_a_start_token_that_is_eos_does_not_count_as_a_stop():
    tokens, mask = healthy_pool()
    tokens[:, 0] = EOS  # GPT-2 starts samples at EOS
    assert replay_fidelity(tokens, mask, EOS).warnings() == []
    assert replay_fidelity(tokens, mask, EOS, prompt_length=0).short_rate == 1.0


def test_distinct_ngrams_on_a_hand_example():
    tokens = torch.tensor([[1, 2, 1, 2, 3],
                           [1, 2, 3, 4, 4]])
    real = torch.ones_like(tokens, dtype=torch.bool)
    # bigrams: 12 21 12 23 | 12 23 34 44 -> {12, 21, 23, 34, 44}: 5 of 8
    assert distinct_ngrams(tokens, real, 2) == 5 / 8
    # trigrams: 121 212 123 | 123 234 344 -> {121, 212, 123, 234, 344}: 5 of 6
    assert distinct_ngrams(tokens, real, 3) == 5 / 6
    assert distinct_ngrams(tokens, real, 6) is None


def test_the_mask_is_respected():
    tokens = torch.tensor([[1, 2, 3, 7, 7, 7, 7],
                           [4, 5, 6, 7, 7, 7, 7]])
    mask = torch.tensor([[True] * 3 + [False] * 4] * 2)
    assert distinct_ngrams(tokens, mask, 2) == 1.0  # 12 23 45 56: the padding's 77s never count
    fidelity = replay_fidelity(tokens, mask, eos_id=7, prompt_length=0)
    assert fidelity.mean_length == 3.0 and fidelity.eos_rate == 0.0 and fidelity.distinct_3 == 1.0
    mask[1, 3] = True  # the second sample's EOS is real
    assert replay_fidelity(tokens, mask, eos_id=7, prompt_length=0).eos_rate == 0.5


def test_nll_far_from_the_old_domain_warns():
    tokens, mask = healthy_pool()
    high = replay_fidelity(tokens, mask, EOS, nll_samples=7.0, nll_old=4.0).warnings()
    low = replay_fidelity(tokens, mask, EOS, nll_samples=1.0, nll_old=4.0).warnings()
    assert len(high) == 1 and "far from the old domain" in high[0]
    assert len(low) == 1 and "predictable" in low[0]


def test_as_dict_is_json_ready():
    tokens, mask = healthy_pool()
    row = json.loads(json.dumps(replay_fidelity(tokens, mask, None).as_dict()))
    assert row["eos_rate"] is None and row["nll_old"] is None and row["warnings"] == []
    assert set(row) == {*ReplayFidelity.__dataclass_fields__, "warnings"}


def test_bad_input_is_refused_in_one_line():
    tokens, mask = healthy_pool()
    for args, kwargs in (((tokens[0],), {}), ((tokens.float(),), {}), ((tokens, mask[:, 1:]), {}),
                         ((tokens,), {"prompt_length": 48}), ((tokens,), {"nll_old": float("nan")})):
        with pytest.raises(SelfReplayError) as error:
            replay_fidelity(*args, **kwargs)
        assert "\n" not in str(error.value)


def test_sample_nll_agrees_with_a_direct_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(D=16, L=1, H=8, T=12, V=V))
    tokens, mask = healthy_pool(n=5, t=12)
    logits = model(tokens).float()
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
    counted = mask[:, 1:].reshape(-1)
    expected = losses[counted].mean().item()
    assert sample_nll(model, tokens, mask, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert sample_nll(model, tokens, None, batch_size=3) == pytest.approx(losses.mean().item(), rel=1e-5)


def test_an_eos_that_ends_no_sample_is_counted_but_stops_nothing():
    # the built-in model's samples are windows of a stream whose documents EOS joins
    tokens, _ = healthy_pool(stop_at_eos=False)
    tokens[:, 2] = EOS
    fidelity = replay_fidelity(tokens, None, EOS, eos_stops=False)
    assert fidelity.eos_rate == 1.0 and fidelity.short_rate == 0.0 and fidelity.warnings() == []
    assert replay_fidelity(tokens, None, EOS).short_rate == 1.0  # where EOS stops a sample, they all stopped at once
