"""The installed package finds its experiments: the wheel holds every packaged sweep file, and
importlib.resources finds each experiment by name."""

import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.packaged import packaged_sweeps, sweep_path

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "selfreplay" / "experiments" / "sweeps"
EXPERIMENTS = ("method_comparison", "capacity", "grid", "learning_rate", "continual")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (a build in the tree would leave build/ behind)."""
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT / "selfreplay", source / "selfreplay", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(out), "-q"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("selfreplay-*.whl")
    return path


def test_the_wheel_holds_every_packaged_sweep_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    in_tree = sorted(SWEEPS.glob("*.yaml"))
    assert {p.stem for p in in_tree} >= set(EXPERIMENTS)
    for path in in_tree:
        assert f"selfreplay/experiments/sweeps/{path.name}" in names
        assert zipfile.ZipFile(wheel).read(f"selfreplay/experiments/sweeps/{path.name}") == path.read_bytes()


def test_importlib_resources_finds_each_experiment_by_name():
    folder = resources.files("selfreplay.experiments").joinpath("sweeps")
    found = packaged_sweeps()
    assert set(found) == {entry.name.removesuffix(".yaml") for entry in folder.iterdir()
                          if entry.name.endswith(".yaml")}
    for name in EXPERIMENTS:
        assert found[name].read_text() == folder.joinpath(f"{name}.yaml").read_text()
        assert sweep_path(name) == found[name]


def test_a_sweep_is_named_or_a_file(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("stages: []\n")
    assert sweep_path(own) == own and sweep_path(str(own)) == own
    with pytest.raises(SelfReplayError, match=r"unknown experiment 'capacty'; did you mean 'capacity'\?"):
        sweep_path("capacty")
    with pytest.raises(SelfReplayError, match="does not exist"):
        sweep_path(tmp_path / "missing.yaml")
    with pytest.raises(SelfReplayError, match="selfreplay sweep capacity"):
        sweep_path("experiments/capacity/sweep.yaml")  # where they lived before they were packaged


def test_no_benchmark_script_shadows_a_module_its_imports_need():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like a
    standard or installed module (benchmarks/kernels.py against Hugging Face's `kernels`, which
    transformers imports) replaces it in every benchmark process."""
    import importlib.machinery

    folder = ROOT / "benchmarks"
    elsewhere = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != folder.resolve()]
    for script in sorted(folder.glob("*.py")):
        name = script.stem
        assert name not in sys.stdlib_module_names, f"benchmarks/{script.name} shadows the standard module {name}"
        spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        assert spec is None, f"benchmarks/{script.name} shadows the installed module {name} ({spec.origin})"
