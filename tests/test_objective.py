"""The one objective (selfreplay.objective.methods) on rows of different lengths with masks, as a
Hugging Face model's batches come: padding changes nothing it computes."""

import pytest
import torch

from selfreplay.model.transformer import ModelConfig, Transformer
from selfreplay.objective.methods import training_loss
from selfreplay.replay.samples import ReplaySamples

CONFIG = ModelConfig(D=16, L=1, H=8, T=12, V=40)


def models():
    model, reference = Transformer(CONFIG), Transformer(CONFIG)
    model.reset_parameters(torch.Generator().manual_seed(0))
    reference.reset_parameters(torch.Generator().manual_seed(1))
    return model.eval(), reference.eval().requires_grad_(False)


def direct_kl(model, reference, rows: list[torch.Tensor]) -> torch.Tensor:
    """KL(π0 ‖ πθ) per predicted token from the full logits, averaged over every real token of every row."""
    terms = []
    for row in rows:
        ref_logp = reference(row[None])[0, :-1].log_softmax(-1)
        logp = model(row[None])[0, :-1].log_softmax(-1)
        terms.append((ref_logp.exp() * (ref_logp - logp)).sum(-1))
    return torch.cat(terms).mean()


def test_masked_replay_of_another_length_gives_the_kl_of_its_real_tokens_alone():
    model, reference = models()
    g = torch.Generator().manual_seed(2)
    new = torch.randint(0, CONFIG.V, (2, 6), generator=g)  # shorter than the replay rows
    tokens = torch.randint(0, CONFIG.V, (3, 9), generator=g)
    lengths = [9, 5, 7]  # each sample stopped early but the first; the rest is padding
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        loss, ntp, reg = training_loss(model, reference, new, ReplaySamples(tokens, mask), "kl", 2.0)
        expected = direct_kl(model, reference, [row[:n] for row, n in zip(tokens, lengths)])
        # the new rows' loss is unchanged by the longer replay rows beside them
        alone = training_loss(model, reference, new, None, "none", 2.0)[1]
    assert torch.allclose(reg, expected, atol=1e-5)
    assert torch.allclose(ntp, alone, atol=1e-5)
    assert torch.allclose(loss, ntp + 2.0 * reg)


def test_new_mask_counts_only_the_marked_predictions():
    model, reference = models()
    new = torch.randint(0, CONFIG.V, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 5:] = True  # an assistant answer at positions 5-7: three predictions per row
    with torch.no_grad():
        ntp = training_loss(model, reference, new, None, "none", 0.0, new_mask=mask)[1]
        logp = model(new)[:, :-1].log_softmax(-1)
        picked = -logp.gather(-1, new[:, 1:, None])[..., 0]
    assert torch.allclose(ntp, picked[:, 4:].mean(), atol=1e-5)


def test_stored_top_k_answers_of_every_token_give_the_kl_and_gradient_of_running_pi0():
    """A replay batch that carries π0's top-K with K = V trains exactly as one where π0 runs;
    K < V gives the coarser (K+1)-bucket KL, never more than the full one."""
    from selfreplay.objective.losses import topk_targets
    from selfreplay.replay.samples import TopKTargets

    model, reference = models()
    g = torch.Generator().manual_seed(4)
    new = torch.randint(0, CONFIG.V, (2, 6), generator=g)
    tokens = torch.randint(0, CONFIG.V, (3, 9), generator=g)
    mask = torch.arange(9)[None] < torch.tensor([9, 5, 7])[:, None]
    with torch.no_grad():
        ref_hidden = reference.hidden(tokens)

    def step(k):
        stored = None
        if k is not None:
            logp, ids, rest = topk_targets(ref_hidden, reference.head.weight, k)  # every position, as a pool keeps them
            stored = TopKTargets(logp.view(3, 9, k), ids.view(3, 9, k), rest.view(3, 9))
        model.zero_grad()
        loss, _, reg = training_loss(model, reference, new, ReplaySamples(tokens, mask, topk=stored), "kl", 2.0)
        loss.backward()
        return reg.item(), [p.grad.clone() for p in model.parameters()]

    running, full, coarse = step(None), step(CONFIG.V), step(3)
    assert full[0] == pytest.approx(running[0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full[1], running[1]))
    assert 0 < coarse[0] < running[0]
