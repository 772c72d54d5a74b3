"""Benchmark: what fingerprints that see the weights cost.

    python bench/fingerprint.py [--gb 1.0]

Writes a weights file of --gb gigabytes (random bytes in a safetensors container), then measures, side by
side in this run: reading it (the floor any hash pays), hashing it the first time (sha256, streamed), and
fingerprinting the folder again (digest from the cache, no read). Prints seconds per GB and the ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    args = parser.parse_args()

    import numpy as np
    import torch
    from common import record
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RGSD_CACHE_DIR"] = str(Path(tmp) / "cache")
        from rgsd_pipeline.fingerprints import model_fingerprint

        folder = Path(tmp) / "model"
        folder.mkdir()
        elements = int(args.gb * 2**30 / 4)
        weights = torch.from_numpy(np.random.default_rng(0).standard_normal(elements, dtype=np.float32))
        save_file({"weight": weights}, folder / "model.safetensors")
        (folder / "config.json").write_text("{}")
        gigabytes = (folder / "model.safetensors").stat().st_size / 2**30

        started = time.perf_counter()
        with open(folder / "model.safetensors", "rb") as f:
            while f.read(1 << 20):
                pass
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        first = model_fingerprint(folder)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        again = model_fingerprint(folder)
        cached_s = time.perf_counter() - started
        assert first == again
    record("fingerprint weights", {"gigabytes": gigabytes, "read_s_per_gb": read_s / gigabytes,
                                   "first_fingerprint_s_per_gb": first_s / gigabytes,
                                   "hash_over_read": first_s / read_s, "cached_fingerprint_s": cached_s})


if __name__ == "__main__":
    main()
