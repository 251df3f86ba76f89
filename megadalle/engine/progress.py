"""A progress bar over the training updates, with the time left (tqdm's ETA), on rank 0 only.

While the bar is shown, the console log handlers (ours, through the root logger, and DeepSpeed's own) write
through `tqdm.write`, so that a readable log line is printed above the bar instead of through it."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

MODES = ("auto", "on", "off")


def progress_enabled(mode: str, rank: int, stream: TextIO | None = None) -> bool:
    """Whether to show a bar: never on ranks other than 0; `auto` only when `stream` (default stderr) is a
    terminal, so that logs redirected to a file get no carriage-return updates."""
    if mode not in MODES:
        raise ValueError(f"logging.progress must be one of {list(MODES)}, got {mode!r}")
    if rank != 0 or mode == "off":
        return False
    if mode == "on":
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """`Progress(mode, total, initial, desc, rank)`, then `update(step, loss)` after each update and `close()`
    (or use it as a context manager). Does nothing when disabled."""

    def __init__(
        self, mode: str, total: int, initial: int = 0, desc: str = "", rank: int = 0, stream: TextIO | None = None
    ) -> None:
        self.enabled = progress_enabled(mode, rank, stream)
        self._bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()
        if not self.enabled:
            return
        loggers = [logging.root, logging.getLogger("DeepSpeed")]  # DeepSpeed's logger does not propagate
        self._redirect.enter_context(logging_redirect_tqdm(loggers=loggers))
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            file=sys.stderr if stream is None else stream,
            dynamic_ncols=True,
            smoothing=0.1,  # the ETA follows recent step times (evaluations and checkpoints make them uneven)
        )

    def update(self, step: int, loss: float | None = None) -> None:
        """The bar moved to `step` (updates done so far), the latest training loss in the postfix."""
        if self._bar is None:
            return
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()  # the console handlers as they were

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
