import gzip
import json
import sys

import pytest

from selfreplay.data.corpus import iter_batches, iter_documents, parse_hf_source
from selfreplay.errors import SelfReplayError


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_jsonl_skips_blank_lines_and_reads_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n  \n{"text": "two\\nlines"}\n{"text": ""}\n', encoding="utf-8")
    assert list(iter_documents(str(path))) == ["one", "two\nlines"]  # the empty document is skipped


def test_jsonl_with_another_text_field(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"body": "ñandú é 🎉"}, {"body": "b"}])
    assert list(iter_documents(path, text_field="body")) == ["ñandú é 🎉", "b"]


def test_jsonl_gz(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"text": "uno"}\n{"text": "dos"}\n')
    assert list(iter_documents(str(path))) == ["uno", "dos"]


def test_txt_documents_are_blank_line_separated_blocks(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first line\nsecond line\n\n\nnext doc\n   \nlast\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == ["first line\nsecond line", "next doc", "last"]


def test_batches_keep_order(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"text": str(i)} for i in range(10)])
    batches = list(iter_batches(path, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum(batches, []) == [str(i) for i in range(10)]


def test_parse_hf_source():
    assert parse_hf_source("hf:wikitext") == ("wikitext", None, "train")
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hf_source("hf:/data/dir::validation") == ("/data/dir", None, "validation")
    with pytest.raises(SelfReplayError, match="hf:NAME"):
        parse_hf_source("hf:")


def test_hf_dataset_from_a_local_directory(tmp_path):
    pytest.importorskip("datasets")
    jsonl(tmp_path / "a.jsonl", [{"text": "uno"}, {"text": "dos"}])
    jsonl(tmp_path / "b.jsonl", [{"text": "tres"}])
    for source in (f"hf:{tmp_path}", f"hf:{tmp_path}::train"):
        assert sorted(iter_documents(source)) == ["dos", "tres", "uno"]
    with pytest.raises(SelfReplayError, match="could not load dataset.*test"):
        iter_documents(f"hf:{tmp_path}::test")
    with pytest.raises(SelfReplayError, match="no 'body' field"):
        list(iter_documents(f"hf:{tmp_path}", text_field="body"))


@pytest.mark.parametrize("name, content, match", [
    ("missing.jsonl", None, "corpus not found"),
    ("c.csv", "a,b\n", "unknown corpus kind.*use .jsonl"),
    ("c.jsonl", "", "holds no documents"),
    ("c.jsonl", "\n\n", "holds no documents"),
    ("c.txt", "\n  \n", "holds no documents"),
    ("c.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"c\.jsonl:2: not a JSON line"),
    ("c.jsonl", '{"text": "ok"}\n{"body": "x", "id": 3}\n', r"c\.jsonl:2: no 'text' field \(fields: body, id\)"),
    ("c.jsonl", '{"text": 5}\n', "field 'text' holds int, not a string"),
    ("c.jsonl", '["text"]\n', "expected a JSON object"),
])
def test_bad_corpora_raise_one_line_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SelfReplayError, match=match) as info:
        list(iter_documents(str(path)))
    assert "\n" not in str(info.value)


def test_missing_file_is_reported_before_iterating(tmp_path):
    with pytest.raises(SelfReplayError, match="corpus not found"):
        iter_documents(str(tmp_path / "missing.jsonl"))  # no list(): the check is eager


def test_hf_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SelfReplayError, match=r"pip install selfreplay\[hf\]"):
        iter_documents("hf:wikitext")
