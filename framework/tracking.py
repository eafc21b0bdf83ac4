"""Experiment tracking through accelerate's trackers: W&B or TensorBoard, plus metrics.jsonl that is always written."""

from __future__ import annotations

import json
import netrc
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from PIL import Image
from tqdm.auto import tqdm

from framework.backend import Backend, deepspeed_summary, num_machines
from framework.nn.sharded import full_shape
from framework.state import TrainState


class JSONLTracker(GeneralTracker):
    """One JSON object per `accelerator.log` call in `output_dir/metrics.jsonl` (appended to when a run resumes)."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, output_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    @property
    def tracker(self):
        return self._file

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is written to output_dir/config.yaml by the trainer

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()


def wandb_logged_in() -> bool:
    """True when W&B credentials are available (API key in the environment or in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def drop_metrics_after(output_dir: str | os.PathLike, step: int) -> None:
    """On resume from `step`: remove the lines a killed run logged after its checkpoint, which the resumed run logs
    again, so metrics.jsonl holds each step once. Rewritten atomically."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except ValueError:  # a line cut short by the kill
            continue
        kept.append(line)
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept))
    os.replace(temporary, path)


def make_trackers(tracker: str, output_dir: str) -> list[Any]:
    """The `log_with` list for the Accelerator: always the JSONL file, plus "wandb" or "tensorboard"."""
    trackers: list[Any] = [JSONLTracker(output_dir)]
    if tracker == "wandb":
        # Offline unless the user is logged in: the run is written under output_dir/wandb and `wandb sync`-able.
        if "WANDB_MODE" not in os.environ and not wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"
        trackers.append("wandb")
    elif tracker == "tensorboard":
        trackers.append("tensorboard")
    return trackers


def tracker_init_kwargs(output_dir: str, run_name: str | None, group: str | None = None,
                        tags: list[str] | None = None, resume_step: int | None = None,
                        rewind: bool = False) -> dict[str, dict[str, Any]]:
    """W&B's init arguments. The run id is kept in output_dir/wandb_run_id, so a run resumed (`resume_step`: the
    checkpoint's step) in the same directory continues the same W&B run instead of starting a new one.

    Continued, the run ignores the steps the killed run had already logged past the checkpoint (W&B's steps only
    increase); resume is bitwise, so the values it keeps are the ones the resumed run logs again. With `rewind`, W&B
    truncates the run's history at `resume_step` instead (`resume_from`, wandb >= 0.17.1; a preview feature of the
    W&B server that the account must have)."""
    name = run_name or Path(output_dir).resolve().name
    id_file = Path(output_dir) / "wandb_run_id"
    resuming = resume_step is not None and id_file.is_file()
    if resuming:
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits, unique within the project
        id_file.write_text(run_id + "\n")
    continued = {"resume_from": f"{run_id}?_step={resume_step}"} if resuming and rewind else {"resume": "allow"}
    return {"wandb": {"name": name, "dir": str(output_dir), "group": group, "tags": list(tags or []), "id": run_id,
                      **continued}}


def log_picture(accelerator: Accelerator, name: str, path: str | os.PathLike, step: int = 0) -> None:
    """Log a PNG to every tracker: an image in W&B and TensorBoard, its file name in metrics.jsonl."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_images({name: [pixels]}, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name == JSONLTracker.name:
            tracker.log({f"picture/{name}": Path(path).name}, step=step)


#: Dense (not 2:4-sparse) bf16 tensor-core peaks in TFLOP/s, by a name torch.cuda.get_device_name contains; the
#: more specific name first. From the vendor's data sheets; sparse figures are twice these (a table that mixed the
#: two once halved users' MFU).
DENSE_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak from `DENSE_BF16_PEAK_TFLOPS`, or None for a device not in the table."""
    return next((peak for name, peak in DENSE_BF16_PEAK_TFLOPS.items() if name in device_name), None)


def throughput(tokens_per_second: float, flops_per_token: int, processes: int, device: torch.device
               ) -> dict[str, float]:
    """Achieved TFLOP/s per device (`perf/tflops`) and, on a GPU in the peak table, `perf/mfu`: that over the dense
    bf16 peak (model FLOPs utilisation, PaLM's definition: recomputation is not counted)."""
    tflops = tokens_per_second * flops_per_token / processes / 1e12
    values = {"perf/tflops": tflops}
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if peak is not None:
        values["perf/mfu"] = tflops / peak
    return values


def memory_use(device: torch.device) -> dict[str, float]:
    """This process's resident memory, and on CUDA the peak allocated since the last log line (then reset)."""
    values = {"memory/rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        values["memory/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return values


class LogWindow:
    """Sums losses and metrics between log lines on the device, so steps in between never wait on the host; times
    how long the loop waited for the next batch (`perf/data_wait`: that share of wall time, an input bottleneck)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.metric_sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.samples = 0
        self.tokens = 0
        self.data_wait = 0.0
        self.started = self.waiting_since = time.perf_counter()

    def wait_for_data(self) -> None:
        self.waiting_since = time.perf_counter()

    def data_arrived(self) -> None:
        self.data_wait += time.perf_counter() - self.waiting_since

    def add(self, loss: torch.Tensor, samples: int, tokens: int, metrics: dict[str, torch.Tensor]) -> None:
        self.loss_sum += loss.detach().float()
        for name, value in metrics.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0) + value.detach().float()
        self.batches += 1
        self.samples += samples
        self.tokens += tokens

    def flush(self, accelerator: Accelerator, logs: dict[str, Any], readers: Sequence[tuple[Callable[[], Any],
              Callable[[list[list[float]]], None]]] = ()) -> dict[str, Any]:
        """Means over ranks of loss and task metrics, plus the techniques' logged values, as floats (one host sync).

        `readers`: `TrainState.read_with_log_line`'s (provide, consume) pairs: each provide()'s values ride in the
        same gather and the same read; each consume then receives its values as floats, one list per rank."""
        elapsed = time.perf_counter() - self.started
        # One gather carries every rank's means and step time: the main process logs the mean over ranks and each
        # rank's step time (a slow rank shows up as one line apart, in the one run).
        local = torch.stack([self.loss_sum, *self.metric_sums.values()]) / max(self.batches, 1)
        step_time = torch.tensor([elapsed / max(self.batches, 1)], device=local.device)
        provided = [provide() for provide, _ in readers]
        extra = [local.new_zeros(0) if p is None else p.detach().to(local.device, torch.float32).reshape(-1)
                 for p in provided]
        width = local.numel()
        per_rank = accelerator.gather(torch.cat([local, step_time, *extra]).reshape(1, -1))  # (ranks, width + 1 + n)
        ranks = per_rank.shape[0]
        names = ["train/loss", *(f"train/{k}" for k in self.metric_sums), *logs,
                 *(f"perf/step_seconds/rank_{rank}" for rank in range(ranks))]
        tensors = [per_rank[:, :width].mean(dim=0)] + [
            torch.as_tensor(v, dtype=torch.float32, device=local.device).reshape(1) for v in logs.values()]
        read = torch.cat([*tensors, per_rank[:, width], per_rank[:, width + 1:].reshape(-1)]).tolist()  # one read
        values = dict(zip(names, read[:len(names)]))
        values["samples_per_second"] = self.samples / elapsed if elapsed > 0 else 0.0
        if self.tokens:
            values["tokens_per_second"] = self.tokens / elapsed if elapsed > 0 else 0.0
        values["perf/data_wait"] = self.data_wait / elapsed if elapsed > 0 else 0.0
        self.reset()
        if readers:  # floats, not a tensor again: a later .tolist() would look like a sync of its own
            rest, n = read[len(names):], sum(len(piece) for piece in extra)
            rows = [rest[rank * n:(rank + 1) * n] for rank in range(ranks)]
            offset = 0
            for (_, consume), given, piece in zip(readers, provided, extra):
                if given is not None:
                    consume([row[offset:offset + len(piece)] for row in rows])
                offset += len(piece)
        return values


#: `--overfit_batches`: a final training loss below this counts as "went near zero".
OVERFIT_NEAR_ZERO = 0.05


def overfit_verdict(batches: int, first_loss: float, last_loss: float, near_zero: bool) -> str:
    if near_zero:
        return (f"overfit_batches {batches}: training loss {first_loss:.4f} -> {last_loss:.4f}, near zero: the model, "
                "loss and optimizer can learn. Now train on all the data.")
    return (f"overfit_batches {batches}: training loss {first_loss:.4f} -> {last_loss:.4f}, NOT near zero "
            f"(< {OVERFIT_NEAR_ZERO}). Train longer (--max_steps), raise the LR, turn regularization off (augmentation, "
            "mixup, label smoothing, dropout, weight decay), and check that labels match inputs.")


def plain_output() -> bool:
    """True when the console is a file or a pipe (SLURM, nohup): one plain line per log step instead of a progress
    bar, whose thousands of carriage-return updates would pile up on one line of the log."""
    return not sys.stderr.isatty()


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """The model's class, parameter counts and weight size (whole tensors, also when ZeRO-3 holds only shards)."""
    parameters = list(model.parameters())
    numel = [full_shape(p).numel() for p in parameters]
    return {
        "class": type(model).__name__,
        "parameters": sum(numel),
        "trainable_parameters": sum(n for n, p in zip(numel, parameters) if p.requires_grad),
        "size_mb": round(sum(n * p.element_size() for n, p in zip(numel, parameters)) / 2**20, 2),
    }


def batch_layout(per_process: int | None, processes: int, accumulation: int) -> dict[str, Any]:
    """`data.batch_size` is per process: the samples of one optimizer step are that × processes × accumulation."""
    return {"per_process_batch_size": per_process, "num_processes": processes, "gradient_accumulation_steps":
            accumulation, "global_batch_size": per_process * processes * accumulation if per_process else None}


def describe_start(model: dict[str, Any], batch: dict[str, Any], steps_per_epoch: int, max_steps: int,
                   backend: str) -> str:
    """The lines printed when training starts: what is trained, with what batch, for how long, where."""
    size = f"{model['parameters']:,} parameters ({model['trainable_parameters']:,} trainable), {model['size_mb']} MB"
    global_batch = batch["global_batch_size"] or "?"
    return (f"model {model['class']}: {size}\n"
            f"global batch {global_batch} = {batch['per_process_batch_size'] or '?'} per process × "
            f"{batch['num_processes']} process(es) × {batch['gradient_accumulation_steps']} accumulation step(s); "
            f"{steps_per_epoch} steps per epoch, {max_steps} steps in all; {backend}")


def start_tracking(accelerator: Accelerator, config: Any, flat_config: dict[str, Any], files: dict[str, str],
                   pictures: dict[str, Any], state: TrainState, backend: Backend, batch: dict[str, Any], resumed: bool
                   ) -> dict[str, Any] | None:
    """Write the run's `files` (name -> text: config.yaml, the inference files) to output_dir, start the trackers
    with the resolved config (`flat_config`), draw each picture to output_dir/NAME.png and log it, then print what
    is trained, with what batch, for how long and where (on `backend`). Returns the model's summary (None on the
    other processes)."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (output_dir / name).write_text(text)
    init_kwargs = tracker_init_kwargs(config.output_dir, config.run_name, config.group, config.tags,
                                      resume_step=state.step if resumed else None, rewind=config.wandb_rewind) \
        if accelerator.is_main_process and config.tracker == "wandb" else {}  # only the main process runs W&B
    accelerator.init_trackers(config.project, config=flat_config, init_kwargs=init_kwargs)
    if not accelerator.is_main_process:
        return None
    for name, draw in pictures.items():
        path = output_dir / f"{name}.png"
        draw(path)
        log_picture(accelerator, name, path, step=state.step)
    summary = model_summary(accelerator.unwrap_model(state.model))
    stage = f" ZeRO-{backend.deepspeed_stage}" if backend.deepspeed_stage is not None else ""
    kind = "one process" if backend.distributed_type == "NO" else backend.distributed_type
    precision = "fp32" if backend.mixed_precision == "no" else backend.mixed_precision
    where = f"{kind}{stage}, {backend.device_type}, {precision}"
    print(describe_start(summary, batch, state.steps_per_epoch, state.max_steps, where))
    if config.tracker == "tensorboard":
        print(f"TensorBoard: tensorboard --logdir {output_dir}")
    return summary


def log_validation(accelerator: Accelerator, state: TrainState, metrics: dict[str, float], epochs: float) -> None:
    """Keep the validation `metrics` of this step in `state` (the summary's, a technique's), log them and print
    them in one line (tqdm.write keeps the progress bar intact)."""
    state.eval_metrics, state.eval_step = metrics, state.step
    accelerator.log(metrics, step=state.step)
    if accelerator.is_main_process:
        tqdm.write(f"epoch {round(epochs, 2):g} step {state.step}: " + ", ".join(f"{k} {v:.4f}"
                                                                               for k, v in metrics.items()))


def log_train_step(accelerator: Accelerator, state: TrainState, window: LogWindow, progress: Any, epochs: float,
                   overfit_batches: int) -> None:
    """A step's log line: the window's means, the LR (each group's when they differ), the counters and memory, to the
    trackers and the progress bar (or one plain line when the console is a file). With --overfit_batches, the
    verdict's losses are kept current in `state.summary`: the last log line decides it."""
    values = window.flush(accelerator, state.logs, state.log_line_readers)
    values["lr"] = state.optimizer.param_groups[0]["lr"]
    if len({g["lr"] for g in state.optimizer.param_groups}) > 1:  # e.g. layerwise_lr (not no-decay groups)
        values.update({f"lr/group_{i}": g["lr"] for i, g in enumerate(state.optimizer.param_groups)})
    values.update(epoch=epochs, samples_seen=state.samples_seen, **memory_use(accelerator.device))
    if state.tokens_seen:
        values["tokens_seen"] = state.tokens_seen
    if state.flops_per_token and "tokens_per_second" in values:
        values.update(throughput(values["tokens_per_second"], state.flops_per_token, accelerator.num_processes,
                                 accelerator.device))
    accelerator.log(values, step=state.step)
    if overfit_batches:
        loss = values["train/loss"]
        report = state.summary.setdefault("overfit_batches", {"first_loss": loss})
        report.update(last_loss=loss, near_zero=loss < OVERFIT_NEAR_ZERO)
    progress.set_postfix(loss=f"{values['train/loss']:.4f}", samples_s=f"{values['samples_per_second']:.0f}",
                         lr=f"{values['lr']:.2e}", refresh=False)
    if progress.disable and accelerator.is_main_process:  # a log file: one plain line per log step
        print(f"step {state.step}/{state.max_steps} epoch {values['epoch']:.2f}: loss {values['train/loss']:.4f}, "
              f"lr {values['lr']:.2e}, {values['samples_per_second']:.0f} samples/s", flush=True)


def finish_run(accelerator: Accelerator, state: TrainState, results: dict[str, Any], setup: dict[str, Any],
               epochs: float, seconds: float, techniques: list[str], model: dict[str, Any] | None,
               overfit_batches: int, hidden: str) -> dict[str, Any]:
    """Save the model (model.safetensors, gathered from every rank), log the test metrics, write summary.json (the
    metrics; how the run ran: the accelerator's backend, `setup` (the batch layout), the machines, DeepSpeed and the
    counters; the model; what the techniques added to `state.summary`), close the trackers and print the closing
    lines: speed, metrics, the overfit verdict, the files in output_dir (but `hidden`). Returns the summary."""
    accelerator.wait_for_everyone()
    accelerator.save_model(state.model, state.output_dir)
    accelerator.log({k: v for k, v in results.items() if k.startswith("test")}, step=state.step)
    setup = {**setup, "num_machines": num_machines(), **deepspeed_summary(accelerator)}
    summary = {
        "metrics": results,
        "run": {
            "distributed_type": accelerator.distributed_type.name,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
            **setup,
            "steps": state.step,
            "epochs": round(epochs, 4),
            "samples_seen": state.samples_seen,
            "seconds": round(seconds, 2),
            "samples_per_second": round(state.samples_seen / seconds, 1) if seconds > 0 else None,
            **({"tokens_per_second": round(state.tokens_seen / seconds, 1)} if state.tokens_seen and seconds > 0
               else {}),
            "techniques": techniques,
        },
        "model": model if model is None else {**model, "flops_per_token": state.flops_per_token},
        **state.summary,
    }
    if accelerator.is_main_process:
        (state.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.end_training()  # closes the trackers (W&B prints its run summary here)
    if accelerator.is_main_process:
        print(f"\ntrained {state.step} steps ({summary['run']['epochs']:g} epochs, {state.samples_seen:,} samples) "
              f"in {seconds:.1f} s: {summary['run']['samples_per_second']} samples/s")
        print("\n".join(f"{k:>18s} = {v:.4f}" for k, v in results.items()))
        if "overfit_batches" in state.summary:
            print(overfit_verdict(overfit_batches, **state.summary["overfit_batches"]))
        files = sorted(p.name for p in state.output_dir.iterdir() if p.name != hidden)
        print(f"wrote {state.output_dir}/:\n  " + "\n  ".join(files))
    return summary
