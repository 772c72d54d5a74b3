"""The user's cache of rgsd-pipeline: built-in models and weight digests, never a run's artifacts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$RGSD_CACHE_DIR, else ~/.cache/rgsd-pipeline."""
    return Path(os.environ.get("RGSD_CACHE_DIR", Path.home() / ".cache" / "rgsd-pipeline"))
