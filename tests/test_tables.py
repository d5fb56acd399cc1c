"""The tables generated from benchmarks/results/*.json (README.md and docs/) agree with that JSON,
and a table whose numbers no longer do is caught. Standard library only: no torch."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_module():
    spec = importlib.util.spec_from_file_location("result_tables", ROOT / "benchmarks" / "result_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = load_module()


@pytest.fixture
def tree(tmp_path):
    """A copy of the Markdown files and the results they are built from."""
    for name in tables.FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    return tmp_path


def marked(path: Path) -> set[str]:
    return {m.group(2) for line in path.read_text(encoding="utf-8").split("\n")
            if (m := tables.MARKER.match(line.strip())) and not m.group(1)}


def test_the_markdown_tables_agree_with_the_json():
    assert tables.check(ROOT) == []


def test_every_table_is_in_a_file_and_the_readme_holds_the_headline():
    found = set().union(*(marked(ROOT / name) for name in tables.FILES))
    assert found == set(tables.TABLES)
    assert "method_comparison" in marked(ROOT / "README.md")
    for name, (files, _) in tables.TABLES.items():
        for file in files:
            assert (ROOT / "benchmarks" / "results" / file).exists(), f"{name}: {file}"


def test_a_changed_number_in_a_table_is_caught_and_named(tree):
    readme = tree / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert "| plain finetuning | +2.653 |" in text
    readme.write_text(text.replace("| plain finetuning | +2.653 |", "| plain finetuning | +2.654 |"), encoding="utf-8")
    (problem,) = tables.check(tree)
    assert problem.startswith("README.md: table method_comparison differs")
    assert "method_comparison_fortunes.json" in problem


def test_a_changed_number_in_the_json_is_caught(tree):
    path = tree / "benchmarks" / "results" / "peers_kl_cpu.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["kl"]["shapes"][0]["methods"]["liger"]["peak_mib"] += 10
    path.write_text(json.dumps(data), encoding="utf-8")
    assert [p.split(" differs")[0] for p in tables.check(tree)] == ["docs/results.md: table peers_kl_cpu"]


def test_check_exits_non_zero_in_one_line_and_a_rewrite_restores_the_table(tree, capsys):
    results = tree / "docs" / "results.md"
    original = results.read_text(encoding="utf-8")
    assert "| built-in | 0.01 | 0.0093 (0.93) | 40.2 |" in original
    results.write_text(original.replace("| built-in | 0.01 | 0.0093 (0.93) | 40.2 |",
                                        "| built-in | 0.01 | 0.0093 (0.93) | 40.3 |"), encoding="utf-8")
    assert tables.main(["--check"], root=tree) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "docs/results.md: table budget differs" in err
    assert tables.main([], root=tree) == 0
    assert results.read_text(encoding="utf-8") == original
    assert tables.main(["--check"], root=tree) == 0


def test_text_outside_the_markers_is_left_alone(tree):
    readme = tree / "README.md"
    text = readme.read_text(encoding="utf-8") + "\nA line with +2.654 in it.\n"
    readme.write_text(text, encoding="utf-8")
    assert tables.check(tree) == []
    tables.rewrite(tree)
    assert readme.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("body, message", [
    ("<!-- table:nonesuch -->\n| a |\n<!-- /table:nonesuch -->\n", "unknown table 'nonesuch'"),
    ("<!-- table:method_comparison -->\n| a |\n", "has no <!-- /table:method_comparison -->"),
    ("<!-- table:method_comparison -->\n<!-- /table:budget -->\n", "has no <!-- /table:method_comparison -->"),
    ("<!-- /table:method_comparison -->\n", "closes no table"),
])
def test_a_broken_marker_is_an_error(tree, capsys, body, message):
    (tree / "docs" / "results.md").write_text(body, encoding="utf-8")
    with pytest.raises(tables.TableError, match=message.replace("(", r"\(")):
        tables.check(tree)
    assert tables.main(["--check"], root=tree) == 1
    assert "docs/results.md:" in capsys.readouterr().err
