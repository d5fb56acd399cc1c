"""The paper's experiments, shipped inside the package as sweep files (`selfreplay/experiments/sweeps/NAME.yaml`),
found by name through importlib.resources, so an installed wheel runs them as a source checkout does."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from selfreplay.errors import SelfReplayError, did_you_mean

PACKAGE, FOLDER, SUFFIX = "selfreplay.experiments", "sweeps", ".yaml"


def packaged_sweeps() -> dict[str, Path]:
    """{experiment name: its sweep file}, in name order."""
    folder = resources.files(PACKAGE).joinpath(FOLDER)
    # pip installs a wheel as files on disk, so each resource is a real path the sweep code can read
    return {entry.name[:-len(SUFFIX)]: Path(str(entry))
            for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(SUFFIX)}


def sweep_path(name_or_file: str | Path) -> Path:
    """The sweep file `name_or_file` names: an existing file, or a packaged experiment's name."""
    path = Path(name_or_file)
    if path.is_file():
        return path
    packaged = packaged_sweeps()
    if str(name_or_file) in packaged:
        return packaged[str(name_or_file)]
    moved = path.parent.name if path.name == "sweep.yaml" else None  # the old experiments/NAME/sweep.yaml
    if moved in packaged:
        raise SelfReplayError(f"{path} does not exist: the experiments now ship inside the package; "
                              f"run it by name: selfreplay sweep {moved}")
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise SelfReplayError(f"sweep file {path} does not exist: give a sweep file's path or one of the "
                              f"packaged experiments ({', '.join(packaged)})")
    raise SelfReplayError(f"unknown experiment {str(name_or_file)!r}{did_you_mean(str(name_or_file), packaged)} "
                          f"(packaged: {', '.join(packaged)}; or give a sweep file's path)")
