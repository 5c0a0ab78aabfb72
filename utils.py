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
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent
# The one place the repository's address is written; tests check that README badges and
# notebook set-up cells agree with it.
REPO_URL = "https://github.com/dl-project-notebooks/project-notebooks"

_IMPORTED_AT = time.perf_counter()  # a notebook imports utils first, so this times the notebook
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


# ----------------------------------------------------------------------------- modes and setup
def quick_mode() -> bool:
    """True when QUICK is set: small offline data, tiny budget, never the network."""
    value = os.environ.get("QUICK", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"QUICK={value!r} is not understood: use QUICK=1 (quick mode) or QUICK=0 (full mode).")


def pick(config: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Select one column of a {setting: {"full": ..., "quick": ...}} config table."""
    column = "quick" if quick_mode() else "full"
    missing = [key for key, row in config.items() if column not in row]
    if missing:
        raise KeyError(f"config rows without a {column!r} value: {missing}")
    return {key: row[column] for key, row in config.items()}


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

    Pass `dataset=` and anything else a reader needs to interpret the numbers. The file is
    written atomically, so a crash never leaves half a JSON document.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("metrics must be a non-empty mapping of names to values")
    if "dataset" not in context:
        raise ValueError("say which data set the numbers come from: save_results(..., dataset=...)")
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
        **_jsonable(context),
        "metrics": _jsonable(metrics),
    }
    path = results_dir() / f"{name}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=2, allow_nan=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


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
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    foreground = np.asarray(foreground, bool)
    if foreground.ndim != 2:
        raise ValueError(f"foreground must be a 2-D mask, got shape {foreground.shape}")
    foreground = remove_small_objects(foreground, max_size=min_size - 1) if min_size > 1 else foreground
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
