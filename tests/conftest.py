"""Shared fixtures."""

from __future__ import annotations

import os
import sys

# Make `tests.tools` importable as `tools` too, for brevity in test modules.
sys.path.insert(0, os.path.dirname(__file__))
