"""Tests run the offline quick mode unless the caller chose a mode (QUICK=0 pytest runs full mode)."""

import os

os.environ.setdefault("QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
