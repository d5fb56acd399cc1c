"""Shared fixtures: two small generated corpora and a tokenizer trained on them once per session."""

import json
import os
import random

import pytest

# No hub: set before anything imports huggingface_hub, which reads it once at import.
os.environ["HF_HUB_OFFLINE"] = "1"

WORDS = {
    "en": "the cat dog house river walks sees big small red old new quickly today and with under".split(),
    "es": "el gato perro casa río camina ve grande pequeño rojo viejo nuevo rápido hoy y con bajo".split(),
}


def sentences(language: str, n: int, seed: int = 0) -> list[str]:
    """n short pseudo-sentences of one language's words."""
    rng = random.Random(f"{language}-{seed}")
    return [" ".join(rng.choices(WORDS[language], k=rng.randint(3, 12))).capitalize() + "."
            for _ in range(n)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    """{"en": path, "es": path} of 300-document JSONL corpora."""
    root = tmp_path_factory.mktemp("corpora")
    return {lang: write_jsonl(root / f"{lang}.jsonl", sentences(lang, 300)) for lang in WORDS}


@pytest.fixture(scope="session")
def tokenizer(corpora, tmp_path_factory):
    """A vocab-300 tokenizer with domains en (id 0) and es (id 1)."""
    from selfreplay.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer([str(corpora["en"]), str(corpora["es"])], vocab_size=300, out_dir=out,
                           domains=["en", "es"])


# ---------------------------------------------------------------- tiny runs on the synthetic corpus

MODEL = ["model.D=32", "model.L=2", "model.H=8", "model.T=32", "model.V=320"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tokenizer and two token files (old: en_synth, new: es_synth) from the synthetic corpus."""
    from selfreplay.data.synth import LANGUAGES, write_corpus
    from selfreplay.data.tokenizer import train_tokenizer
    from selfreplay.data.tokens import write_token_file

    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root / "text", num_words=40_000, seed=1)
    tokenizer = train_tokenizer([str(p) for p in texts.values()], vocab_size=320, out_dir=root / "tok",
                                domains=list(LANGUAGES))
    files = {}
    for language in LANGUAGES:
        files[language] = root / f"{language}.bin"
        write_token_file(str(texts[language]), tokenizer, domain=language, out=files[language])
    return {"tokenizer": root / "tok", "old": files[LANGUAGES[0]], "new": files[LANGUAGES[1]]}


@pytest.fixture(scope="session")
def pretrained(corpus, tmp_path_factory):
    from selfreplay.training.loop import resolve_config, train

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    config = resolve_config("pretrain", None, [
        f"out={out}", f"data.tokenizer={corpus['tokenizer']}", f"data.train={corpus['old']}", *MODEL,
        "data.val_sequences=32", "optim.lr=3e-3", "optim.batch_size=16", "optim.warmup_steps=5",
        "stop.tokens=16384", "log.every_tokens=4096", "log.progress=false"])
    train(config, "pretrain")
    return out


def finetune_overrides(corpus, pretrained, out, *overrides) -> list[str]:
    """The command-line settings of a tiny finetuning run (2048 tokens, a log point every 512)."""
    return [f"init={pretrained}", f"data.train={corpus['new']}", f"out={out}", "optim.lr=3e-3",
            "optim.batch_size=8", "optim.warmup_steps=2", "replay.batch_size=4", "replay.buffer=2",
            "stop.tokens=2048", "log.every_tokens=512", "log.progress=false", *overrides]


def killed_at_log_point(monkeypatch, run, log_point: int, sets: int = 2):
    """Call run() with the process "killed" (KeyboardInterrupt) during its `log_point`-th
    measurement (`sets` validation sets each), as a crash would stop it."""
    from selfreplay.evaluation.validation import ValidationSet

    calls, real_evaluate = {"n": 0}, ValidationSet.evaluate

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == sets * log_point + 1:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ValidationSet, "evaluate", dying_evaluate)
        with pytest.raises(KeyboardInterrupt):
            run()


def finetune_config(corpus, pretrained, out, *overrides):
    from selfreplay.training.loop import resolve_config

    return resolve_config("finetune", None, finetune_overrides(corpus, pretrained, out, *overrides))

# ---------------------------------------------------------------- Hugging Face models (tests/test_hf_*.py)

@pytest.fixture
def one_thread():
    """One torch thread: tiny models on a shared CPU run many times slower with threads contending."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """n short conversations: an English user turn answered in Spanish."""
    return [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            for u, a in zip(sentences("en", n, seed), sentences("es", n, seed))]


@pytest.fixture(scope="session")
def hf_tokenizer():
    """A byte-level BPE PreTrainedTokenizerFast (vocab ~300) with <s>, </s>, <pad> and a ChatML-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences("en", 300) + sentences("es", 300), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def _save_hf(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(hf_tokenizer, tmp_path_factory):
    """A random 2-layer Llama (width 32, untied head) with the chat tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id,
                         pad_token_id=hf_tokenizer.pad_token_id, tie_word_embeddings=False)
    return _save_hf(LlamaForCausalLM(config), hf_tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(hf_tokenizer, tmp_path_factory):
    """A random 2-layer GPT-2 (width 32, head tied to the embedding) with the chat tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(hf_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id)
    return _save_hf(GPT2LMHeadModel(config), hf_tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def taught_llama_dir(hf_tokenizer, tiny_llama_dir, tmp_path_factory):
    """The tiny Llama trained briefly on packed sentences and on chat conversations, so that its
    samples end documents with EOS and follow the chat template (turns end with <|im_end|>)."""
    import torch
    from transformers import AutoModelForCausalLM

    from selfreplay.data.text import pack_documents, pad_batch, rows_from_dataset

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread`, which a session fixture cannot use
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    text = pack_documents([sentences("en", 200)], hf_tokenizer, T=48)
    chats = rows_from_dataset([{"messages": c} for c in conversations(100)], hf_tokenizer, T=128)
    chats = [{**r, "labels": r["input_ids"]} for r in chats]  # learn the user turns too
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(120):
        rows = text[(step * 8) % len(text):][:8] if step % 2 else chats[(step * 4) % len(chats):][:8]
        batch = pad_batch(rows, hf_tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    return _save_hf(model, hf_tokenizer, tmp_path_factory.mktemp("taught_llama"))


def write_gguf(model, tokenizer, path) -> str:
    """A Llama and its byte-level BPE tokenizer written as a float32 GGUF file (what llama.cpp's
    converter writes, without quantization): the tokens, merges and chat template as GGUF keys, each
    weight under its GGUF name, q and k with their rotary halves interleaved as GGUF keeps them."""
    import gguf
    import numpy as np

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = sorted(state["model"]["vocab"], key=state["model"]["vocab"].get)
    specials = set(tokenizer.all_special_tokens) | {"<|im_start|>", "<|im_end|>"}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)

    def interleaved(weight, heads):  # [h·2·d/2, D]: each head's two rotary halves -> pairs
        rows = weight.shape[0]
        return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    for name, tensor in model.state_dict().items():
        weight = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            weight = interleaved(weight, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = interleaved(weight, c.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama (and its tokenizer) as a float32 GGUF file, in a folder of its own."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
