"""Thin helpers shared by the project notebooks.

Only what two or more notebooks need lives here: the quick/full switch, seeding, device choice,
where data and results go, safe downloads and archive extraction, a loud notice when a notebook
falls back to offline data, a timer, an image grid, writing results, and the synthetic-nuclei
generator with its watershed counter (used by the cell-counting and the Noise2Void notebooks).
Method code stays in the notebooks, where the learner reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent
# The one place the repository's address is written; tests check that README badges and
# notebook set-up cells agree with it.
REPO_URL = "https://github.com/dl-project-notebooks/project-notebooks"

_IMPORTED_AT = time.perf_counter()  # a notebook imports utils first, so this times the notebook
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}  # an empty QUICK counts as unset


# ----------------------------------------------------------------------------- modes and setup
_FORM: dict[str, Any] = {}  # the set-up cell's form fields (MODE, BUDGET), recorded by choose_mode
_SCALED: dict[str, Any] = {}  # what pick() scaled by BUDGET, for the printout and the results JSON
LONG_RUN_MINUTES = 30  # full mode on a CPU stops before starting more than this, unless ALLOW_LONG_RUN=1


def choose_mode(mode: str = "full", budget: float = 1.0) -> None:
    """Record the set-up cell's form fields. QUICK or BUDGET set in the environment win (the tests set QUICK=1)."""
    if mode not in ("quick", "full"):
        raise ValueError(f"MODE must be 'quick' or 'full', got {mode!r}")
    _FORM.update(mode=mode, budget=_valid_budget(budget, "the BUDGET form field"))


def quick_mode() -> bool:
    """True in quick mode (small offline data, tiny budget, never the network).

    An explicit QUICK in the environment decides (1/0, true/false, yes/no, on/off); without it, the
    notebook's MODE form field does; without either, full mode.
    """
    value = os.environ.get("QUICK", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        raise ValueError(f"QUICK={value!r} is not understood: use QUICK=1 (quick mode) or QUICK=0 (full mode).")
    return _FORM.get("mode", "full") == "quick"


def _valid_budget(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ValueError(
            f"{where} must be a positive number (1 = the full budget, 0.1 = a tenth of it), got {value!r}"
        )
    return number


def budget() -> float:
    """The full-mode training scale: BUDGET in the environment, else the form field, else 1. Quick mode: 1."""
    if quick_mode():
        return 1.0
    raw = os.environ.get("BUDGET", "").strip()
    if raw:
        return _valid_budget(raw, "BUDGET in the environment")
    return _FORM.get("budget", 1.0)


def _scale(value: Any, factor: float, key: str) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_scale(v, factor, key) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"config row {key!r} is listed in scale= but holds {value!r}, not a number")
    return max(1, round(value * factor)) if isinstance(value, int) else value * factor


def pick(config: Mapping[str, Mapping[str, Any]], scale: Sequence[str] = ()) -> dict[str, Any]:
    """Select one column of a {setting: {"full": ..., "quick": ...}} config table.

    In full mode the rows named in `scale` (training lengths: steps, epochs, iterations, repeats) are
    multiplied by BUDGET, so an instructor can check the real-data path on a CPU in minutes.
    """
    if isinstance(scale, str):
        raise TypeError("scale must be a list of row names, not a string")
    column = "quick" if quick_mode() else "full"
    missing = [key for key, row in config.items() if column not in row]
    if missing:
        raise KeyError(f"config rows without a {column!r} value: {missing}")
    unknown = [key for key in scale if key not in config]
    if unknown:
        raise KeyError(f"scale names rows that the config does not have: {unknown}")
    chosen = {key: row[column] for key, row in config.items()}
    factor = budget()
    _SCALED.clear()
    if factor != 1.0:
        for key in scale:
            scaled = _scale(chosen[key], factor, key)
            _SCALED[key] = {"full": chosen[key], "used": scaled}
            chosen[key] = scaled
        changes = ", ".join(f"{k} {v['full']} -> {v['used']}" for k, v in _SCALED.items())
        print(f"BUDGET={factor:g} scales these settings: {changes}")
    return chosen


def announce_run(minutes: Mapping[str, float], device: Any = None) -> float:
    """Print mode, device, budget and the expected runtime before any work; returns the expected minutes.

    `minutes` holds this notebook's expected minutes at BUDGET=1: "quick" (2 CPU cores), "full_gpu"
    (a Colab T4) and "full_cpu" (2 CPU cores), and optionally "full_cpu_fixed", the part of "full_cpu"
    that BUDGET does not shorten (feature extraction, fixed-size evaluation). Full mode on a CPU that
    would take more than LONG_RUN_MINUTES stops here with the ways out, instead of starting hours of
    work silently.
    """
    missing = {"quick", "full_gpu", "full_cpu"} - set(minutes)
    if missing:
        raise KeyError(f"announce_run needs expected minutes for {sorted(missing)}")
    device = get_device() if device is None else device
    kind = getattr(device, "type", str(device))
    quick, factor = quick_mode(), budget()
    source = "QUICK in the environment" if os.environ.get("QUICK", "").strip() else "the MODE form field"
    fixed = float(minutes.get("full_cpu_fixed", 0.0))
    if not 0 <= fixed <= minutes["full_cpu"]:
        raise ValueError("full_cpu_fixed must lie between 0 and full_cpu")
    if quick:
        expected = float(minutes["quick"])
    elif kind == "cuda":
        expected = float(minutes["full_gpu"]) * factor
    else:
        expected = fixed + (float(minutes["full_cpu"]) - fixed) * factor
    print(f"mode: {'quick' if quick else 'full'} (from {source}) | device: {device} | BUDGET: {factor:g}")
    print(f"expected runtime on this device: about {_minutes(expected)}")
    if quick and os.environ.get("BUDGET", "").strip() not in ("", "1", "1.0"):
        print("(BUDGET only scales full mode; quick mode always runs its small fixed budget)")
    if not quick and factor != 1.0:
        print(f"BUDGET={factor:g}: training is shortened, so the numbers are not the full-mode results.")
    if "google.colab" in sys.modules:
        print(
            f"Data folder: {data_dir()} - it is lost when the Colab runtime is reset. To keep downloads and "
            "checkpoints, mount Google Drive and set DATA_DIR to a Drive folder before the set-up cell, e.g. "
            "os.environ['DATA_DIR'] = '/content/drive/MyDrive/project-notebooks-data'."
        )
    if not quick and kind != "cuda" and expected > LONG_RUN_MINUTES and os.environ.get("ALLOW_LONG_RUN") != "1":
        target = LONG_RUN_MINUTES * 0.66
        if fixed < target:
            fits = max(0.01, float(f"{(target - fixed) / (float(minutes['full_cpu']) - fixed):.2g}"))
            smaller = (f"  - a smaller budget: BUDGET = {fits:g} in the set-up cell (about "
                       f"{_minutes(fixed + (minutes['full_cpu'] - fixed) * fits)}, shortened training);\n")
        else:
            smaller = (f"  - (no BUDGET helps much here: about {_minutes(fixed)} of the CPU run is work that "
                       "BUDGET does not shorten);\n")
        raise RuntimeError(
            f"Full mode on this {kind.upper()} would take about {_minutes(expected)}, so it was not started.\n"
            f"Choose one:\n"
            f"  - a GPU: on Colab, Runtime > Change runtime type > T4 GPU (about {_minutes(minutes['full_gpu'])});\n"
            f"  - quick mode: MODE = 'quick' in the set-up cell (about {_minutes(minutes['quick'])});\n"
            f"{smaller}"
            f"  - or set ALLOW_LONG_RUN=1 in the environment to run it anyway.\n"
            f"Then run the set-up cell again."
        )
    return expected


def _minutes(value: float) -> str:
    return f"{value:.0f} min" if value < 90 else f"{value / 60:.1f} h"


def single_thread_cpu(device: Any) -> None:
    """On a CPU, run torch single-threaded: the small models here run faster on 2 cores that way, and
    quick-mode numbers no longer depend on how many cores the machine has (float sums change with it)."""
    if getattr(device, "type", str(device)) == "cpu":
        import torch

        torch.set_num_threads(1)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and GPU) so a rerun gives the same numbers."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # notebooks without torch still get Python and NumPy seeded
        return
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device(prefer: str | None = None):
    """The fastest available torch device (cuda, then mps, then cpu), or the one asked for."""
    import torch

    if prefer is not None:
        if prefer not in {"cpu", "cuda", "mps"}:
            raise ValueError(f"prefer must be 'cpu', 'cuda' or 'mps', got {prefer!r}")
        if prefer == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("a CUDA device was asked for but none is available")
        if prefer == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("an MPS device was asked for but none is available")
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _dir_from_env(variable: str, default: Path, *parts: str) -> Path:
    path = Path(os.environ.get(variable) or default).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(*parts: str) -> Path:
    """Where data sets live and downloads are cached: $DATA_DIR, default data/ at the repo root."""
    return _dir_from_env("DATA_DIR", REPO_ROOT / "data", *parts)


def results_dir(*parts: str) -> Path:
    """Where notebooks write metrics and figures: $RESULTS_DIR, default results/ at the repo root."""
    return _dir_from_env("RESULTS_DIR", REPO_ROOT / "results", *parts)


# ----------------------------------------------------------------------------- data
class DownloadError(RuntimeError):
    """A data file could not be had; the message says which URL and what to do by hand."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks so large archives do not fill memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_digest(sha256: str | None, md5: str | None) -> tuple[str, str] | None:
    if sha256 and md5:
        raise ValueError("give either sha256 or md5, not both")
    for algorithm, value, length in (("sha256", sha256, 64), ("md5", md5, 32)):
        if value is not None:
            value = value.lower()
            if len(value) != length or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"{algorithm} must be {length} hex digits, got {value!r}")
            return algorithm, value
    return None


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    max_bytes: int | None = None,
) -> Path:
    """Fetch url to dest unless a good copy is already there (local first).

    The file is written to a temporary name in the same folder and renamed only after the whole
    body arrived and its checksum matched, so an interrupted or corrupt download never leaves a
    file that looks finished. A local file with the wrong checksum is an error, not silently
    replaced: it may be a teacher's pre-downloaded copy of another version.
    """
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url must start with http:// or https://, got {url!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
    expected = _expected_digest(sha256, md5)
    dest = Path(dest)
    by_hand = f"Download it by hand from {url} and save it as {dest}."

    if dest.exists():
        if expected and file_digest(dest, expected[0]) != expected[1]:
            raise DownloadError(
                f"{dest} exists but its {expected[0]} does not match {expected[1]}. "
                f"Delete it to download again, or replace it. {by_hand}"
            )
        return dest
    if quick_mode():
        raise DownloadError(f"quick mode (QUICK=1) never uses the network, and {dest} is missing. {by_hand}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "project-notebooks/1.0"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            _copy_capped(response, out, max_bytes, url)
        if expected and (got := file_digest(tmp, expected[0])) != expected[1]:
            raise DownloadError(
                f"{url} arrived with {expected[0]} {got}, expected {expected[1]}: "
                f"the file changed on the server or was corrupted. {by_hand}"
            )
        os.replace(tmp, dest)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}. {by_hand}") from err
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not reach {url} ({reason}); are you offline? {by_hand}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_capped(response, out, max_bytes: int | None, url: str) -> None:
    declared = response.headers.get("Content-Length")
    if max_bytes is not None and declared is not None and int(declared) > max_bytes:
        raise DownloadError(f"{url} is {int(declared)} bytes, more than the {max_bytes} expected")
    received = 0
    for chunk in iter(lambda: response.read(1 << 20), b""):
        received += len(chunk)
        if max_bytes is not None and received > max_bytes:
            raise DownloadError(f"{url} sent more than the {max_bytes} bytes expected")
        out.write(chunk)
    if declared is not None and received != int(declared):
        raise DownloadError(f"{url} was cut off after {received} of {declared} bytes; try again")


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a .zip or .tar(.gz) archive into dest, refusing members that would land outside it.

    Extraction goes to a temporary folder that is renamed into place at the end, so a failure
    leaves no half-extracted tree behind.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                root = staging.resolve()
                for member in zf.namelist():
                    target = (staging / member).resolve()
                    if root not in target.parents and target != root:
                        raise ValueError(f"{archive} member {member!r} would be written outside {dest}")
                zf.extractall(staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                try:
                    tf.extractall(staging, filter="data")
                except tarfile.FilterError as err:
                    raise ValueError(f"{archive} holds an unsafe member: {err}") from err
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive")
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def announce_data(dataset: str, *, real: bool, reason: str = "") -> str:
    """Print, loudly, which data set a notebook uses; a fallback must never go unnoticed."""
    if real:
        message = f"DATA: {dataset} (the real data set)."
    else:
        bar = "!" * 78
        message = (
            f"{bar}\nDATA: OFFLINE STAND-IN: {dataset}.\n{reason}\n"
            f"Numbers below are NOT comparable to the paper's.\n{bar}"
        )
    print(message)
    return message


# ----------------------------------------------------------------------------- timing and results
class Timer:
    """Context manager measuring wall time: `with Timer() as t: ...; t.seconds`."""

    def __init__(self, label: str = "", verbose: bool = False) -> None:
        self.label, self.verbose, self.seconds = label, verbose, float("nan")

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        if self.verbose:
            print(f"{self.label or 'elapsed'}: {self.seconds:.1f} s")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d torch tensors
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not measured"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def save_results(name: str, metrics: Mapping[str, Any], **context: Any) -> Path:
    """Write RESULTS_DIR/<name>.json with the metrics, the mode, the device and the runtime.

    Pass `dataset=` and anything else a reader needs to interpret the numbers, and `summary=` rows
    [[what was measured, formatted numbers], ...] for the README's results table (tools/readme_results.py
    builds it from these files). The file is written atomically, so a crash never leaves half a JSON
    document, and is readable by everyone (mkstemp alone would leave it private to the owner).
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("metrics must be a non-empty mapping of names to values")
    if "dataset" not in context:
        raise ValueError("say which data set the numbers come from: save_results(..., dataset=...)")
    summary = context.get("summary")
    if summary is not None and not all(
        isinstance(row, (list, tuple)) and len(row) == 2 and all(isinstance(x, str) for x in row) for row in summary
    ):
        raise ValueError("summary must be a list of [what was measured, formatted value] pairs of strings")
    try:
        import torch

        device = str(context.pop("device", get_device()))
        if device.startswith("cuda") and torch.cuda.is_available():
            device = f"{device} ({torch.cuda.get_device_name(0)})"
    except ImportError:
        device = str(context.pop("device", "cpu"))
    record = {
        "notebook": name,
        "mode": "quick" if quick_mode() else "full",
        "device": device,
        "runtime_s": round(time.perf_counter() - _IMPORTED_AT, 1),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget": budget(),
        "budget_scaled": _jsonable(_SCALED) or None,
        **_jsonable(context),
        "metrics": _jsonable(metrics),
    }
    if record["budget"] != 1.0:
        print(f"Results computed with BUDGET={record['budget']:g} (shortened training), not the full-mode results.")
    path = results_dir() / f"{name}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=2, allow_nan=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_dir(notebook: str) -> Path:
    """Where a notebook keeps trained models: $CHECKPOINT_DIR/<notebook>, default DATA_DIR/checkpoints/<notebook>."""
    if not notebook or not all(c.isalnum() or c in "_-" for c in notebook):
        raise ValueError(f"notebook must be letters, digits, '_' or '-', got {notebook!r}")
    base = os.environ.get("CHECKPOINT_DIR")
    path = Path(base).expanduser() if base else data_dir("checkpoints")
    path = path / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_saveable(value: Any, where: str = "result") -> None:
    """Only what torch.load(weights_only=True) reads back: tensors, numbers, strings, lists, dicts."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key {k!r}: use strings or integers")
            _check_saveable(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_saveable(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str)) or type(value).__name__ == "Tensor"):
        raise TypeError(
            f"{where} is a {type(value).__name__}; a checkpoint holds tensors, numbers, strings, lists and dicts "
            "(convert numpy arrays with torch.as_tensor)"
        )


def train_or_load(
    notebook: str,
    name: str,
    train: Callable[[], Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    force: bool | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run `train()` once and keep what it returns; a rerun with the same config loads it instead.

    So a class survives a Colab disconnect: the model and its history come back from
    checkpoint_dir(notebook) in seconds. `train` returns a dict of tensors, numbers, strings, lists and
    dicts (e.g. {"model": model.state_dict(), "history": {...}}). The file name carries a hash of
    `config`, the mode and the budget, so a changed setting trains again. FORCE_RETRAIN=1 in the
    environment (or force=True) retrains and overwrites. Returns (result, loaded_from_disk).
    """
    import torch

    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError(f"name must be letters, digits, '_', '-' or '.', got {name!r}")
    if force is None:
        force = os.environ.get("FORCE_RETRAIN", "").strip().lower() in _TRUE
    key = json.dumps(
        {"config": _jsonable(config or {}), "quick": quick_mode(), "budget": budget()}, sort_keys=True
    )
    path = checkpoint_dir(notebook) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.exists() and not force:
        result = torch.load(path, map_location="cpu", weights_only=True)
        print(f"loaded {name} from {path} (trained earlier; set FORCE_RETRAIN=1 or pass force=True to train again)")
        return result, True
    result = train()
    if not isinstance(result, Mapping):
        raise TypeError(f"train() must return a dict, got {type(result).__name__}")
    result = dict(result)
    _check_saveable(result)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.save(result, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    print(f"saved {name} to {path} (a rerun loads it instead of training again)")
    return result, False


def recompute_batchnorm(model: Any, batches: Any, forward: Callable[[Any], Any] | None = None) -> Any:
    """Precise BN: replace every batch-norm layer's running averages by exact averages over `batches`.

    The running averages (momentum 0.1) mostly remember the last ~10 training batches, taken while the
    weights still moved; after a short run they can be far from the statistics of the final weights.
    `batches` is an iterable of inputs, each passed to `forward` (default: the model itself). The
    layers' momentum is restored afterwards; the model is returned in eval mode, ready to evaluate.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the model has no batch-norm layer to recompute")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = a plain cumulative average over the batches below
    model.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            (forward or model)(batch)
            seen += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    if not seen:
        raise ValueError("no batches to recompute the batch-norm statistics from")
    return model.eval()


# ----------------------------------------------------------------------------- Colab
def _canonical(name: str) -> str:
    return "".join("-" if c in "-_." else c for c in name.lower())


def installed_versions() -> dict[str, str]:
    """{canonical distribution name: version} of this interpreter; the first on sys.path wins, as at import."""
    from importlib import metadata

    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(_canonical(name), dist.version)
    return versions


def colab_requirements(extras: Sequence[str], installed: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The pip requirements for `extras` and the constraints that pin every installed package.

    A bare "tf-keras" becomes "tf-keras~=X.Y.0" matched to the installed TensorFlow X.Y (tf-keras must
    match it, and an unmatched one makes pip replace TensorFlow). Extras pinned to another version of
    an installed package are refused: installing them would change Colab's own stack.
    """
    requirements = []
    for extra in extras:
        if not isinstance(extra, str) or not extra.strip():
            raise ValueError(f"COLAB_EXTRAS holds {extra!r}, not a pip requirement")
        name = _canonical(extra.split("==")[0].split("~=")[0].split(">")[0].split("<")[0].strip())
        if name == "tf-keras" and extra.strip() == "tf-keras":
            tf = installed.get("tensorflow") or installed.get("tensorflow-cpu")
            if tf is None:
                raise RuntimeError("tf-keras must match TensorFlow, but no TensorFlow is installed")
            major, minor = tf.split(".")[:2]
            extra = f"tf-keras~={major}.{minor}.0"
        if "==" in extra and name in installed and installed[name] != extra.split("==", 1)[1].strip():
            raise RuntimeError(
                f"COLAB_EXTRAS asks for {extra}, but this runtime has {name} {installed[name]}: installing it would "
                "change a package the runtime already has. Pin the runtime's version or leave it out."
            )
        requirements.append(extra)
    constraints = [f"{name}=={version}" for name, version in sorted(installed.items())]
    return requirements, constraints


def install_colab_extras(extras: Sequence[str]) -> None:
    """pip-install what Colab lacks, with every installed package pinned: pip then can never upgrade or
    downgrade Colab's own torch, numpy, tensorflow, protobuf, ... (it fails loudly instead)."""
    if not extras:
        return
    installed = installed_versions()
    requirements, constraints = colab_requirements(extras, installed)
    missing = [r for r in requirements if _canonical(r.split("=")[0].split("~")[0]) not in installed]
    if not missing:
        return
    fd, constraint_file = tempfile.mkstemp(prefix="colab-constraints.", suffix=".txt")
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(constraints) + "\n")
    try:
        print(f"installing {', '.join(missing)} (Colab's own packages pinned) ...")
        command = [sys.executable, "-m", "pip", "install", "-q", "-c", constraint_file, *missing]
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        Path(constraint_file).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"pip could not install {missing} without changing this runtime's packages:\n{done.stderr[-3000:]}"
        )


# ----------------------------------------------------------------------------- figures
def show_images(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    ncols: int = 6,
    cmap: str = "gray",
    size: float = 2.2,
    suptitle: str | None = None,
):
    """Plot images (H x W, H x W x C, or C x H x W tensors) in a grid; returns the figure."""
    import matplotlib.pyplot as plt

    images = [_to_hwc(img) for img in images]
    if not images:
        raise ValueError("no images to show")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], cmap=cmap if images[i].ndim == 2 else None)
            if titles is not None:
                ax.set_title(titles[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _to_hwc(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D image, got shape {image.shape}")
    return image


# ----------------------------------------------------------------------------- synthetic nuclei
def synthetic_nuclei(
    n_images: int,
    size: int = 128,
    n_cells: tuple[int, int] = (12, 30),
    radius: tuple[float, float] = (5.0, 10.0),
    noise: float = 0.05,
    photons: float | None = 60.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fluorescent nuclei with exact instance masks, for offline counting and denoising.

    Each nucleus is a textured ellipse; neighbours may touch (overlaps are resolved by the
    nearer centre, as cell walls would be). The image is blurred like an optical system, gets an
    uneven illumination background, then Poisson (shot) noise at `photons` per unit intensity
    and Gaussian read noise of std `noise`. Returns images (N, H, W) float32 roughly in [0, 1]
    and instance labels (N, H, W) int32, 0 = background, 1..k the nuclei.
    """
    from scipy import ndimage

    if n_images < 1 or size < 16:
        raise ValueError("need n_images >= 1 and size >= 16")
    if not 0 < radius[0] <= radius[1] or not 0 <= n_cells[0] <= n_cells[1]:
        raise ValueError("radius and n_cells must be increasing (low, high) pairs")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n_images, size, size), np.float32)
    labels = np.zeros((n_images, size, size), np.int32)
    for i in range(n_images):
        k = int(rng.integers(n_cells[0], n_cells[1] + 1))
        centres = rng.uniform(radius[1] * 0.6, size - radius[1] * 0.6, (k, 2))
        a, b = rng.uniform(*radius, k), rng.uniform(*radius, k)
        theta = rng.uniform(0, np.pi, k)
        # elliptic "distance" of every pixel to every nucleus, shape (k, H, W); < 1 = inside
        dy, dx = yy[None] - centres[:, 0, None, None], xx[None] - centres[:, 1, None, None]
        c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        u, v = (c * dx + s * dy) / a[:, None, None], (-s * dx + c * dy) / b[:, None, None]
        dist = np.sqrt(u**2 + v**2)
        nearest = dist.argmin(0)
        inside = dist.min(0) < 1.0
        label = np.where(inside, nearest + 1, 0)
        label = _relabel_consecutive(label)
        brightness = rng.uniform(0.5, 1.0, k + 1)
        texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5)
        texture = 1 + 0.25 * texture / (texture.std() + 1e-8)
        shade = np.clip(1.0 - 0.5 * dist.min(0) ** 2, 0.5, 1.0)  # brighter centres
        clean = np.where(inside, brightness[nearest + 1] * texture * shade, 0.0)
        clean = ndimage.gaussian_filter(clean, 1.0)
        gy, gx = rng.uniform(-0.1, 0.1, 2)
        background = 0.08 + gy * (yy / size - 0.5) + gx * (xx / size - 0.5)
        clean = np.clip(clean + background, 0, None)
        noisy = rng.poisson(clean * photons) / photons if photons else clean
        images[i] = noisy + rng.normal(0, noise, clean.shape)
        labels[i] = label
    return images, labels


def _relabel_consecutive(label: np.ndarray) -> np.ndarray:
    values, inverse = np.unique(label, return_inverse=True)
    if values[0] != 0:  # no background pixel at all
        inverse = inverse + 1
    return inverse.reshape(label.shape).astype(np.int32)


def watershed_instances(
    foreground: np.ndarray,
    markers_from: np.ndarray | None = None,
    min_distance: int = 4,
    min_size: int = 10,
) -> np.ndarray:
    """Split a binary foreground into instances: seeds at the peaks of `markers_from`
    (default: the distance transform of the foreground), watershed on its negative.

    The counting step shared by every method: count = labels.max().
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    foreground = np.asarray(foreground, bool)
    if foreground.ndim != 2:
        raise ValueError(f"foreground must be a 2-D mask, got shape {foreground.shape}")
    foreground = drop_small_objects(foreground, min_size)
    height = ndimage.distance_transform_edt(foreground) if markers_from is None else np.asarray(markers_from, float)
    if height.shape != foreground.shape:
        raise ValueError(f"markers_from has shape {height.shape}, foreground {foreground.shape}")
    components, _ = ndimage.label(foreground)
    peaks = peak_local_max(height, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (tiny or flat) still count as one object
    orphan = np.setdiff1d(np.unique(components[foreground]), np.unique(components[tuple(peaks.T)]))
    for j, comp in enumerate(orphan, start=len(peaks) + 1):
        ys, xs = np.nonzero(components == comp)
        markers[ys[len(ys) // 2], xs[len(xs) // 2]] = j
    return watershed(-height, markers, mask=foreground).astype(np.int32)


def drop_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects smaller than min_size pixels (4-connected, scikit-image's default) from a binary mask.

    Written with scipy because scikit-image renamed the keyword between 0.25 (min_size, Colab) and 0.26
    (max_size, our pins): each version warns about or rejects the other's.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if min_size <= 1:
        return mask
    components, _ = ndimage.label(mask)
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[components]
