import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.model.export import export_hf  # noqa: E402
from selfreplay.model.hf import CausalLM  # noqa: E402
from selfreplay.model.transformer import ModelConfig, Transformer  # noqa: E402


@pytest.fixture
def run_dir(tmp_path, tokenizer):
    model = Transformer(ModelConfig(D=32, L=2, H=8, T=64, V=tokenizer.vocab_size, rope_base=500.0))
    model.reset_parameters(torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "run")
    tokenizer.save(tmp_path / "run")
    return tmp_path / "run", model


def test_exported_model_gives_the_built_in_logits_and_loads_with_auto_classes_alone(run_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model = run_dir
    out = export_hf(path, tmp_path / "hf", domain="es")
    hf_model = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 64))
    with torch.no_grad():
        expected = model.eval()(tokens)
        assert (hf_model(tokens).logits - expected).abs().max() < 1e-4
        lm = CausalLM(hf_model)
        cache = lm.new_cache(64)
        steps = [lm.hidden(tokens[:, :10], cache)] + [lm.hidden(tokens[:, t:t + 1], cache) for t in range(10, 64)]
        assert (lm.head(torch.cat(steps, 1)) - expected).abs().max() < 1e-4
    text = "El gato ve la casa."
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.bos_token_id == tokenizer.domain_id("es") and hf_tokenizer.eos_token_id == tokenizer.eos_id


def test_export_refuses_a_non_empty_directory(run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(SelfReplayError, match="not empty"):
        export_hf(run_dir[0], tmp_path / "taken")
