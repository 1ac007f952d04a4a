"""Graceful pre-emption: SIGTERM / SIGUSR1 / SIGINT ask the loop to finish its step, checkpoint and exit 0.

Slurm (`#SBATCH --signal=USR1@120` or `TERM`) and Kubernetes (SIGTERM, then SIGKILL after the termination grace
period) both warn a job before killing it, and Ctrl-C in a terminal sends SIGINT: each would otherwise lose every
step since the last checkpoint. The first signal only sets a flag the loop reads at the step boundary; a second
signal means "now": the default action runs at once (the process dies by that signal; for SIGINT that is what a
second Ctrl-C does), so an operator is never stuck behind a long save.

    with PreemptionGuard() as guard:
        while ...:
            step()
            if guard.should_stop(all_reduce):   # every rank agrees, so all ranks save the same step
                save(); break
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = tuple(s for s in (getattr(signal, name, None) for name in ("SIGTERM", "SIGUSR1", "SIGINT")) if s is not None)


class PreemptionGuard:
    """Installs the handlers on enter (main thread only; elsewhere it is inert) and restores the old ones on exit."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self.exit_now(signum)
            return
        self.received = signum
        print(f"{signal.Signals(signum).name} received: finishing this step, then checkpointing and exiting "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def exit_now(self, signum: int) -> None:
        """Second signal: die by it right away, as if no handler had been installed."""
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def should_stop(self, all_reduce_max=None) -> bool:
        """True once any rank got a signal; `all_reduce_max(flag: int) -> int` makes every rank agree."""
        flag = int(self.received is not None)
        return bool(all_reduce_max(flag) if all_reduce_max is not None else flag)
