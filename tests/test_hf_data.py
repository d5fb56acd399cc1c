import copy
import json

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import conversations, sentences, write_jsonl  # noqa: E402
from selfreplay.data.chat import assistant_tokens, chat_turns, prompt_tokens  # noqa: E402
from selfreplay.data.text import IGNORE, chat_rows, load_rows, pack_text, pad_batch, rows_from_dataset  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402


def test_text_is_packed_into_full_rows_with_eos_after_every_document(tmp_path, hf_tokenizer):
    docs = sentences("es", 40)
    rows = pack_text(str(write_jsonl(tmp_path / "es.jsonl", docs)), hf_tokenizer, T=16)
    flat = [t for r in rows for t in r["input_ids"]]
    assert all(len(r["input_ids"]) == 16 and r["labels"] == r["input_ids"] for r in rows)
    expected = [t for d in docs for t in hf_tokenizer(d)["input_ids"] + [hf_tokenizer.eos_token_id]]
    assert len(rows) == len(expected) // 16 and flat == expected[: len(flat)]


@pytest.mark.parametrize("setting", [None, "--text-field", "text_field=NAME"])
def test_a_text_file_without_the_text_field_names_the_callers_setting_in_one_line(tmp_path, hf_tokenizer, setting):
    path = write_jsonl(tmp_path / "x.jsonl", ["hola", "adiós"], field="body")
    with pytest.raises(SelfReplayError) as error:
        if setting is None:  # a run's data (data.train, data.old_text): the config key
            load_rows(str(path), hf_tokenizer, T=8)
        else:
            pack_text(str(path), hf_tokenizer, T=8, setting=setting)
    expected = setting or "data.text_field=FIELD"
    assert str(error.value) == f"{path}:1: no 'text' field (fields: body): choose one with {expected}"


def test_conversations_count_only_the_assistants_tokens(hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *conversations(2)[0], *conversations(2, seed=1)[1]]
    ids, mask = assistant_tokens(hf_tokenizer, messages)
    counted = hf_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert counted == "".join(f"{a}<|im_end|>\n" for a in answers)
    assert hf_tokenizer.decode(ids) == hf_tokenizer.apply_chat_template(messages, tokenize=False)


def test_chat_rows_from_jsonl_put_minus_100_on_all_but_the_answers(tmp_path, hf_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(5)))
    rows = load_rows(str(path), hf_tokenizer, T=512)
    assert len(rows) == 5
    for row, conversation in zip(rows, conversations(5)):
        answer = hf_tokenizer.decode([t for t in row["labels"] if t != IGNORE])
        assert answer == conversation[1]["content"] + "<|im_end|>\n"
    batch = pad_batch(rows, hf_tokenizer.pad_token_id)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (5, width)
    assert (batch["labels"][batch["input_ids"] == hf_tokenizer.pad_token_id] == IGNORE).all()


def test_a_tokenizer_without_a_chat_template_is_one_line_when_one_is_needed(tmp_path, hf_tokenizer):
    plain = copy.deepcopy(hf_tokenizer)
    plain.chat_template = None
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversations(1)[0]}) + "\n")
    for needs_template in (lambda: chat_rows(str(path), plain, T=64), lambda: chat_turns(plain)):
        with pytest.raises(SelfReplayError, match="no chat template") as error:
            needs_template()
        assert "\n" not in str(error.value)


def test_a_dataset_without_a_text_or_messages_column_is_one_line(hf_tokenizer):
    with pytest.raises(SelfReplayError, match="^old_eval_dataset has no 'text', 'messages' or 'input_ids' column "
                                              r"\(columns: body\): rename the text column to 'text'$"):
        rows_from_dataset([{"body": "hola"}], hf_tokenizer, T=8, name="old_eval_dataset")
    with pytest.raises(SelfReplayError, match="^the training dataset is empty$"):
        rows_from_dataset([], hf_tokenizer, T=8)
    rows = rows_from_dataset([{"text": s} for s in sentences("en", 30)], hf_tokenizer, T=8)
    assert rows and all(len(r["input_ids"]) == 8 for r in rows)


def test_hf_datasets_from_a_local_directory_are_packed(tmp_path, hf_tokenizer):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", sentences("en", 30))
    assert pack_text(f"hf:{folder}", hf_tokenizer, T=8) == pack_text(str(folder / "train.jsonl"), hf_tokenizer, T=8)


def test_chat_turns_cut_the_template_around_the_user_turn_and_the_answer(hf_tokenizer):
    turns = chat_turns(hf_tokenizer)
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert hf_tokenizer.decode(turns.user_prefix) == "<s><|im_start|>user\n"
    assert turns.user_end == im_end and turns.answer_end == im_end
    assert hf_tokenizer.decode(turns.assistant_header) == "\n<|im_start|>assistant\n"
    with_system = chat_turns(hf_tokenizer, system="Be brief.")
    assert hf_tokenizer.decode(with_system.user_prefix) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    prompt = prompt_tokens(hf_tokenizer, "The cat.")
    assert hf_tokenizer.decode(prompt) == "<s><|im_start|>user\nThe cat.<|im_end|>\n<|im_start|>assistant\n"
