"""A tqdm progress bar on stderr, fed by the engine's progress callback ``(step, total, message) -> keep going``."""
from __future__ import annotations

import sys


class ProgressBar:
    """tqdm progress bar on stderr fed by the engine's progress callback."""

    def __init__(self, quiet: bool, label: str):
        self.quiet, self.label, self.bar = quiet, label, None

    def __call__(self, step: int, total: int, message: str) -> bool:
        if self.quiet:
            return True
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, file=sys.stderr, unit="step", dynamic_ncols=True)
        self.bar.n = step
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
