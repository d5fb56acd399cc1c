"""The command line: every subcommand has help, and bad input is one line on stderr with exit 1."""

import json
import subprocess
import sys

import pytest

from selfreplay.cli import main
from selfreplay.model.transformer import ModelConfig, Transformer

COMMANDS = [[], ["tokenizer"], ["tokenizer", "train"], ["tokenize"], ["synth"], ["sample"], ["pretrain"],
            ["finetune"], ["demo"], ["export"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "selfreplay")
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: selfreplay" in capsys.readouterr().out


def run(*args):
    return subprocess.run([sys.executable, "-m", "selfreplay.cli", *args], capture_output=True, text=True)


def one_line_error(result, fragment):
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfreplay: error:") and fragment in lines[0], result.stderr


def test_sample_from_a_directory_without_weights(tmp_path):
    Transformer(ModelConfig(D=16, L=1, H=8, T=8, V=300)).save_pretrained(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    one_line_error(run("sample", str(tmp_path), "--domain", "0"), "no weights.safetensors")


def test_bad_training_configs(tmp_path):
    one_line_error(run("pretrain", f"out={tmp_path / 'r'}", "replay.coef=1"), "did you mean 'replay.coeff'")
    one_line_error(run("finetune", f"init={tmp_path / 'none'}", f"out={tmp_path / 'r'}", "data.train=x",
                       "stop.tokens=10"), "pretrain it first")
    one_line_error(run("pretrain", str(tmp_path / "missing.yaml")), "does not exist")


def test_sample_prints_decoded_text(tmp_path, tokenizer):
    model = Transformer(ModelConfig(D=16, L=1, H=8, T=12, V=tokenizer.vocab_size))
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    result = run("sample", str(tmp_path), "--domain", "es", "-n", "2", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 2 and "(domain es)" in result.stdout


def test_version():
    from selfreplay import __version__

    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"selfreplay {__version__}"


@pytest.mark.parametrize("flags, fragment", [
    (["--top-k", "0"], "top-k must be at least 1, got 0"),
    (["--top-k", "-3"], "top-k must be at least 1"),
    (["--top-p", "-1"], "top-p must be in (0, 1], got -1.0"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--temperature", "nan"], "temperature must be >= 0"),
    (["-n", "0"], "number of samples must be at least 1"),
    (["--length", "0"], "sample length must be between 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_sampling_settings_out_of_range_are_one_line(tmp_path, tokenizer, flags, fragment):
    Transformer(ModelConfig(D=16, L=1, H=8, T=12, V=tokenizer.vocab_size)).save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    one_line_error(run("sample", str(tmp_path), "--domain", "es", *flags), fragment)


def test_tokenizer_train_never_replaces_a_tokenizer(tmp_path, corpora, tokenizer):
    tokenizer.save(tmp_path)
    before = (tmp_path / "tokenizer.json").read_bytes()
    one_line_error(run("tokenizer", "train", str(corpora["en"]), "--vocab-size", "280", "--out", str(tmp_path)),
                   "already holds a tokenizer")
    assert (tmp_path / "tokenizer.json").read_bytes() == before


def test_a_non_numeric_value_in_an_init_runs_config_is_one_line(tmp_path, tokenizer):
    Transformer(ModelConfig(D=16, L=1, H=8, T=12, V=tokenizer.vocab_size)).save_pretrained(tmp_path / "init")
    config = tmp_path / "init" / "config.yaml"
    config.write_text(config.read_text().replace("D: 16", "D: sixteen"))
    one_line_error(run("finetune", f"init={tmp_path / 'init'}", f"out={tmp_path / 'ft'}", "data.train=x.bin",
                       "stop.tokens=10"), "'model.D' must be int, got 'sixteen'")
    assert "init run's" in run("finetune", f"init={tmp_path / 'init'}", f"out={tmp_path / 'ft'}", "data.train=x.bin",
                                "stop.tokens=10").stderr
    config.write_text("seed: abc\ndata: {seed: x}\nmodel: {D: 16, L: 1, H: 8, T: 12, V: 300}\n")
    one_line_error(run("finetune", f"init={tmp_path / 'init'}", f"out={tmp_path / 'ft'}", "data.train=x.bin",
                       "stop.tokens=10"), "init run's")
    assert not (tmp_path / "ft").exists()


def test_export_then_a_replay_pool_from_the_exported_model(pretrained, tmp_path):
    pytest.importorskip("transformers")
    exported, pool = tmp_path / "hf", tmp_path / "pool"
    result = run("export", str(pretrained), "--hf", str(exported))
    assert result.returncode == 0, result.stderr
    result = run("sample", f"init=hf:{exported}", "--out", str(pool), "-n", "3", "--length", "8", "--seed", "1")
    assert result.returncode == 0, result.stderr
    header = json.loads((pool / "pool.json").read_text())
    assert header["rows"] == 3 and header["meta"]["length"] == 8 and header["targets"] == "hidden"
    one_line_error(run("sample", str(pretrained), "--out", str(tmp_path / "p2"), "-n", "2"), "give --domain")
    one_line_error(run("sample", str(pretrained), "--out", str(tmp_path / "p3"), "--domain", "en", "--targets",
                       "top:3"), "choose none, hidden or topk:K")
    one_line_error(run("export", str(pretrained), "--hf", str(exported)), "is not empty")


@pytest.fixture
def hf_model_dir(request):
    pytest.importorskip("transformers")  # before the fixture that builds the model imports it
    return request.getfixturevalue("tiny_llama_dir")


def test_finetuning_a_hf_model_on_text_without_the_text_field_names_the_config_key(hf_model_dir, tmp_path):
    (tmp_path / "new.jsonl").write_text(json.dumps({"body": "hola"}) + "\n")
    (tmp_path / "old.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    one_line_error(run("finetune", f"init=hf:{hf_model_dir}", f"out={tmp_path / 'ft'}",
                       f"data.train={tmp_path / 'new.jsonl'}", f"data.old_text={tmp_path / 'old.jsonl'}",
                       "model.T=16", "replay.length=16", "stop.tokens=64"),
                   "no 'text' field (fields: body): choose one with data.text_field=FIELD")
    assert not (tmp_path / "ft").exists()
