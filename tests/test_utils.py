"""Unit tests of utils.py, failure paths included. Downloads go to a local server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import random
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import utils

matplotlib.use("Agg")

PAYLOAD = b"cells and nuclei\n" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


# ----------------------------------------------------------------------------- a local server
class Handler(BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        Handler.requests.append(self.path)
        if self.path == "/ok":
            self._send(PAYLOAD)
        elif self.path == "/error":
            self.send_error(500, "server fell over")
        elif self.path == "/slow":
            time.sleep(3)
            self._send(PAYLOAD)
        elif self.path == "/truncated":  # promises more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD) * 2))
            self.end_headers()
            self.wfile.write(PAYLOAD)
            self.close_connection = True
        else:
            self.send_error(404, "no such file")

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that time out on purpose break the pipe
        pass


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def full_mode(monkeypatch, tmp_path):
    """Each test starts in full mode with its own data and results folders."""
    monkeypatch.setenv("QUICK", "0")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    Handler.requests.clear()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- modes and setup
@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_quick_mode_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("QUICK", value)
    assert utils.quick_mode() is expected


def test_quick_mode_unset_is_full_mode(monkeypatch):
    monkeypatch.delenv("QUICK")
    assert utils.quick_mode() is False


def test_quick_mode_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("QUICK", "maybe")
    with pytest.raises(ValueError, match="QUICK=1"):
        utils.quick_mode()


def test_pick_selects_the_column_of_the_mode(monkeypatch):
    table = {"epochs": {"full": 30, "quick": 2}, "size": {"full": 512, "quick": 64}}
    assert utils.pick(table) == {"epochs": 30, "size": 512}
    monkeypatch.setenv("QUICK", "1")
    assert utils.pick(table) == {"epochs": 2, "size": 64}


def test_pick_names_rows_without_the_column():
    with pytest.raises(KeyError, match="epochs"):
        utils.pick({"epochs": {"quick": 2}})


def test_set_seed_makes_every_generator_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    utils.set_seed(123)
    first = draw()
    utils.set_seed(123)
    assert draw() == first
    utils.set_seed(124)
    assert draw() != first


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "7", True, None])
def test_set_seed_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        utils.set_seed(seed)


def test_get_device_defaults_to_the_best_available():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert utils.get_device().type == expected
    assert utils.get_device("cpu") == torch.device("cpu")


def test_get_device_rejects_unknown_and_unavailable_devices():
    with pytest.raises(ValueError, match="prefer"):
        utils.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            utils.get_device("cuda")


def test_data_and_results_dirs_follow_the_environment(tmp_path):
    assert utils.data_dir() == tmp_path / "data"
    assert utils.data_dir("cells", "raw") == tmp_path / "data" / "cells" / "raw"
    assert (tmp_path / "data" / "cells" / "raw").is_dir()
    assert utils.results_dir() == tmp_path / "results" and (tmp_path / "results").is_dir()


def test_dirs_default_to_the_repository(monkeypatch):
    monkeypatch.delenv("DATA_DIR")
    monkeypatch.delenv("RESULTS_DIR")
    assert utils.data_dir() == utils.REPO_ROOT / "data"
    assert utils.results_dir() == utils.REPO_ROOT / "results"


# ----------------------------------------------------------------------------- download
def test_download_fetches_and_checks_sha256(server, tmp_path):
    dest = utils.download(f"{server}/ok", tmp_path / "d" / "file.bin", sha256=SHA, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["file.bin"]  # no temporary file left behind


def test_download_accepts_md5(server, tmp_path):
    dest = utils.download(f"{server}/ok", tmp_path / "file.bin", md5=MD5.upper(), timeout=5)
    assert dest.read_bytes() == PAYLOAD


def test_download_is_local_first(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(PAYLOAD)
    assert utils.download(f"{server}/ok", dest, sha256=SHA) == dest
    assert Handler.requests == []  # a good local copy means no request at all


def test_download_refuses_a_local_file_with_the_wrong_checksum(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"another version")
    with pytest.raises(utils.DownloadError, match="does not match"):
        utils.download(f"{server}/ok", dest, sha256=SHA)
    assert dest.read_bytes() == b"another version"  # a user's file is never overwritten silently


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    with pytest.raises(utils.DownloadError, match="expected"):
        utils.download(f"{server}/ok", tmp_path / "file.bin", sha256="0" * 64, timeout=5)
    assert leftovers(tmp_path) == []


def test_server_error_names_the_url_and_leaves_no_file(server, tmp_path):
    with pytest.raises(utils.DownloadError, match=r"HTTP 500.*by hand from http://127\.0\.0\.1"):
        utils.download(f"{server}/error", tmp_path / "file.bin", timeout=5)
    assert leftovers(tmp_path) == []


def test_missing_file_on_server(server, tmp_path):
    with pytest.raises(utils.DownloadError, match="HTTP 404"):
        utils.download(f"{server}/nothing", tmp_path / "file.bin", timeout=5)


def test_timeout_is_a_clear_error(server, tmp_path):
    start = time.perf_counter()
    with pytest.raises(utils.DownloadError, match="could not reach"):
        utils.download(f"{server}/slow", tmp_path / "file.bin", timeout=0.5)
    assert time.perf_counter() - start < 2.5
    assert leftovers(tmp_path) == []


def test_interrupted_download_leaves_no_file(server, tmp_path):
    with pytest.raises(utils.DownloadError):
        utils.download(f"{server}/truncated", tmp_path / "file.bin", timeout=5)
    assert leftovers(tmp_path) == []


def test_no_network_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(utils.DownloadError, match="offline"):
        utils.download(f"http://127.0.0.1:{port}/file", tmp_path / "file.bin", timeout=2)
    assert leftovers(tmp_path) == []


def test_download_caps_the_size(server, tmp_path):
    with pytest.raises(utils.DownloadError, match="more than"):
        utils.download(f"{server}/ok", tmp_path / "file.bin", max_bytes=100, timeout=5)
    assert leftovers(tmp_path) == []


def test_quick_mode_never_downloads(server, tmp_path, monkeypatch):
    monkeypatch.setenv("QUICK", "1")
    with pytest.raises(utils.DownloadError, match="quick mode"):
        utils.download(f"{server}/ok", tmp_path / "file.bin")
    assert Handler.requests == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"url": "ftp://example.org/x"}, "http"),
        ({"url": "data.zip"}, "http"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -3}, "timeout"),
        ({"sha256": "abc"}, "64 hex"),
        ({"md5": "z" * 32}, "32 hex"),
        ({"sha256": SHA, "md5": MD5}, "not both"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_download_rejects_bad_arguments(tmp_path, kwargs, message):
    call = {"url": "http://127.0.0.1:9/x", "dest": tmp_path / "file.bin", **kwargs}
    with pytest.raises(ValueError, match=message):
        utils.download(**call)
    assert leftovers(tmp_path) == []


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert utils.file_digest(path) == SHA and utils.file_digest(path, "md5") == MD5


# ----------------------------------------------------------------------------- archives
def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make", [make_zip, make_tar])
def test_extract_archive_unpacks(tmp_path, make):
    archive = make(tmp_path / "a.arc", {"set/train.txt": b"1", "set/test.txt": b"2"})
    out = utils.extract_archive(archive, tmp_path / "out")
    assert (out / "set" / "train.txt").read_bytes() == b"1" and (out / "set" / "test.txt").read_bytes() == b"2"
    assert leftovers(tmp_path) == ["a.arc", "out"]  # no staging folder left


@pytest.mark.parametrize("make", [make_zip, make_tar])
def test_extract_archive_refuses_path_traversal(tmp_path, make):
    archive = make(tmp_path / "evil.arc", {"ok.txt": b"1", "../escaped.txt": b"2"})
    with pytest.raises(ValueError, match="outside|unsafe"):
        utils.extract_archive(archive, tmp_path / "out")
    assert leftovers(tmp_path) == ["evil.arc"]  # neither the escaped file nor a partial tree


def test_extract_archive_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        utils.extract_archive(tmp_path / "missing.zip", tmp_path / "out")
    (tmp_path / "plain.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="neither"):
        utils.extract_archive(tmp_path / "plain.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- notices, timing, results
def test_announce_data_is_loud_for_stand_ins(capsys):
    utils.announce_data("synthetic nuclei", real=False, reason="no internet in quick mode")
    out = capsys.readouterr().out
    assert "OFFLINE STAND-IN" in out and "NOT comparable" in out and "no internet" in out
    utils.announce_data("BSD68", real=True)
    assert "real data set" in capsys.readouterr().out


def test_timer_measures_wall_time(capsys):
    with utils.Timer("nap", verbose=True) as t:
        time.sleep(0.05)
    assert 0.04 < t.seconds < 1.0
    assert "nap:" in capsys.readouterr().out


def test_save_results_writes_context_and_metrics(monkeypatch):
    monkeypatch.setenv("QUICK", "1")
    path = utils.save_results(
        "00_demo",
        {"psnr": np.float32(28.5), "counts": np.array([1, 2]), "loss": torch.tensor(0.25), "ap": float("nan")},
        dataset="synthetic",
        epochs=3,
    )
    record = json.loads(path.read_text())
    assert path.parent == utils.results_dir() and path.name == "00_demo.json"
    assert record["mode"] == "quick" and record["dataset"] == "synthetic" and record["epochs"] == 3
    assert record["device"].startswith(utils.get_device().type) and record["runtime_s"] >= 0
    assert record["metrics"] == {"psnr": 28.5, "counts": [1, 2], "loss": 0.25, "ap": None}


@pytest.mark.parametrize(
    "name, metrics, context, error, message",
    [
        ("00_demo", {"a": 1}, {}, ValueError, "dataset"),
        ("../escape", {"a": 1}, {"dataset": "x"}, ValueError, "name"),
        ("", {"a": 1}, {"dataset": "x"}, ValueError, "name"),
        ("00_demo", {}, {"dataset": "x"}, ValueError, "non-empty"),
        ("00_demo", [1, 2], {"dataset": "x"}, ValueError, "mapping"),
        ("00_demo", {"a": object()}, {"dataset": "x"}, TypeError, "JSON"),
    ],
)
def test_save_results_rejects_bad_input_and_writes_nothing(name, metrics, context, error, message):
    with pytest.raises(error, match=message):
        utils.save_results(name, metrics, **context)
    assert leftovers(utils.results_dir()) == []


def test_show_images_draws_a_grid():
    images = [np.zeros((8, 8)), torch.rand(3, 8, 8), np.ones((8, 8, 3)), torch.rand(1, 8, 8)]
    fig = utils.show_images(images, titles=list("abcd"), ncols=3)
    assert len(fig.axes) == 6  # 2 rows x 3 columns, the two spare axes hidden
    assert [ax.get_title() for ax in fig.axes[:4]] == list("abcd")
    matplotlib.pyplot.close(fig)


def test_show_images_rejects_bad_input():
    with pytest.raises(ValueError, match="no images"):
        utils.show_images([])
    with pytest.raises(ValueError, match="titles"):
        utils.show_images([np.zeros((4, 4))], titles=["a", "b"])
    with pytest.raises(ValueError, match="2-D or 3-D"):
        utils.show_images([np.zeros(4)])
    with pytest.raises(ValueError, match="ncols"):
        utils.show_images([np.zeros((4, 4))], ncols=0)


# ----------------------------------------------------------------------------- synthetic nuclei and counting
def test_synthetic_nuclei_are_reproducible_with_exact_labels():
    images, labels = utils.synthetic_nuclei(3, size=64, n_cells=(5, 9), seed=7)
    again, _ = utils.synthetic_nuclei(3, size=64, n_cells=(5, 9), seed=7)
    assert images.shape == labels.shape == (3, 64, 64)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, again)
    for label in labels:
        ids = np.unique(label)
        np.testing.assert_array_equal(ids, np.arange(ids.size))  # consecutive, 0 = background
        assert 1 <= ids.max() <= 9
    # nuclei are brighter than background, so the images carry the labels' information
    assert images[labels > 0].mean() > images[labels == 0].mean() + 0.2


def test_synthetic_nuclei_rejects_bad_arguments():
    with pytest.raises(ValueError):
        utils.synthetic_nuclei(0)
    with pytest.raises(ValueError):
        utils.synthetic_nuclei(1, radius=(8, 4))


def test_watershed_splits_touching_nuclei():
    yy, xx = np.mgrid[0:40, 0:60]
    two_disks = ((yy - 20) ** 2 + (xx - 20) ** 2 < 100) | ((yy - 20) ** 2 + (xx - 37) ** 2 < 100)
    speck = (yy == 2) & (xx == 2)  # smaller than min_size: removed, not counted
    labels = utils.watershed_instances(two_disks | speck, min_distance=5, min_size=10)
    assert labels.max() == 2
    assert labels[20, 20] != labels[20, 37] and labels[2, 2] == 0


def test_watershed_counts_objects_without_a_peak():
    mask = np.zeros((20, 20), bool)
    mask[5:8, 5:8] = True  # a flat square whose distance transform has a plateau
    assert utils.watershed_instances(mask, min_size=1).max() == 1


def test_watershed_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        utils.watershed_instances(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        utils.watershed_instances(np.zeros((4, 4)), markers_from=np.zeros((5, 5)))
