"""Profiling with `torch.profiler` (https://pytorch.org/docs/stable/profiler.html): a few optimizer steps are recorded
after a wait and a warmup, each rank writes a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing),
and the main process prints the table of the most expensive operators when training ends.

The schedule (`torch.profiler.schedule`): `wait` steps run unprofiled (data loader workers, allocator and cuDNN
autotuning settle), `warmup` steps run the profiler but drop its records (its own start-up cost), `active` steps are
recorded and exported; `repeat` cycles of that (0: until training ends). CPU activity is always recorded, CUDA
activity (kernels, memcpy) when the run uses a CUDA device. Each recorded step is one `ProfilerStep#N` range in the
trace: the whole optimizer step, from the previous step's end (data loading, forward, backward, optimizer step).

Hooks: `fit_start` (start), `after_optimizer_step` (advance the schedule), `fit_end` (stop; a run that ends inside
the active window exports what it recorded so far; print and write the table).
"""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile, schedule

from framework.errors import require_int
from framework.state import TrainState
from framework.technique import Technique, register


@register("profiler")
class Profiler(Technique):
    """Profile `active` optimizer steps after `wait` + `warmup` steps; Chrome traces and a top-ops table.

    Writes `output_dir/profiler/trace_rank{R}_step{S}.json` on every rank R each time an active window ends (S: the
    optimizer step it ended at), and on the main process `output_dir/profiler/top_ops.txt`: the operators sorted by
    self time (CUDA time on a GPU, CPU time otherwise), one table per recorded window; the last one is also printed.
    With `repeat` > 1 every window gets its own trace and table. Profiling stops at `fit_end`.

    Args:
        wait: steps skipped before each cycle.
        warmup: steps profiled but not recorded (the profiler's start-up cost stays out of the trace).
        active: steps recorded.
        repeat: cycles of wait + warmup + active (0: repeat until training ends).
        record_shapes: record operator input shapes (the table then groups by shape too; larger traces).
        profile_memory: record tensor allocations and frees (memory columns in the table).
        row_limit: rows of the printed table.
    """

    def __init__(self, wait: int = 5, warmup: int = 2, active: int = 5, repeat: int = 1, record_shapes: bool = False,
                 profile_memory: bool = False, row_limit: int = 15):
        for key, value, least in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1),
                                  ("repeat", repeat, 0), ("row_limit", row_limit, 1)):
            require_int(f"profiler.{key}", value, least)
        self.wait = wait
        self.warmup = warmup
        self.active = active
        self.repeat = repeat
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.row_limit = row_limit
        self.traces: list[str] = []  # this rank's exported Chrome traces
        self.tables: list[tuple[int, str]] = []  # (step, top-ops table) per recorded window, main process only
        self._profiler: profile | None = None

    def fit_start(self, state: TrainState) -> None:
        self._stop()  # a previous fit that raised left its profiler running; two cannot run at once
        self.traces, self.tables = [], []
        on_cuda = state.accelerator.device.type == "cuda"
        self._sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
        directory = state.output_dir / "profiler"
        directory.mkdir(parents=True, exist_ok=True)

        def trace_ready(prof: profile) -> None:
            # Called inside prof.step() (after the step counter moved on) or by stop() for a cut-short window.
            path = directory / f"trace_rank{state.accelerator.process_index}_step{state.step}.json"
            prof.export_chrome_trace(str(path))
            self.traces.append(str(path))
            if state.accelerator.is_main_process:
                table = prof.key_averages().table(sort_by=self._sort_by, row_limit=self.row_limit)
                self.tables.append((state.step, table))

        self._profiler = profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else []),
            schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat),
            on_trace_ready=trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
        )
        self._profiler.__enter__()

    def after_optimizer_step(self, state: TrainState) -> None:
        if self._profiler is not None:
            self._profiler.step()

    def _stop(self) -> None:
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.__exit__(None, None, None)  # inside an active window: exports the steps recorded so far

    def fit_end(self, state: TrainState) -> None:
        self._stop()
        state.summary["profiler"] = {"traces": list(self.traces)}
        if not state.accelerator.is_main_process:
            return
        path = state.output_dir / "profiler" / "top_ops.txt"
        if not self.tables:
            note = (f"profiler: nothing recorded: training took {state.step} steps, but recording starts after "
                    f"wait + warmup = {self.wait + self.warmup} steps. Lower profiler.wait / profiler.warmup.")
            path.write_text(note + "\n")
            print(note)
            return
        path.write_text("".join(f"window ending at step {step} (sorted by {self._sort_by}):\n{table}\n"
                                for step, table in self.tables))
        step, table = self.tables[-1]
        print(f"\nprofiler: top operators of the window ending at step {step}, by {self._sort_by} "
              f"(trace{'s' if len(self.traces) > 1 else ''}: {', '.join(self.traces)}):\n{table}")
        state.summary["profiler"]["top_ops"] = str(path)

