"""Tests run the offline quick mode unless the caller chose a mode (QUICK=0 pytest runs full mode).

Notebook kernels inherit this environment. They run single-threaded because pytest runs two of them
at once (-n 2 in pyproject.toml) on a 2-core machine; set OMP_NUM_THREADS yourself to override.
Checkpoints go to a fresh temporary folder, so every test run trains its models before it shows the
reload path (a stale checkpoint in data/ would otherwise hide the training code from the tests).
"""

import os
import tempfile

os.environ.setdefault("QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "CHECKPOINT_DIR" not in os.environ:  # xdist workers inherit the controller's folder
    os.environ["CHECKPOINT_DIR"] = tempfile.mkdtemp(prefix="notebook-checkpoints-")
