"""Metric modules shipped with the package (loadable by path with ``evaluate.load``, offline)."""

import os

ACCURACY_PATH = os.path.join(os.path.dirname(__file__), "accuracy.py")
