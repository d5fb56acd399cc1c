import math

import pytest
import torch

import selfreplay.objective.losses as losses
from selfreplay.errors import SelfReplayError
from selfreplay.objective.losses import (REST_FLOOR, head_kl_divergence, head_kl_from_topk, head_next_token_loss,
                                         kl_divergence, next_token_loss, token_kl, token_losses, topk_targets)


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert kl_divergence(logits, logits).item() == 0.0
    assert kl_divergence(logits, torch.randn(2, 5, 11)).item() > 0


def test_kl_equals_a_direct_per_token_sum_over_the_vocabulary():
    torch.manual_seed(0)
    ref, cur = torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    direct = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        for t in range(4):
            p = torch.softmax(ref[b, t], -1)
            q = torch.softmax(cur[b, t], -1)
            direct[b, t] = sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(9))
    assert torch.allclose(token_kl(ref, cur).double(), direct, atol=1e-5)
    assert abs(kl_divergence(ref, cur).item() - direct.mean().item()) < 1e-5


def test_kl_and_losses_are_float32_from_bfloat16_logits():
    ref, cur = torch.randn(2, 4, 8).bfloat16(), torch.randn(2, 4, 8).bfloat16()
    tokens = torch.randint(0, 8, (2, 4))
    assert kl_divergence(ref, cur).dtype == torch.float32
    assert next_token_loss(cur, tokens).dtype == torch.float32
    assert token_kl(ref, cur).dtype == torch.float32


def test_next_token_loss_predicts_the_following_token():
    tokens = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 30.0  # position t puts all mass on token t+1
    assert next_token_loss(logits, tokens).item() < 1e-6
    assert token_losses(logits, tokens).shape == (1, 2)


def test_kl_gradient_reaches_only_the_finetuned_logits():
    ref = torch.randn(2, 3, 5, requires_grad=True)
    cur = torch.randn(2, 3, 5, requires_grad=True)
    kl_divergence(ref, cur).backward()
    assert ref.grad is None and cur.grad is not None and cur.grad.abs().sum() > 0


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(losses, "HEAD_CHUNK_ROWS", 7)  # several blocks, the last one partial


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_head_losses_equal_the_losses_of_the_full_logits_with_the_same_gradients(small_chunks):
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 6, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_head = torch.randn(3, 10, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 10))
    pairs = [(head_next_token_loss(hidden, head, tokens), next_token_loss(hidden @ head.T, tokens)),
             (head_kl_divergence(ref_hidden, ref_head, hidden, head),
              kl_divergence(ref_hidden @ ref_head.T, hidden @ head.T))]
    for fused, direct in pairs:
        assert fused.dtype == torch.float32
        assert fused.item() == pytest.approx(direct.item(), rel=1e-6)
        for a, b in zip(_grads(fused, hidden, head), _grads(direct, hidden, head)):
            assert torch.allclose(a, b, atol=1e-6)


def test_head_loss_gradients_scale_with_the_gradient_from_above_and_a_second_backward_is_refused(small_chunks):
    torch.manual_seed(5)  # the gradients are scaled in place in backward: the scale must still land once
    ref_hidden, ref_head = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    tokens = torch.randint(0, 13, (2, 9))
    fused_and_direct = [(lambda h, w: head_next_token_loss(h, w, tokens), lambda h, w: next_token_loss(h @ w.T, tokens)),
                        (lambda h, w: head_kl_divergence(ref_hidden, ref_head, h, w),
                         lambda h, w: kl_divergence(ref_hidden @ ref_head.T, h @ w.T))]
    for fused, direct in fused_and_direct:
        grads = []
        for loss in (fused, direct):
            hidden = torch.randn(2, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
            head = torch.randn(13, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
            (3.0 * loss(hidden, head) + 0.5 * (hidden ** 2).sum()).backward()
            grads.append((hidden.grad, head.grad))
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-6)
    hidden = torch.randn(2, 9, 5, requires_grad=True)
    head = torch.randn(13, 5, requires_grad=True)
    loss = head_kl_divergence(ref_hidden.float(), ref_head.float(), hidden, head)
    loss.backward(retain_graph=True)
    with pytest.raises(SelfReplayError, match="back-propagated twice"):
        loss.backward()


def test_blocks_shrink_with_the_vocabulary_and_give_the_same_losses(monkeypatch):
    assert losses.head_block_rows(4096) == losses.HEAD_CHUNK_ROWS == 512  # small vocabularies: unchanged
    assert losses.head_block_rows(32768) == 512
    assert losses.head_block_rows(131072) == 128  # 64 MiB of float32 logits a block
    assert losses.head_block_rows(10**9) == losses.HEAD_MIN_ROWS
    torch.manual_seed(4)
    hidden = torch.randn(3, 12, 6, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_head = torch.randn(3, 12, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 12))
    whole = [head_next_token_loss(hidden, head, tokens), head_kl_divergence(ref_hidden, ref_head, hidden, head)]
    monkeypatch.setattr(losses, "HEAD_BLOCK_BYTES", 4 * 11 * 5)  # 5 rows of logits a block, raised to the floor
    monkeypatch.setattr(losses, "HEAD_MIN_ROWS", 10)  # 10-row blocks: 36 rows in four, the last one partial
    assert losses.head_block_rows(11) == 10
    blocked = [head_next_token_loss(hidden, head, tokens), head_kl_divergence(ref_hidden, ref_head, hidden, head)]
    for b, w in zip(blocked, whole):
        assert b.item() == pytest.approx(w.item(), rel=1e-6)
        for x, y in zip(_grads(b, hidden, head), _grads(w, hidden, head)):
            assert torch.allclose(x, y, atol=1e-6)


def test_head_kl_is_zero_at_the_reference_and_its_gradient_reaches_only_the_finetuned_side(small_chunks):
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    head = torch.randn(9, 4, requires_grad=True)
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref_head = head.detach().clone().requires_grad_(True)
    assert head_kl_divergence(ref_hidden, ref_head, hidden, head).item() == pytest.approx(0.0, abs=1e-6)
    head_kl_divergence(ref_hidden, ref_head, hidden + 0.1, head).backward()
    assert ref_hidden.grad is None and ref_head.grad is None
    assert hidden.grad.abs().sum() > 0 and head.grad.abs().sum() > 0


def test_head_losses_under_bf16_autocast_match_autocast_logits_and_stay_float32(small_chunks):
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    head = torch.randn(13, 8, requires_grad=True)
    ref_hidden = torch.randn(2, 9, 8)
    tokens = torch.randint(0, 13, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = [head_next_token_loss(hidden, head, tokens), head_kl_divergence(ref_hidden, head, hidden, head)]
        direct = [next_token_loss(hidden @ head.T, tokens), kl_divergence(ref_hidden @ head.T, hidden @ head.T)]
    for f, d in zip(fused, direct):
        assert f.dtype == torch.float32
        assert f.item() == pytest.approx(d.item(), rel=1e-3)
        for a, b in zip(_grads(f, hidden, head), _grads(d, hidden, head)):
            assert a.dtype == torch.float32 and torch.allclose(a, b, atol=2e-3, rtol=2e-2)


def test_head_losses_need_no_gradient_state_without_autograd(small_chunks):
    hidden, head = torch.randn(2, 6, 4), torch.randn(7, 4)
    tokens = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        assert head_next_token_loss(hidden, head, tokens).item() == pytest.approx(
            next_token_loss(hidden @ head.T, tokens).item(), rel=1e-6)


def test_compiled_loss_blocks_give_the_eager_values_and_gradients(small_chunks):
    torch.manual_seed(2)
    hidden = torch.randn(2, 8, 6, requires_grad=True)
    head = torch.randn(10, 6, requires_grad=True)
    ref_hidden, tokens = torch.randn(2, 8, 6), torch.randint(0, 10, (2, 8))
    for loss in (lambda c: head_next_token_loss(hidden, head, tokens, compile=c),
                 lambda c: head_kl_divergence(ref_hidden, head, hidden, head, compile=c)):
        eager, compiled = loss(False), loss(True)
        assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
        for a, b in zip(_grads(compiled, hidden, head), _grads(eager, hidden, head)):
            assert torch.allclose(a, b, atol=1e-6)


def test_masked_head_losses_equal_full_logit_losses_over_the_kept_tokens_alone(small_chunks):
    torch.manual_seed(3)
    hidden = torch.randn(3, 9, 5, dtype=torch.float64, requires_grad=True)
    head = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_head = torch.randn(3, 9, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    tokens = torch.randint(0, 12, (3, 9))
    mask = torch.rand(3, 9) < 0.6
    mask[0, 1:] = False  # a row with nothing to predict
    keep = mask[:, 1:]  # token t counts: the prediction made at position t-1
    direct_ntp = lambda: token_losses(hidden @ head.T, tokens)[keep].mean()  # noqa: E731
    direct_kl = lambda: token_kl((ref_hidden @ ref_head.T)[:, :-1], (hidden @ head.T)[:, :-1])[keep].mean()  # noqa: E731
    for fused, direct in [(head_next_token_loss(hidden, head, tokens, mask=mask), direct_ntp()),
                          (head_kl_divergence(ref_hidden, ref_head, hidden, head, mask=mask), direct_kl())]:
        assert fused.item() == pytest.approx(direct.item(), rel=1e-6)
        for a, b in zip(_grads(fused, hidden, head), _grads(direct, hidden, head)):
            assert torch.allclose(a, b, atol=1e-6)


def test_an_all_true_mask_gives_the_unmasked_next_token_loss_and_an_empty_one_zero(small_chunks):
    hidden, head = torch.randn(2, 6, 4, requires_grad=True), torch.randn(7, 4)
    tokens = torch.randint(0, 7, (2, 6))
    full = torch.ones(2, 6, dtype=torch.bool)
    assert head_next_token_loss(hidden, head, tokens, mask=full).item() == pytest.approx(
        head_next_token_loss(hidden, head, tokens).item(), rel=1e-6)
    empty = head_kl_divergence(hidden, head, hidden + 1, head, mask=~full)
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph


# ---------------------------------------------------------------- stored top-K targets

def _bucket_kl(ref_logits, logits, k):
    """Direct float64 KL between the (k+1)-bucket coarsenings (π0's top-k tokens, the rest), k < V,
    averaged over the rows of [N, V] logits."""
    ref_logp, logp = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    top = ref_logp.topk(k, dim=-1).indices
    off = torch.ones_like(ref_logp, dtype=torch.bool).scatter_(1, top, False)

    def buckets(lp):
        return torch.cat([lp.gather(1, top), lp.masked_fill(~off, float("-inf")).logsumexp(-1, keepdim=True)], 1)
    p0, q = buckets(ref_logp), buckets(logp)
    return (p0.exp() * (p0 - q)).sum(-1).mean()


def _models(seed, V=11, D=6, B=3, T=10, sharp=1.0):
    torch.manual_seed(seed)
    hidden = (sharp * torch.randn(B, T, D, dtype=torch.float64)).requires_grad_(True)
    head = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    return hidden, head, sharp * torch.randn(B, T, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64)


def test_topk_targets_with_k_equal_v_give_the_full_kl_and_its_gradients(small_chunks):
    hidden, head, ref_hidden, ref_head = _models(4)
    mask = torch.rand(3, 10) < 0.7
    for m in (None, mask):
        targets = topk_targets(ref_hidden, ref_head, 11, mask=m)
        assert torch.all(targets[2] == REST_FLOOR)  # no rest bucket at K = V: the floor, finite
        stored = head_kl_from_topk(*targets, hidden, head, mask=m)
        full = head_kl_divergence(ref_hidden, ref_head, hidden, head, mask=m)
        assert stored.dtype == torch.float32 and stored.item() == pytest.approx(full.item(), rel=1e-6)
        for a, b in zip(_grads(stored, hidden, head), _grads(full, hidden, head)):
            assert torch.allclose(a, b, atol=1e-6)


def test_topk_targets_are_the_largest_log_probabilities_and_the_log_of_the_mass_left(small_chunks):
    _, _, ref_hidden, ref_head = _models(5)
    logp, ids, rest = topk_targets(ref_hidden, ref_head, 4)
    full = torch.log_softmax(ref_hidden @ ref_head.T, -1).reshape(30, 11)
    assert logp.shape == ids.shape == (30, 4) and rest.shape == (30,)
    assert logp.dtype == rest.dtype == torch.float32 and ids.dtype == torch.int32
    expected = full.topk(4, dim=-1)
    assert torch.equal(ids.long(), expected.indices) and torch.allclose(logp.double(), expected.values, atol=1e-6)
    assert torch.allclose(rest.double(), torch.log1p(-expected.values.exp().sum(-1)), atol=1e-5)


def test_the_rest_mass_stays_exact_when_it_is_far_below_float32_resolution():
    V = 50  # head = identity: the hidden states are the logits
    logits = torch.zeros(1, 1, V)
    logits[0, 0, 7] = 50.0  # one token takes all but ≈ 49·e^-50 ≈ 1e-20 of the mass
    _, ids, rest = topk_targets(logits, torch.eye(V), 1)
    assert ids.item() == 7 and rest.item() == pytest.approx(math.log(V - 1) - 50.0, abs=1e-4)


@pytest.mark.parametrize("sharp", [1.0, 6.0])  # 6: peaked models, rest masses far below 1e-7
def test_topk_kl_below_v_is_the_bucket_kl_with_its_gradients_and_at_most_the_full_kl(small_chunks, sharp):
    hidden, head, ref_hidden, ref_head = _models(6, sharp=sharp)
    full = head_kl_divergence(ref_hidden, ref_head, hidden, head).item()
    values = []
    for k in (1, 3, 10):
        stored = head_kl_from_topk(*topk_targets(ref_hidden, ref_head, k), hidden, head)
        direct = _bucket_kl((ref_hidden @ ref_head.T).reshape(30, 11), (hidden @ head.T).reshape(30, 11), k)
        assert stored.item() == pytest.approx(direct.item(), rel=1e-5)
        for a, b in zip(_grads(stored, hidden, head), _grads(direct, hidden, head)):
            assert torch.allclose(a, b, atol=1e-6 * sharp**2)
        values.append(stored.item())
    assert 0 < values[0] and all(v <= full * (1 + 1e-6) for v in values)
    assert values[0] < full  # one bucket of two loses information: strictly below


def test_topk_kl_respects_the_mask_for_per_position_and_preselected_targets(small_chunks):
    hidden, head, ref_hidden, ref_head = _models(7)
    mask = torch.rand(3, 10) < 0.6
    mask[0, 1:] = False  # a row with nothing to predict
    keep = mask[:, 1:]
    per_position = [t.view(3, 10, *t.shape[1:]) for t in topk_targets(ref_hidden, ref_head, 3)]
    preselected = topk_targets(ref_hidden, ref_head, 3, mask=mask)
    for targets in (per_position, preselected):
        direct = _bucket_kl((ref_hidden @ ref_head.T)[:, :-1][keep], (hidden @ head.T)[:, :-1][keep], 3)
        stored = head_kl_from_topk(*targets, hidden, head, mask=mask)
        assert stored.item() == pytest.approx(direct.item(), rel=1e-5)
        for a, b in zip(_grads(stored, hidden, head), _grads(direct, hidden, head)):
            assert torch.allclose(a, b, atol=1e-6)
    empty = ~torch.ones(3, 10, dtype=torch.bool)
    nothing = head_kl_from_topk(*per_position, hidden, head, mask=empty)
    assert nothing.item() == 0.0
    nothing.backward()  # still part of the graph


@pytest.mark.parametrize("k", [2, 9])
def test_topk_kl_is_zero_with_no_gradient_at_the_reference(small_chunks, k):
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    head = torch.randn(9, 4, requires_grad=True)
    stored = head_kl_from_topk(*topk_targets(hidden.detach(), head.detach(), k), hidden, head)
    assert stored.item() == pytest.approx(0.0, abs=1e-6)
    assert all(g.abs().max() < 1e-6 for g in _grads(stored, hidden, head))
    moved = head_kl_from_topk(*topk_targets(hidden.detach(), head.detach(), k), hidden + 0.3, head)
    assert moved.item() > 1e-4


def test_compiled_topk_kl_gives_the_eager_values_and_gradients_and_bf16_storage_is_close(small_chunks):
    torch.manual_seed(8)
    hidden, head = torch.randn(2, 8, 6, requires_grad=True), torch.randn(10, 6, requires_grad=True)
    logp, ids, rest = topk_targets(torch.randn(2, 8, 6), head.detach(), 4)
    eager, compiled = (head_kl_from_topk(logp, ids, rest, hidden, head, compile=c) for c in (False, True))
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for a, b in zip(_grads(compiled, hidden, head), _grads(eager, hidden, head)):
        assert torch.allclose(a, b, atol=1e-6)
    assert head_kl_from_topk(logp.bfloat16(), ids, rest, hidden, head).item() == pytest.approx(eager.item(), rel=2e-2)


def test_topk_targets_that_do_not_fit_are_refused_with_one_line():
    hidden, head = torch.randn(2, 4, 3), torch.randn(6, 3)
    with pytest.raises(SelfReplayError, match="1 <= K <= V = 6"):
        topk_targets(hidden, head, 7)
    logp, ids, rest = topk_targets(hidden, head, 2)
    with pytest.raises(SelfReplayError, match="cover 8 positions but the batch has 3"):
        head_kl_from_topk(logp, ids, rest, hidden, head, mask=torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]]).bool())
    with pytest.raises(SelfReplayError, match="V = 4 tokens"):
        head_kl_from_topk(*topk_targets(hidden, torch.randn(8, 3), 5), hidden, torch.randn(4, 3))
