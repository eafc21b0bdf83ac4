"""Preemption: SIGTERM or SIGUSR1 (what SLURM and most schedulers send before killing a job) asks the run to stop.

The signal may reach one rank only, so the ranks agree at step boundaries through an all-reduce of a one-element
CPU tensor over a gloo group of its own: no device synchronisation, a few tens of microseconds per step. Every rank
then stops after the same optimizer step; the loop saves a checkpoint and exits with status 0, and
`--resume_from latest` continues the run.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Catches the preemption signals while a run trains; `requested()` is True on every rank once any rank got one."""

    def __init__(self, distributed: bool):
        self.received: int | None = None
        # A CPU group for the flag, so the check never waits on the GPU (under NCCL the default group is on it).
        self.group = dist.new_group(backend="gloo") if distributed and dist.is_initialized() else None
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers in the main thread only
            self.previous = {sig: signal.signal(sig, self._receive) for sig in SIGNALS}

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self) -> bool:
        if self.group is None:
            return self.received is not None
        self.flag.fill_(self.received is not None)
        dist.all_reduce(self.flag, group=self.group)
        return bool(self.flag.item())

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
