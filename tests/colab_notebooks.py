"""The Colab lane: every notebook in quick mode the way Colab runs it (run by .ci/colab-lane, not by `pytest`).

Per notebook: a fresh overlay of the Colab-version environment (as a fresh Colab session), the
`google.colab` module importable, the working directory outside the repository with the clone already
where the set-up cell looks for it (so no git network call), and COLAB_EXTRAS installed by the set-up
cell itself. Afterwards, Colab's own packages must still have Colab's versions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import colab_lane
import nbformat
import pytest
from nbclient import NotebookClient

SELECTED = [Path(p).resolve() for p in os.environ.get("COLAB_LANE_NOTEBOOKS", "").split()]
NOTEBOOKS = SELECTED or sorted((colab_lane.REPO_ROOT / "notebooks").glob("*.ipynb"))
RESULTS = colab_lane.REPO_ROOT / "results" / "colab-lane"
SNAPSHOT = colab_lane.read_snapshot()


def test_the_lane_runs_on_colabs_python_and_versions():
    assert sys.version_info[:2] == (3, 13), f"the Colab lane must run on Python 3.13, not {sys.version}"
    found = colab_lane.versions_in(sys.executable)
    assert not colab_lane.changed_versions(SNAPSHOT, found), "rebuild .colab-venv: it is not the snapshot"


def test_an_overlay_reports_a_changed_colab_package(tmp_path):
    """The check below fails a notebook whose set-up cell changed a Colab package: shown here on purpose."""
    python = colab_lane.make_overlay(sys.executable, tmp_path / "overlay")
    assert not colab_lane.changed_versions(SNAPSHOT, colab_lane.versions_in(python))
    fake = colab_lane.site_packages(python) / "numpy-9.9.9.dist-info"  # what `pip install numpy==9.9.9` leaves
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 9.9.9\n")
    assert colab_lane.changed_versions(SNAPSHOT, colab_lane.versions_in(python)) == [
        f"numpy: Colab has {SNAPSHOT['numpy']}, the environment now has 9.9.9"
    ]


def test_the_overlay_looks_like_colab(tmp_path):
    python = colab_lane.make_overlay(sys.executable, tmp_path / "overlay")
    code = "import sys, google.protobuf; print('google.colab' in sys.modules)"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_colab(path, tmp_path, monkeypatch):
    content = tmp_path / "content"  # Colab's working directory, outside the repository
    clone = colab_lane.copy_repository(content / "project-notebooks")
    python = colab_lane.make_overlay(sys.executable, tmp_path / "overlay")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = colab_lane.write_kernelspec(python, tmp_path / "jupyter")
    RESULTS.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("RESULTS_DIR", str(RESULTS))
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    notebook = nbformat.read(clone / "notebooks" / path.name, as_version=4)
    client = NotebookClient(notebook, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(content)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        print(f"{path.name}: {time.perf_counter() - start:.0f} s on the Colab lane")
    changes = colab_lane.changed_versions(SNAPSHOT, colab_lane.versions_in(python))
    assert not changes, f"{path.name}'s set-up cell changed Colab's own packages: {changes}"
