"""Checks of the repository itself: notebooks committed clean, one set-up cell, the lesson-first rules
(a map, optional sections that core cells do not need, plumbing in collapsed cells, exercises with
executed solutions, checkpoints), one repository URL, lint."""

from __future__ import annotations

import ast
import builtins
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
    cell = code_cells(path)[0]
    setup = source(cell)
    assert f'REPO_URL = "{utils.REPO_URL}"' in setup, "the set-up cell must clone utils.REPO_URL"
    assert '"google.colab" in sys.modules' in setup and "import utils" in setup
    # the mode switch a student can see: Colab form fields, handed to utils (the environment still wins)
    assert re.search(r'^MODE = "(quick|full)"  # @param \["quick", "full"\]$', setup, re.M), "MODE form field"
    assert re.search(r"^BUDGET = [0-9.]+  # @param \{type:\"number\"\}$", setup, re.M), "BUDGET form field"
    assert "utils.choose_mode(MODE, BUDGET)" in setup and "utils.install_colab_extras(COLAB_EXTRAS)" in setup
    assert cell.get("metadata", {}).get("cellView") == "form" and setup.startswith("# @title")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_extras_are_exact_pins(path):
    """Unpinned extras let pip pull newer releases that replace Colab's own packages (issue 12)."""
    line = re.search(r"^COLAB_EXTRAS = (.*?)  #", source(code_cells(path)[0]), re.M)
    assert line, "the set-up cell must define COLAB_EXTRAS on one line, with a comment"
    extras = ast.literal_eval(line.group(1))
    loose = [e for e in extras if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+]+", e) and e != "tf-keras"]
    assert not loose, f"pin these exactly (tf-keras alone is matched to Colab's TensorFlow at run time): {loose}"


def test_setup_cells_are_one_pattern():
    """Every notebook copies the same set-up cell; only its list of extra Colab packages differs."""
    variants = {re.sub(r"COLAB_EXTRAS = .*", "", source(code_cells(p)[0])) for p in NOTEBOOKS}
    assert len(variants) <= 1, "set-up cells differ beyond COLAB_EXTRAS; copy the cell of another notebook"


# ----------------------------------------------------------------------------- lesson first (issue 16)
MAX_VISIBLE_LINES_BEFORE_FIRST_MODEL = 120
HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.M)
EXERCISE = re.compile(r"^#{2,4}\s+Exercise\s+(\d+)\s+\((predict, then run|code)\)", re.M)


def is_form(cell) -> bool:
    return cell.get("metadata", {}).get("cellView") == "form"


def visible_code_lines(cell) -> int:
    lines = [ln.strip() for ln in source(cell).splitlines()]
    return sum(1 for ln in lines if ln and not ln.startswith("#"))


def cells_with_sections(path):
    """(cell, optional?) for every cell: a section runs from its heading to the next of the same or higher level."""
    stack: list[tuple[int, bool]] = []
    out = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            for hashes, title in HEADING.findall(source(cell)):
                level = len(hashes)
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, "optional" in title.lower()))
        out.append((cell, any(optional for _, optional in stack)))
    return out


def names(cell) -> tuple[set[str], set[str]]:
    """Names a code cell defines (any scope, parameters included) and names it reads."""
    code = "\n".join(ln for ln in source(cell).splitlines() if not ln.lstrip().startswith(("%", "!")))
    defined, read = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            defined.add(node.name)
    return defined, read


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_a_map_of_core_path_and_optional_sections(path):
    cells = json.loads(path.read_text())["cells"]
    top = " ".join(source(c) for c in cells[:4] if c["cell_type"] == "markdown").lower()
    assert "core path" in top and "optional" in top, "say near the top what the core path is and what is optional"
    headings = [t for c in cells if c["cell_type"] == "markdown" for _, t in HEADING.findall(source(c))]
    assert any("optional" in t.lower() for t in headings), "mark the optional sections in their headings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_core_cells_never_need_an_optional_cell(path):
    """A class that skips every optional section still runs: no core cell reads a name only optional cells define."""
    sections = [(c, opt) for c, opt in cells_with_sections(path) if c["cell_type"] == "code"]
    parsed = [(names(c), opt) for c, opt in sections]
    core_defined = set().union(*(d for (d, _), opt in parsed if not opt))
    optional_defined = set().union(*(d for (d, _), opt in parsed if opt))
    only_optional = optional_defined - core_defined - set(dir(builtins))
    needed = {i: sorted(r & only_optional) for i, ((_, r), opt) in enumerate(parsed) if not opt and r & only_optional}
    assert not needed, f"core code cells read names that only optional cells define: {needed}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_plumbing_is_collapsed_before_the_first_model(path):
    cells = json.loads(path.read_text())["cells"]
    tagged = [i for i, c in enumerate(cells) if "first-model" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "tag the one cell that first builds or trains a model with 'first-model'"
    visible = sum(visible_code_lines(c) for c in cells[: tagged[0]] if c["cell_type"] == "code" and not is_form(c))
    print(f"{path.name}: {visible} visible code lines before the first model")
    assert visible <= MAX_VISIBLE_LINES_BEFORE_FIRST_MODEL, (
        f"{visible} visible code lines before the first model (at most {MAX_VISIBLE_LINES_BEFORE_FIRST_MODEL}): "
        "move loaders, generators and other plumbing into collapsed '# @title' form cells"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_form_cells_have_titles(path):
    for i, cell in enumerate(code_cells(path)):
        titled = source(cell).startswith("# @title")
        assert titled == is_form(cell), f"code cell {i}: '# @title' and cellView 'form' go together"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_have_executed_reference_solutions(path):
    cells = json.loads(path.read_text())["cells"]
    kinds = {}
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for number, kind in EXERCISE.findall(source(cell)):
            word = "Answer" if kind == "predict, then run" else "Solution"
            answers = [c for c in cells[i + 1:] if c["cell_type"] == "code"
                       and source(c).startswith(f"# @title {word} to exercise {number}")]
            assert answers, f"exercise {number} ({kind}) has no later '# @title {word} to exercise {number}' cell"
            assert is_form(answers[0]), f"the {word.lower()} to exercise {number} must be collapsed (cellView form)"
            if kind == "code":
                assert "assert" in source(answers[0]), f"the solution to exercise {number} must check itself"
            kinds[number] = kind
    print(f"{path.name}: {len(kinds)} exercises with executed answers or solutions: {kinds}")
    assert len(kinds) >= 3, f"{len(kinds)} exercises; every notebook has at least three"
    assert set(kinds.values()) == {"predict, then run", "code"}, "have both kinds of exercise"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_training_survives_a_disconnect(path):
    text = "".join(source(c) for c in code_cells(path))
    assert "utils.train_or_load(" in text, "save long training runs with utils.train_or_load"
    assert "announce_run(" in text, "print mode, device and expected runtime with utils.announce_run"


def test_readme_results_table_is_generated(tmp_path):
    """tools/readme_results.py writes the table from results files: no number is copied by hand."""
    results = tmp_path / "results"
    (results / "colab-lane").mkdir(parents=True)
    record = {"notebook": "05_flow_vae", "mode": "quick", "runtime_s": 61.0, "written": "2026-12-03T10:00:00",
              "summary": [["test NLL, VAE (nats)", "23.01 +- 0.05"]]}
    (results / "05_flow_vae.json").write_text(json.dumps(record))
    colab = {**record, "summary": [["test NLL, VAE (nats)", "23.02 +- 0.04"]]}
    (results / "colab-lane" / "05_flow_vae.json").write_text(json.dumps(colab))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results-table:start -->\nold\n<!-- results-table:end -->\nrest\n")
    tool = [sys.executable, str(utils.REPO_ROOT / "tools" / "readme_results.py"), "--results", str(results),
            "--readme", str(readme)]
    assert subprocess.run([*tool, "--check"], capture_output=True).returncode == 1
    subprocess.run(tool, check=True)
    text = readme.read_text()
    assert "| 05_flow_vae (61 s) | test NLL, VAE (nats) | 23.01 +- 0.05 | 23.02 +- 0.04 |" in text
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert subprocess.run([*tool, "--check"], capture_output=True).returncode == 0


def test_readme_has_the_generated_results_table():
    assert "<!-- results-table:start -->" in README and "<!-- results-table:end -->" in README


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_saves_and_asserts_its_results(path):
    cells = code_cells(path)
    text = "".join(source(c) for c in cells)
    # the name may sit in a variable (NOTEBOOK = "05_flow_vae") that the checkpoints use too
    named = re.search(rf'^(\w+) = "{path.stem}"\s*(#.*)?$', text, re.M)
    assert f'save_results("{path.stem}"' in text or (named and f"save_results({named.group(1)}," in text), (
        f'the notebook must save its results as "{path.stem}"'
    )
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
