"""GGUF files in, like any model: init=hf:FILE.gguf (or init=hf:DIR model.gguf_file=NAME), `selfreplay
sample` and SelfReplayTrainer(model=FILE.gguf) load the file's model dequantized to float32, with
its tokenizer and chat template; what a run saves is a safetensors directory that loads alone."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import sentences, write_jsonl  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.model.hf import load_causal_lm  # noqa: E402


def test_a_gguf_file_loads_as_the_model_it_was_written_from_with_its_tokenizer(tiny_llama_dir, tiny_gguf, capsys):
    import torch

    model, tokenizer = load_causal_lm(tiny_gguf)
    original, original_tokenizer = load_causal_lm(tiny_llama_dir)
    assert "dequantized to float32" in capsys.readouterr().err
    text = "el gato camina con el perro"
    ids = original_tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(tokenizer(text, return_tensors="pt").input_ids, ids)
    assert tokenizer.chat_template == original_tokenizer.chat_template and tokenizer.eos_token == "</s>"
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-6)
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: save_pretrained works


def test_finetuning_a_gguf_file_saves_a_safetensors_directory_that_loads_alone(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfreplay.training.loop import resolve_config, train

    new = write_jsonl(tmp_path / "es.jsonl", sentences("es", 60))
    old = write_jsonl(tmp_path / "en.jsonl", sentences("en", 20))
    folder, name = Path(tiny_gguf).parent, Path(tiny_gguf).name
    for init, extra, out in ((f"hf:{tiny_gguf}", [], tmp_path / "file"),
                             (f"hf:{folder}", [f"model.gguf_file={name}"], tmp_path / "folder")):
        config = resolve_config("finetune", None, [
            f"init={init}", f"out={out}", f"data.train={new}", f"data.old_text={old}", "model.T=32",
            "data.val_sequences=4", "optim.batch_size=4", "optim.lr=1e-2", "replay.method=kl", "replay.batch_size=2",
            "replay.buffer=1", "stop.tokens=256", "log.progress=false", *extra])
        summary = train(config, "finetune")
        assert summary["steps"] == 2 and summary["old_kl"] > 0
        assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf"))
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert getattr(loaded.config, "quantization_config", None) is None
        assert AutoTokenizer.from_pretrained(out).chat_template is not None


def test_the_trainer_and_the_sample_command_take_a_gguf_file(tiny_gguf, tmp_path):
    from selfreplay.hf.trainer import SelfReplayConfig, SelfReplayTrainer
    from selfreplay.replay.store import read_header
    from selfreplay.training.pools import sample_hf_pool

    args = SelfReplayConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                            replay_batch_size=2, replay_buffer=1, replay_length=24, max_length=24, report_to=[],
                            save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = SelfReplayTrainer(tiny_gguf, args, train_dataset=[{"text": s} for s in sentences("es", 30)])
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    header = sample_hf_pool(f"hf:{tiny_gguf}", tmp_path / "pool", count=4, length=16, chat=True)
    assert header["rows"] == 4 and read_header(tmp_path / "pool")["meta"]["format"] == "chat"


@pytest.mark.parametrize("content, message", [
    (b"GGUF" + bytes(60), "is not a readable GGUF file"),
    (b"not a gguf file at all", "is not a readable GGUF file"),
])
def test_a_bad_gguf_file_is_refused_in_one_line(tmp_path, content, message):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(SelfReplayError, match=message) as error:
        load_causal_lm(str(bad))
    assert "\n" not in str(error.value)
    result = subprocess.run([sys.executable, "-m", "selfreplay", "sample", f"init=hf:{bad}", "--out",
                             str(tmp_path / "pool"), "-n", "2", "--length", "8"], capture_output=True, text=True)
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_gguf_file_of_an_architecture_transformers_cannot_load_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv9")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SelfReplayError, match="holds a rwkv9 model, which transformers cannot load from GGUF"):
        load_causal_lm(str(path))
