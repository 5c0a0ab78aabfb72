"""Checks of the repository itself: notebooks committed clean, one repository URL, lint."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import utils

NOTEBOOKS = sorted((utils.REPO_ROOT / "notebooks").glob("*.ipynb"))
README = (utils.REPO_ROOT / "README.md").read_text()


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    dirty = [i for i, c in enumerate(code_cells(path)) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name}: clear the outputs of code cells {dirty} before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_the_shared_setup_cell(path):
    setup = source(code_cells(path)[0])
    assert f'REPO_URL = "{utils.REPO_URL}"' in setup, "the set-up cell must clone utils.REPO_URL"
    assert '"google.colab" in sys.modules' in setup and "import utils" in setup


def test_setup_cells_are_one_pattern():
    """Every notebook copies the same set-up cell; only its list of extra Colab packages differs."""
    variants = {re.sub(r"COLAB_EXTRAS = .*", "", source(code_cells(p)[0])) for p in NOTEBOOKS}
    assert len(variants) <= 1, "set-up cells differ beyond COLAB_EXTRAS; copy the cell of another notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_saves_and_asserts_its_results(path):
    cells = code_cells(path)
    assert f'save_results("{path.stem}"' in "".join(source(c) for c in cells)
    assert "assert " in "".join(source(c) for c in cells[-2:]), "the last cells must assert the results"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_has_a_colab_badge_for_every_notebook(path):
    repo = utils.REPO_URL.removeprefix("https://github.com/")
    assert f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{path.name}" in README


def test_readme_names_no_other_repository_url():
    urls = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", README))
    assert urls <= {utils.REPO_URL.removeprefix("https://github.com/")}, urls


def test_ruff_is_clean():
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", str(utils.REPO_ROOT)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_requirements_are_exact_pins():
    lines = [ln.strip() for ln in (utils.REPO_ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    loose = [r for r in reqs if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", r)]
    assert not loose, f"pin these exactly: {loose}"
