"""Graceful stops: SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) end the run cleanly.

The first signal only sets a flag; the engine sees it after the current optimizer step, saves a
checkpoint and raises :class:`Stopped`, which the tracking marks KILLED and the CLI turns into
exit status 128 + signal number. A second signal falls back to the default action (immediate
exit), so an impatient user is never stuck.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Optional

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: Optional[int] = None
_stopped_by: Optional[int] = None  # the signal that stopped a job of this process, kept to its exit


class Stopped(BaseException):
    """Training stopped on a signal after saving ``checkpoint`` at ``step``.

    A ``BaseException``, like ``KeyboardInterrupt``: library code that catches ``Exception``
    (a tokenizer callback, a data loader) must not swallow a stop request.
    """

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        global _stopped_by
        _stopped_by = signum  # for a sweep's parent run, ended at exit (see stopped_by)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}")


def stopped_by() -> Optional[int]:
    """The signal that stopped a job of this process, if one did (Ctrl-C before training included)."""
    if _stopped_by is None and isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
        return signal.SIGINT  # an uncaught KeyboardInterrupt, as seen by exit handlers
    return _stopped_by


def requested() -> Optional[int]:
    """The signal number received since :func:`graceful_stop` began, if any."""
    return _requested


def _on_signal(signum: int, frame) -> None:
    global _requested
    _requested = signum
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)  # a second signal stops at once
    log.warning("%s received: stopping after the current step (send it again to stop at once)",
                signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_terminate() -> Iterator[None]:
    """Before training (data, model loading) there is nothing to checkpoint: SIGTERM raises
    :class:`Stopped` at once, as Ctrl-C raises KeyboardInterrupt, so the MLflow run still ends
    KILLED instead of being left RUNNING. :func:`graceful_stop` takes over during training."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stopped(signum: int, frame) -> None:
        raise Stopped(signum, 0, None)

    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM request a stop instead of raising at a random line."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. a threaded launcher)
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _requested = None
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested = None
