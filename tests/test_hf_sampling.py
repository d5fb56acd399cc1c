import warnings
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from selfreplay.data.chat import chat_turns, prompt_tokens  # noqa: E402
from selfreplay.model.hf import CausalLM, load_causal_lm  # noqa: E402
from selfreplay.replay.hf_sampling import base_format, chat_format, sample_replay  # noqa: E402


@pytest.fixture(scope="module")
def taught(taught_llama_dir):
    model, tokenizer = load_causal_lm(taught_llama_dir)
    return CausalLM(model.eval()), tokenizer


def _first(row: torch.Tensor, token: int, start: int = 0) -> int | None:
    hits = (row[start:] == token).nonzero()
    return start + hits[0].item() if len(hits) else None


def test_base_samples_start_at_bos_and_stop_at_eos_with_padding_masked(taught):
    lm, tok = taught
    samples = sample_replay(lm, base_format(tok), 16, 60, seed=0)
    assert samples.tokens.shape == samples.mask.shape == (16, 60)
    assert (samples.tokens[:, 0] == tok.bos_token_id).all()
    stopped = 0
    for row, mask in zip(samples.tokens, samples.mask):
        eos = _first(row, tok.eos_token_id, 1)
        real = 60 if eos is None else eos + 1  # the EOS itself is a real token
        assert mask[:real].all() and not mask[real:].any()
        assert (row[real:] == tok.pad_token_id).all()
        stopped += eos is not None
    assert 0 < stopped < 16  # some samples ended early, some ran to the length


def test_base_samples_without_stopping_run_past_eos(taught):
    lm, tok = taught
    samples = sample_replay(lm, base_format(tok, stop_at_eos=False), 16, 60, seed=0)
    assert samples.mask.all()
    assert any(_first(row, tok.eos_token_id, 1) not in (None, 59) for row in samples.tokens)


def test_chat_samples_write_a_user_turn_then_an_answer_inside_the_template(taught):
    lm, tok = taught
    turns = chat_turns(tok)
    assert chat_format(tok).turns == turns
    # a header the model would never write itself: it must be put in after every user turn
    form = chat_format(tok)
    form.turns = replace(turns, assistant_header=tok("HEADER here\n")["input_ids"])
    samples = sample_replay(lm, form, 16, 100, seed=0)
    prefix = torch.tensor(turns.user_prefix)
    header = torch.tensor(form.turns.assistant_header)
    answered = 0
    for row, mask in zip(samples.tokens, samples.mask):
        assert torch.equal(row[: len(prefix)], prefix)
        user_end = _first(row, turns.user_end, len(prefix))
        if user_end is None or user_end + 1 + len(header) > 100:
            continue
        assert torch.equal(row[user_end + 1: user_end + 1 + len(header)], header)
        answer_end = _first(row, turns.answer_end, user_end + 1 + len(header))
        if answer_end is not None:
            answered += 1
            assert mask[: answer_end + 1].all() and not mask[answer_end + 1:].any()
    assert answered > 0


def test_chat_samples_from_given_prompts_answer_them(taught):
    lm, tok = taught
    prompts = ["The cat.", "A big red dog walks under the old house today."]
    samples = sample_replay(lm, chat_format(tok, prompts=prompts), 4, 80, seed=0)
    for i, row in enumerate(samples.tokens):
        expected = torch.tensor(prompt_tokens(tok, prompts[i % 2]))
        assert torch.equal(row[: len(expected)], expected)
        assert samples.mask[i, : len(expected)].all()


def test_sampling_is_deterministic_given_the_seed(taught):
    lm, tok = taught
    form = chat_format(tok)
    first, again = (sample_replay(lm, form, 6, 40, seed=3, batch_size=4) for _ in range(2))
    other = sample_replay(lm, form, 6, 40, seed=4, batch_size=4)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.mask, again.mask)
    assert not torch.equal(first.tokens, other.tokens)


def test_kept_hidden_states_are_the_full_forward_pass_on_every_counted_position(taught):
    lm, tok = taught
    samples = sample_replay(lm, chat_format(tok), 6, 50, seed=1, keep_hidden=True)
    with torch.no_grad():
        full = lm.hidden(samples.tokens)
    counted = samples.mask[:, 1:]  # position t-1 predicts token t
    assert torch.allclose(samples.hidden[:, :-1][counted], full[:, :-1][counted], atol=1e-4)


def test_sampling_warns_of_no_deprecation(taught, tiny_gpt2_dir):
    """A whole decode (cache made, prompt, one step per token) as an error on any FutureWarning or
    DeprecationWarning: transformers 5.x warns at every step given a cache under its 4.x name."""
    gpt2, tok = load_causal_lm(tiny_gpt2_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for lm, form in ((taught[0], chat_format(taught[1])), (CausalLM(gpt2), base_format(tok))):
            samples = sample_replay(lm, form, 2, 12, seed=0, keep_hidden=True)
            assert samples.tokens.shape == (2, 12)


def test_replay_longer_than_the_context_is_one_line(tiny_gpt2_dir):
    from selfreplay.errors import SelfReplayError

    model, tok = load_causal_lm(tiny_gpt2_dir)
    with pytest.raises(SelfReplayError, match="context of 128"):
        sample_replay(CausalLM(model), base_format(tok), 2, 200)
