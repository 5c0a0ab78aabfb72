"""The Colab lane's machinery: a Python 3.13 environment with Colab's own package versions, and an
overlay per notebook in which the notebook's set-up cell installs its COLAB_EXTRAS as it would on Colab.

Standard library only: `.ci/colab-lane` runs it with any Python to find Python 3.13, and the lane's
test (tests/colab_notebooks.py) and the pinned lane's unit tests (tests/test_colab_lane.py) import it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO_ROOT / ".ci" / "colab-runtime.txt"
# Colab's own packages that a set-up cell must never change (issue 12).
CHECKED = (
    "torch", "torchvision", "numpy", "scipy", "pandas", "scikit-learn", "scikit-image",
    "tensorflow", "keras", "protobuf",
)
HOW_TO_GET_313 = (
    "The Colab lane needs Python 3.13 (Colab's version) and found none. Get it with one of:\n"
    "  pyenv install 3.13          (then it is found under ~/.pyenv/versions/3.13*)\n"
    "  uv python install 3.13      (then set COLAB_PYTHON=$(uv python find 3.13))\n"
    "  apt-get install python3.13 python3.13-venv   (Ubuntu: from the deadsnakes PPA)\n"
    "or point COLAB_PYTHON at a python3.13 executable."
)
# Kept importable in every process of the overlay: the stand-in for Colab's module. `google` stays a
# namespace package (no google/__init__.py), so google.protobuf still imports beside it.
STAND_IN = '''"""Stand-in for Colab's google.colab module (the Colab lane of the tests): its presence in sys.modules
is how a notebook knows it runs on Colab."""


class _Drive:
    def mount(self, *args, **kwargs):
        raise NotImplementedError("the Colab lane has no Google Drive")


drive = _Drive()
'''


def canonical(name: str) -> str:
    return "".join("-" if c in "-_." else c for c in name.lower())


def find_python313() -> str:
    """The Python 3.13 executable: COLAB_PYTHON, then python3.13 on PATH, then pyenv's versions folder."""
    candidates = [os.environ.get("COLAB_PYTHON", ""), shutil.which("python3.13") or ""]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates += sorted(glob.glob(str(pyenv / "versions" / "3.13*" / "bin" / "python3.13")), reverse=True)
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip() == "(3, 13)":
            return candidate
    raise SystemExit(HOW_TO_GET_313)


def read_snapshot(path: Path = SNAPSHOT) -> dict[str, str]:
    """{canonical name: version} of the snapshot's `name==version` lines (comments and blanks skipped)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.count("==") != 1:
            raise ValueError(f"{path}:{number}: expected name==version, got {line!r}")
        name, version = (part.strip() for part in line.split("=="))
        pins[canonical(name)] = version
    return pins


def changed_versions(expected: dict[str, str], found: dict[str, str], names=CHECKED) -> list[str]:
    """What differs between the snapshot and an environment, for the packages in `names`."""
    changes = []
    for name in map(canonical, names):
        if found.get(name) != expected.get(name):
            changes.append(f"{name}: Colab has {expected.get(name)}, the environment now has {found.get(name)}")
    return changes


def versions_in(python: str | Path) -> dict[str, str]:
    """{canonical name: version} as `python` sees them (the first on its sys.path wins, as at import)."""
    code = (
        "import importlib.metadata as m, json\n"
        "seen = {}\n"
        "for d in m.distributions():\n"
        "    n = d.metadata['Name']\n"
        "    if n: seen.setdefault(''.join('-' if c in '-_.' else c for c in n.lower()), d.version)\n"
        "print(json.dumps(seen))\n"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def site_packages(python: str | Path) -> Path:
    done = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True)
    return Path(done.stdout.strip())


def make_overlay(base_python: str | Path, dest: Path) -> Path:
    """A fresh virtual environment that sees the base environment's packages (as Colab's image) and keeps
    what a notebook installs to itself, so notebooks run side by side like separate Colab sessions.

    pip run in the overlay counts the base's packages as installed; a package it upgrades lands in the
    overlay, shadows the base's, and shows up in versions_in(overlay).
    """
    base_site = site_packages(base_python)
    base_prefix = subprocess.run([str(base_python), "-c", "import sys; print(sys.base_prefix)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    python313 = Path(base_prefix) / "bin" / "python3.13"
    subprocess.run([str(python313), "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python"
    overlay_site = site_packages(python)
    stand_in = dest / "colab-stand-in" / "google" / "colab"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(STAND_IN)
    (overlay_site / "00-colab-base.pth").write_text(f"{base_site}\n{stand_in.parents[1]}\n")
    (overlay_site / "zz-colab-module.pth").write_text("import google.colab\n")
    return python


def copy_repository(dest: Path, src: Path = REPO_ROOT) -> Path:
    """Copy the working tree as a clone would hold it: tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=src,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        source = src / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    return dest


def write_kernelspec(python: Path, folder: Path, name: str = "colab-lane") -> str:
    """A Jupyter kernel that runs in the overlay; returns its name (put `folder` on JUPYTER_PATH)."""
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    return name


if __name__ == "__main__":
    if sys.argv[1:] == ["find-python"]:
        print(find_python313())
    else:
        raise SystemExit("usage: python tests/colab_lane.py find-python")
