import json
import re

import pytest

from selfreplay.errors import SelfReplayError
from selfreplay.data.synth import LANGUAGES, generate_documents, write_corpus


def _word_types(documents: list[str]) -> set[str]:
    return set(re.findall(r"[^\W\d_]+", " ".join(documents).lower()))  # words without numbers or punctuation


def test_same_seed_gives_identical_files_and_another_seed_different_text(tmp_path):
    first = write_corpus(tmp_path / "a", num_words=5_000, seed=3)
    again = write_corpus(tmp_path / "b", num_words=5_000, seed=3)
    other = write_corpus(tmp_path / "c", num_words=5_000, seed=4)
    for language in LANGUAGES:
        assert first[language].read_bytes() == again[language].read_bytes()
        assert first[language].read_bytes() != other[language].read_bytes()


@pytest.mark.parametrize("language", LANGUAGES)
def test_documents_hold_about_the_requested_words_in_several_sentences(language):
    documents = generate_documents(language, 20_000, seed=0)
    words = sum(len(d.split()) for d in documents)
    assert 0.8 * 20_000 <= words <= 1.2 * 20_000
    assert all(len(re.findall(r"[.?]( |$)", d)) >= 3 for d in documents)
    assert len(set(documents)) == len(documents)


def test_the_two_languages_share_almost_no_words():
    a, b = (_word_types(generate_documents(language, 20_000, seed=0)) for language in LANGUAGES)
    assert len(a) > 300 and len(b) > 300
    assert len(a & b) / len(a) < 0.1


def test_spanish_like_language_has_its_own_marks():
    text = " ".join(generate_documents(LANGUAGES[1], 5_000))
    assert "¿" in text and re.search("[áéíóúñ]", text)


def test_write_corpus_writes_jsonl_with_a_text_field(tmp_path):
    paths = write_corpus(tmp_path / "new" / "dir", num_words=2_000)
    assert set(paths) == set(LANGUAGES)
    for language, path in paths.items():
        assert path.name == f"{language}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows and all(isinstance(row["text"], str) and row["text"] for row in rows)
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == sorted(p.name for p in paths.values())


def test_bad_input_raises_a_one_line_error(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    for out_dir, words in [(tmp_path / "ok", 0), (tmp_path / "ok", -5), (file, 1_000)]:
        with pytest.raises(SelfReplayError) as error:
            write_corpus(out_dir, num_words=words)
        assert "\n" not in str(error.value)
    with pytest.raises(SelfReplayError):
        generate_documents("fr_synth", 100)
