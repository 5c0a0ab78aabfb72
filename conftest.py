"""Tests run the offline quick mode unless the caller chose a mode (QUICK=0 pytest runs full mode).

Notebook kernels inherit this environment. They run single-threaded because pytest runs two of them
at once (-n 2 in pyproject.toml) on a 2-core machine; set OMP_NUM_THREADS yourself to override.
"""

import os

os.environ.setdefault("QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
