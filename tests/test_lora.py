import torch

from selfreplay.model.lora import LoRALinear, add_lora, effective_weights, merge_lora
from selfreplay.model.transformer import ModelConfig, Transformer

CONFIG = ModelConfig(D=32, L=2, H=8, T=10, V=30)


def test_adapters_start_at_the_pretrained_model_and_train_only_a_and_b():
    model = Transformer(CONFIG).eval()
    x = torch.randint(0, CONFIG.V, (2, CONFIG.T))
    with torch.no_grad():
        before = model(x)
    trainable = add_lora(model, rank=4)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * CONFIG.L  # qkv, out, up, down in every block; embeddings untouched
    assert sum(p.numel() for p in trainable) == sum(m.A.numel() + m.B.numel() for m in wrapped)
    assert not model.embed.weight.requires_grad and not model.head.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0 at init


def test_merging_keeps_the_adapted_function_and_the_plain_keys():
    model = Transformer(CONFIG).eval()
    keys = set(model.state_dict())
    add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.normal_()
    x = torch.randint(0, CONFIG.V, (2, CONFIG.T))
    with torch.no_grad():
        adapted = model(x)
        folded = effective_weights(model)
        merge_lora(model)
        assert torch.allclose(model(x), adapted, atol=1e-4)
    assert set(model.state_dict()) == keys == set(folded)
    assert all(torch.allclose(folded[k], v, atol=1e-5) for k, v in model.state_dict().items())
