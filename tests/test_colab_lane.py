"""Unit tests of the Colab lane's machinery (tests/colab_lane.py); the lane itself runs in .ci/colab-lane."""

from __future__ import annotations

import subprocess
import sys

import colab_lane
import pytest


def test_the_snapshot_pins_every_checked_colab_package():
    pins = colab_lane.read_snapshot()
    assert set(colab_lane.CHECKED) <= set(pins)
    assert pins["torch"] == "2.11.0" and pins["numpy"] == "2.1.3" and pins["scikit-image"] == "0.25.2"
    text = colab_lane.SNAPSHOT.read_text()
    assert "googlecolab/backend-info" in text and "2026-08-19" in text, "say where the snapshot came from, and when"


def test_read_snapshot_rejects_loose_lines(tmp_path):
    path = tmp_path / "snapshot.txt"
    path.write_text("# comment\nnumpy==2.1.3  # Colab's\n\nscipy>=1.16\n")
    with pytest.raises(ValueError, match="snapshot.txt:4"):
        colab_lane.read_snapshot(path)
    path.write_text("NumPy==2.1.3\nscikit_learn==1.6.1\n")
    assert colab_lane.read_snapshot(path) == {"numpy": "2.1.3", "scikit-learn": "1.6.1"}


def test_changed_versions_names_upgrades_downgrades_and_removals():
    colab = {"numpy": "2.1.3", "protobuf": "5.29.6", "torch": "2.11.0"}
    assert colab_lane.changed_versions(colab, dict(colab), names=colab) == []
    found = {"numpy": "2.4.6", "torch": "2.11.0"}
    assert colab_lane.changed_versions(colab, found, names=colab) == [
        "numpy: Colab has 2.1.3, the environment now has 2.4.6",
        "protobuf: Colab has 5.29.6, the environment now has None",
    ]


def test_versions_in_reads_an_interpreter():
    import numpy

    assert colab_lane.versions_in(sys.executable)["numpy"] == numpy.__version__


def test_a_missing_python_313_fails_with_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("COLAB_PYTHON", str(tmp_path / "nothing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(colab_lane.Path, "home", lambda: tmp_path)
    monkeypatch.setattr(colab_lane.glob, "glob", lambda pattern: [])
    with pytest.raises(SystemExit) as stop:
        colab_lane.find_python313()
    assert "pyenv install 3.13" in str(stop.value) and "COLAB_PYTHON" in str(stop.value)


def test_a_python_of_another_version_is_not_taken(monkeypatch, tmp_path):
    monkeypatch.setenv("COLAB_PYTHON", sys.executable)  # the pinned lane's 3.11
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(colab_lane.glob, "glob", lambda pattern: [])
    with pytest.raises(SystemExit, match="Python 3.13"):
        colab_lane.find_python313()


def test_the_lane_script_fails_loudly_without_python_313(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with a Python 3.11 called python3 and no 3.13
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "COLAB_PYTHON": str(tmp_path / "none")}
    done = subprocess.run(["bash", str(colab_lane.REPO_ROOT / ".ci" / "colab-lane")], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Python 3.13" in done.stderr


def test_copy_repository_copies_tracked_files_and_skips_ignored_ones(tmp_path):
    dest = colab_lane.copy_repository(tmp_path / "clone")
    assert (dest / "utils.py").read_text() == (colab_lane.REPO_ROOT / "utils.py").read_text()
    assert (dest / ".ci" / "colab-runtime.txt").exists()
    assert not (dest / ".venv").exists() and not (dest / "results").exists()


def test_write_kernelspec_points_at_the_overlay(tmp_path):
    import json

    name = colab_lane.write_kernelspec(tmp_path / "py", tmp_path / "jupyter")
    spec = json.loads((tmp_path / "jupyter" / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == str(tmp_path / "py") and "{connection_file}" in spec["argv"]
