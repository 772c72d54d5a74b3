"""A progress bar that also shows tokens per second; engines call it as their `on_progress`."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

SHOWN = {"bars": True}  # off on the ranks of a data-parallel job other than the main one


def hide_bars() -> None:
    """No progress bars from this process (one rank's bars stand for all)."""
    SHOWN["bars"] = False


class TokenProgress:
    def __init__(self, total: int, unit: str):
        # Redraw often on a terminal, every 10 s in a log file (Slurm, CI).
        self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 10,
                        disable=not SHOWN["bars"])
        self.started = time.perf_counter()
        self.tokens = 0

    def __call__(self, items: int, new_tokens: int) -> None:
        self.tokens += new_tokens
        self.bar.update(items)
        if self.tokens:  # stages that count items only (judge calls) show no rate of tokens
            self.bar.set_postfix(tok_s=f"{self.tokens / (time.perf_counter() - self.started):.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
