"""Preemption: SIGTERM or SIGUSR1 (what SLURM, Kubernetes and most schedulers send before killing a job), or Ctrl-C,
asks the run to stop.

The signal may reach one rank only, so the ranks agree at step boundaries through an all-reduce of a one-element
CPU tensor over a gloo group of its own: no device synchronisation, a few tens of microseconds per step. Every rank
then stops after the same optimizer step; the loop saves a checkpoint and exits with status 0, and
`--resume_from latest` continues the run.

Through a launcher the signal reaches the whole process tree. `accelerate launch` (one process: a subprocess) sends
SIGTERM to its child and all the child's descendants, waits 5 s, then SIGKILLs them; torchrun's agent (several
processes: it runs inside the `accelerate launch` process) sends the signal it got to each rank's session, DataLoader
workers included, and waits 30 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) before SIGKILL. The launcher itself then exits
with 128 + the signal number whatever the ranks did. So that the workers do not die first and crash the rank, they
ignore the stop signals (`ignore_stop_signals_in_worker`, the framework's loaders' `worker_init_fn`) and end with
their rank (torch's worker watchdog). A rank whose launcher dies (SIGKILL, OOM killer) gets SIGTERM from the kernel
(`exit_with_launcher`, Linux): it stops the same way instead of training on with nobody to report to.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Preemption signals: the first one asks for a graceful stop, later ones change nothing."""
STOP_SIGNALS = (*SIGNALS, signal.SIGINT)
"""Everything that stops a run gracefully: SIGINT (Ctrl-C) too, whose second press aborts (KeyboardInterrupt)."""
INTERRUPT_MESSAGE = "interrupt: stopping after this step with a checkpoint; press Ctrl-C again to abort\n"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT = os.getppid()  # the launcher, for a rank it started: read when the recipe imports the framework


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """`worker_init_fn` of a DataLoader: its worker ignores SIGINT, SIGUSR1, and SIGTERM from anyone but its parent.

    A launcher, a scheduler or Ctrl-C sends those signals to the whole process tree; a worker that died of one would
    crash its training process ("DataLoader worker ... is killed by signal: Terminated") before the graceful stop.
    SIGTERM from the training process itself (multiprocessing's `terminate()`, how persistent workers are ended at
    exit) still ends the worker, as torch's own worker handler does: a thread of the worker waits for SIGTERM
    (`sigwaitinfo`, which names the sender) and exits if its parent sent it. Off Linux (no `sigwaitinfo`) SIGTERM is
    left to torch's handler. Otherwise the worker ends with its training process as usual (and torch's watchdog
    stops a worker whose parent is gone).

    `framework.data.make_loader` sets it; a DataLoader you build yourself needs
    `worker_init_fn=ignore_stop_signals_in_worker` (or a function of yours that calls it) to survive a preemption.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    # Blocked here (and in every thread started from here on), ignored by any thread that has it unblocked; the
    # kernel still queues a blocked signal for sigwaitinfo even when its action is to ignore it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="sigterm-from-parent",
                     daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what torch's worker handler does on its parent's SIGTERM


def mark_trackers_preempting(trackers: Iterable[Any]) -> None:
    """Tell every tracker whose run knows about preemption (W&B's `mark_preempting`: the run shows as preempted and
    resumable, not finished) that this run stops to be resumed. Asked of what the run object offers, not of the
    tracker's name, so any tracker with the same method is told too."""
    for tracker in trackers:
        mark = getattr(getattr(tracker, "tracker", None), "mark_preempting", None)  # the run (W&B) / writer / file
        if callable(mark):
            mark()


def stop_preempted(accelerator: Any, step: int) -> dict[str, Any]:
    """After a preemption signal, with the checkpoint written: tell the trackers the run will resume, close them and
    say how to continue. Returns the run's result."""
    mark_trackers_preempting(accelerator.trackers)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"preempted: stopped after step {step} with a checkpoint; continue with --resume_from latest")
    return {"preempted": True, "run": {"steps": step}}


def started_by_launcher() -> bool:
    """Whether `accelerate launch` (any backend) or torchrun started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def launcher_gone() -> bool:
    """True once the process that started this one has exited (this one was re-parented)."""
    return os.getppid() != _PARENT


def exit_with_launcher(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its launcher dies (Linux `PR_SET_PDEATHSIG`).

    torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL (or by the OOM killer) took
    nothing with it and the ranks trained on. With SIGTERM, the launcher's death becomes the graceful stop: every
    rank checkpoints after the same step and exits. Both launch paths start the ranks from the main thread of the
    `accelerate launch` process (a subprocess for one process; torchrun's agent runs inside it), which is the thread
    whose exit the kernel watches. Only under a launcher: a plain `python recipe.py` is left alone (`nohup` runs
    outlive their shell). Returns whether it is armed; False off Linux.
    """
    if not sys.platform.startswith("linux") or not started_by_launcher():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if launcher_gone():  # it died before we asked: the kernel will not tell us any more
        os.kill(os.getpid(), signum)
    return True


def _keep_stderr_writable() -> None:
    """`accelerate launch` (one process) reads the rank's stderr through a pipe; once the launcher is dead nobody
    reads it, and the stop's warnings or the progress bar would fail with BrokenPipeError before the checkpoint is
    written. Send stderr where stdout goes instead (the launcher's own stdout, which the rank inherited)."""
    try:
        if launcher_gone() and stat.S_ISFIFO(os.fstat(2).st_mode) and not stat.S_ISFIFO(os.fstat(1).st_mode):
            os.dup2(1, 2)
    except OSError:
        pass


class PreemptionWatch:
    """Catches the stop signals while a run trains; `requested()` is True on every rank once any rank got one.

    SIGTERM and SIGUSR1: a graceful stop, once; repeats change nothing (launchers and schedulers often send the signal
    more than once). SIGINT (Ctrl-C): the same graceful stop on the first press, with a message saying so; a second
    SIGINT raises KeyboardInterrupt (abort, no checkpoint).
    """

    def __init__(self, distributed: bool, enabled: bool = True):
        self.received: int | None = None
        self.enabled = enabled  # False (--handle_preemption false): no handlers, never requested
        self.previous = {}
        if not enabled:
            return
        # A CPU group for the flag, so the check never waits on the GPU (under NCCL the default group is on it).
        self.group = dist.new_group(backend="gloo") if distributed and dist.is_initialized() else None
        self.flag = torch.zeros(1, dtype=torch.int32)
        if threading.current_thread() is threading.main_thread():  # Python allows handlers in the main thread only
            self.previous = {sig: signal.signal(sig, self._receive) for sig in STOP_SIGNALS}
        exit_with_launcher()  # the launcher's death: SIGTERM, caught just above

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second press (or Ctrl-C while already stopping): abort
        if self.received is not None:
            return
        self.received = signum
        _keep_stderr_writable()
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            # To stdout, like the run's other status lines: under `accelerate launch` (one process) the rank's
            # stderr is a pipe that the launcher copies, and its own Ctrl-C can land between reading a chunk and
            # writing it (the message was lost so in CI); stdout is the launcher's own, inherited.
            try:  # os.write, not print(): the handler may have interrupted a print
                os.write(1, INTERRUPT_MESSAGE.encode())
            except OSError:
                pass

    def requested(self) -> bool:
        if not self.enabled:
            return False
        if self.group is None:
            return self.received is not None
        self.flag.fill_(self.received is not None)
        dist.all_reduce(self.flag, group=self.group)
        return bool(self.flag.item())

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
