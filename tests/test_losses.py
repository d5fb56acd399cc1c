import torch

from selfreplay.losses import kl_divergence, next_token_loss, token_kl, token_losses


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
