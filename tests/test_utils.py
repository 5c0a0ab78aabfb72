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
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    for variable in ("BUDGET", "FORCE_RETRAIN", "ALLOW_LONG_RUN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(utils, "_FORM", {})
    monkeypatch.setattr(utils, "_SCALED", {})
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


def test_the_form_field_decides_when_the_environment_is_silent(monkeypatch):
    monkeypatch.delenv("QUICK")
    utils.choose_mode("quick", 1)
    assert utils.quick_mode() is True
    utils.choose_mode("full", 1)
    assert utils.quick_mode() is False


@pytest.mark.parametrize("env, form, expected", [("1", "full", True), ("0", "quick", False)])
def test_an_explicit_quick_in_the_environment_wins_over_the_form(monkeypatch, env, form, expected):
    monkeypatch.setenv("QUICK", env)
    utils.choose_mode(form, 1)
    assert utils.quick_mode() is expected


@pytest.mark.parametrize("mode", ["Quick", "fast", "", None])
def test_choose_mode_rejects_unknown_modes(mode):
    with pytest.raises(ValueError, match="MODE must be"):
        utils.choose_mode(mode, 1)


def test_budget_comes_from_the_environment_then_the_form_then_one(monkeypatch):
    assert utils.budget() == 1.0
    utils.choose_mode("full", 0.25)
    assert utils.budget() == 0.25
    monkeypatch.setenv("BUDGET", "0.5")
    assert utils.budget() == 0.5
    monkeypatch.setenv("QUICK", "1")
    assert utils.budget() == 1.0  # quick mode runs its own fixed budget


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", ""])
def test_bad_budget_in_the_environment_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("BUDGET", value)
    if value == "":  # empty means unset
        assert utils.budget() == 1.0
        return
    with pytest.raises(ValueError, match="positive number"):
        utils.budget()


@pytest.mark.parametrize("value", [0, -0.5, "ten", True, float("nan"), None])
def test_bad_budget_in_the_form_is_a_clear_error(value):
    with pytest.raises(ValueError, match="positive number"):
        utils.choose_mode("full", value)


def test_pick_scales_training_lengths_by_the_budget(monkeypatch, capsys):
    table = {
        "epochs": {"full": 30, "quick": 2},
        "lr": {"full": 1e-3, "quick": 1e-2},
        "steps": {"full": (100, 3), "quick": (10, 1)},
        "seconds": {"full": 60.0, "quick": 5.0},
        "size": {"full": 512, "quick": 64},
    }
    monkeypatch.setenv("BUDGET", "0.1")
    picked = utils.pick(table, scale=["epochs", "steps", "seconds"])
    assert picked == {"epochs": 3, "lr": 1e-3, "steps": (10, 1), "seconds": pytest.approx(6.0), "size": 512}
    assert "epochs 30 -> 3" in capsys.readouterr().out
    path = utils.save_results("scaled", {"x": 1}, dataset="d")
    record = json.loads(path.read_text())
    assert record["budget"] == 0.1 and record["budget_scaled"]["epochs"] == {"full": 30, "used": 3}
    monkeypatch.setenv("QUICK", "1")
    assert utils.pick(table, scale=["epochs"])["epochs"] == 2  # quick mode is never scaled


def test_pick_never_scales_a_length_to_zero(monkeypatch):
    monkeypatch.setenv("BUDGET", "0.001")
    assert utils.pick({"epochs": {"full": 20, "quick": 1}}, scale=["epochs"]) == {"epochs": 1}


def test_pick_scale_errors():
    table = {"epochs": {"full": 30, "quick": 2}, "name": {"full": "a", "quick": "b"}}
    with pytest.raises(KeyError, match="steps"):
        utils.pick(table, scale=["steps"])
    with pytest.raises(TypeError, match="list of row names"):
        utils.pick(table, scale="epochs")
    utils.choose_mode("full", 0.5)
    with pytest.raises(TypeError, match="not a number"):
        utils.pick(table, scale=["name"])


def test_announce_run_prints_mode_device_and_expected_time(capsys, monkeypatch):
    minutes = {"quick": 2, "full_gpu": 20, "full_cpu": 20}
    assert utils.announce_run(minutes, device="cpu") == 20
    out = capsys.readouterr().out
    assert "mode: full" in out and "device: cpu" in out and "about 20 min" in out
    assert utils.announce_run({**minutes, "full_cpu": 600}, device="cuda") == 20
    monkeypatch.setenv("QUICK", "1")
    assert utils.announce_run(minutes, device="cpu") == 2
    assert "from QUICK in the environment" in capsys.readouterr().out


def test_full_mode_on_a_cpu_refuses_hours_of_work(monkeypatch, capsys):
    minutes = {"quick": 2, "full_gpu": 20, "full_cpu": 300}
    with pytest.raises(RuntimeError) as err:
        utils.announce_run(minutes, device="cpu")
    message = str(err.value)
    assert "5.0 h" in message and "T4 GPU" in message and "MODE = 'quick'" in message and "BUDGET = 0.066" in message
    monkeypatch.setenv("BUDGET", "0.066")  # the budget the message proposes fits
    assert utils.announce_run(minutes, device="cpu") == pytest.approx(19.8)
    assert "not the full-mode results" in capsys.readouterr().out
    monkeypatch.setenv("BUDGET", "1")
    monkeypatch.setenv("ALLOW_LONG_RUN", "1")
    assert utils.announce_run(minutes, device="cpu") == 300


def test_work_that_the_budget_does_not_shorten_is_counted(monkeypatch):
    minutes = {"quick": 2, "full_gpu": 20, "full_cpu": 310, "full_cpu_fixed": 10}
    with pytest.raises(RuntimeError, match="BUDGET = 0.033"):
        utils.announce_run(minutes, device="cpu")
    monkeypatch.setenv("BUDGET", "0.033")
    assert utils.announce_run(minutes, device="cpu") == pytest.approx(19.9)
    with pytest.raises(RuntimeError, match="no BUDGET helps"):
        utils.announce_run({**minutes, "full_cpu_fixed": 200}, device="cpu")
    with pytest.raises(ValueError, match="full_cpu_fixed"):
        utils.announce_run({**minutes, "full_cpu_fixed": 400}, device="cpu")


def test_announce_run_needs_every_estimate():
    with pytest.raises(KeyError, match="full_cpu"):
        utils.announce_run({"quick": 1, "full_gpu": 2}, device="cpu")


def test_single_thread_cpu_sets_one_thread_on_a_cpu_only():
    before = torch.get_num_threads()
    try:
        utils.single_thread_cpu(torch.device("cuda"))
        assert torch.get_num_threads() == before
        utils.single_thread_cpu(torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


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


def test_results_are_readable_by_everyone_and_carry_summary_rows():
    path = utils.save_results("nb", {"acc": 0.5}, dataset="d", summary=[["accuracy", "0.50"]])
    assert path.stat().st_mode & 0o777 == 0o644
    assert json.loads(path.read_text())["summary"] == [["accuracy", "0.50"]]
    with pytest.raises(ValueError, match="summary"):
        utils.save_results("nb", {"acc": 0.5}, dataset="d", summary=[["accuracy", 0.5]])


# ----------------------------------------------------------------------------- checkpoints
def _trainer(calls, value=1.0):
    def train():
        calls.append(1)
        return {"model": {"w": torch.full((2, 2), value)}, "history": {"loss": [1.0, 0.5]}, "note": "x"}

    return train


def test_train_or_load_trains_once_then_loads(tmp_path, capsys):
    calls = []
    first, loaded = utils.train_or_load("nb01", "unet", _trainer(calls), config={"steps": 5})
    assert not loaded and calls == [1] and "saved unet" in capsys.readouterr().out
    again, loaded = utils.train_or_load("nb01", "unet", _trainer(calls, 2.0), config={"steps": 5})
    assert loaded and calls == [1] and torch.equal(again["model"]["w"], first["model"]["w"])
    assert again["history"] == {"loss": [1.0, 0.5]} and "FORCE_RETRAIN=1" in capsys.readouterr().out
    saved = list((tmp_path / "checkpoints" / "nb01").glob("unet-*.pt"))
    assert len(saved) == 1 and saved[0].stat().st_mode & 0o777 == 0o644


def test_train_or_load_retrains_when_forced_or_the_config_changes(monkeypatch):
    calls = []
    utils.train_or_load("nb", "m", _trainer(calls), config={"steps": 5})
    utils.train_or_load("nb", "m", _trainer(calls), config={"steps": 6})
    assert len(calls) == 2
    result, loaded = utils.train_or_load("nb", "m", _trainer(calls, 3.0), config={"steps": 5}, force=True)
    assert not loaded and len(calls) == 3
    monkeypatch.setenv("FORCE_RETRAIN", "1")
    utils.train_or_load("nb", "m", _trainer(calls), config={"steps": 5})
    assert len(calls) == 4
    monkeypatch.delenv("FORCE_RETRAIN")
    result, loaded = utils.train_or_load("nb", "m", _trainer(calls), config={"steps": 5})
    assert loaded and result["model"]["w"][0, 0] == 1.0  # the forced retrain overwrote the file


def test_train_or_load_keeps_quick_and_full_mode_apart(monkeypatch):
    calls = []
    utils.train_or_load("nb", "m", _trainer(calls))
    monkeypatch.setenv("QUICK", "1")
    utils.train_or_load("nb", "m", _trainer(calls))
    assert len(calls) == 2


def test_train_or_load_refuses_what_it_cannot_reload_and_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match="numpy"):
        utils.train_or_load("nb", "m", lambda: {"weights": np.zeros(3)})
    with pytest.raises(TypeError, match="must return a dict"):
        utils.train_or_load("nb", "m", lambda: [torch.zeros(3)])
    with pytest.raises(ValueError, match="name"):
        utils.train_or_load("nb", "bad/name", lambda: {})
    with pytest.raises(ValueError, match="notebook"):
        utils.train_or_load("../nb", "m", lambda: {})
    assert leftovers(tmp_path / "checkpoints" / "nb") == []


def test_checkpoints_default_to_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("CHECKPOINT_DIR")
    assert utils.checkpoint_dir("nb") == tmp_path / "data" / "checkpoints" / "nb"


def test_recompute_batchnorm_gives_the_exact_statistics_of_the_final_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    data = torch.randn(60, 3) * 2 + 1
    model.train()
    for _ in range(5):  # running averages that lag behind
        model(torch.randn(8, 3))
    out = utils.recompute_batchnorm(model, data.split(20))
    hidden = model[0](data).detach()
    assert out is model and not model.training and model[1].momentum == 0.1
    assert torch.allclose(model[1].running_mean, hidden.mean(0), atol=1e-5)
    calls = []
    utils.recompute_batchnorm(model, [data], forward=lambda b: calls.append(b.shape) or model(b))
    assert calls == [(60, 3)]


def test_recompute_batchnorm_refuses_models_without_batch_norm_and_empty_data():
    with pytest.raises(ValueError, match="no batch-norm"):
        utils.recompute_batchnorm(torch.nn.Linear(3, 4), [torch.zeros(2, 3)])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="no batches"):
        utils.recompute_batchnorm(model, [])
    assert model[1].momentum == 0.1


# ----------------------------------------------------------------------------- Colab extras
def test_colab_requirements_match_tf_keras_to_tensorflow_and_pin_everything():
    installed = {"tensorflow": "2.20.0", "numpy": "2.1.3", "protobuf": "5.29.6"}
    requirements, constraints = utils.colab_requirements(["tf-keras", "n2v==0.3.3"], installed)
    assert requirements == ["tf-keras~=2.20.0", "n2v==0.3.3"]
    assert constraints == ["numpy==2.1.3", "protobuf==5.29.6", "tensorflow==2.20.0"]


def test_colab_requirements_refuse_to_change_a_runtime_package():
    with pytest.raises(RuntimeError, match="numpy 2.1.3"):
        utils.colab_requirements(["numpy==2.4.6"], {"numpy": "2.1.3"})
    with pytest.raises(RuntimeError, match="no TensorFlow"):
        utils.colab_requirements(["tf-keras"], {"numpy": "2.1.3"})
    with pytest.raises(ValueError, match="not a pip requirement"):
        utils.colab_requirements([""], {})


def test_install_colab_extras_does_nothing_when_all_is_there(monkeypatch):
    monkeypatch.setattr(utils.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    utils.install_colab_extras([])
    utils.install_colab_extras([f"numpy=={np.__version__}"])


def test_installed_versions_sees_this_environment():
    versions = utils.installed_versions()
    assert versions["numpy"] == np.__version__ and "scikit-learn" in versions


def test_drop_small_objects_matches_scikit_image():
    from skimage.morphology import remove_small_objects

    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((48, 48)) > 0.55
        for size in (2, 5, 12):
            expected = remove_small_objects(mask, max_size=size - 1)  # scikit-image 0.26 (our pins)
            assert np.array_equal(utils.drop_small_objects(mask, size), expected)
    assert np.array_equal(utils.drop_small_objects(mask, 1), mask)


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
