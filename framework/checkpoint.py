"""Checkpoints around `accelerator.save_state` / `load_state`, written atomically.

Layout: `output_dir/checkpoints/step_00000123/` holding accelerate's files plus a `COMPLETE` marker. A checkpoint
is written to a hidden temporary directory, flushed to disk, marked, then renamed into place, so a crash while
saving never leaves a half-written directory that `latest` would pick.

The marker is the checkpoint's manifest: the step, the backend that wrote it, whether its weights were finite, and
every file's size and SHA-256. A resume verifies them: `latest` skips a damaged checkpoint (random bytes on disk, a
truncated or missing file) with a warning naming the file and takes the one before; retention always keeps the
newest checkpoint whose weights were finite, whatever `keep_checkpoints` says.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from framework.backend import Backend, on_main_process
from framework.errors import ConfigError

MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _flush_and_list(path: Path) -> dict[str, dict[str, Any]]:
    """fsync every file under `path` and return its manifest: relative path -> size and SHA-256."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        files[str(file.relative_to(path))] = {"size": file.stat().st_size, "sha256": digest.hexdigest()}
    return files


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads((path / MARKER).read_text())


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path` against its manifest (None: intact, or written before manifests)."""
    try:
        files = read_marker(path).get("files")
    except (OSError, ValueError) as error:
        return f"its {MARKER} marker cannot be read ({error})"
    for name, expected in (files or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest {expected['size']} (truncated or overwritten)"
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected["sha256"]:
            return f"{name} does not match its checksum (its bytes changed on disk)"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK = ".lock"


def acquire_run_lock(output_dir: str | os.PathLike) -> Path:
    """Make `output_dir` this process's run directory: one run at a time. The lock file holds the pid and host of the
    run that holds it; a second run is refused with one line. A lock whose process is gone (a run killed with
    SIGKILL) is stale and taken over with a warning, and so is one left by this same SLURM job before it was
    requeued; a lock of another host cannot be checked otherwise and is refused."""
    import socket
    import time

    directory = Path(output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output_dir {directory} cannot be used: {error.strerror or error}. Pass a directory "
                          "you can write to as --output_dir.") from None
    lock, host = directory / LOCK, socket.gethostname()
    job = os.environ.get("SLURM_JOB_ID")  # a requeued SLURM job keeps its id, and may land on another node
    mine = {"pid": os.getpid(), "host": host, "job": job, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    while True:
        try:
            with open(lock, "x") as handle:  # atomic: exactly one of two racing runs creates it
                handle.write(json.dumps(mine) + "\n")
            return lock
        except FileExistsError:
            pass
        except OSError as error:
            raise ConfigError(f"output_dir {directory} cannot be used: {error.strerror or error}. Pass a directory "
                              "you can write to as --output_dir.") from None
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            holder = {}
        pid, where = holder.get("pid"), holder.get("host")
        if pid == os.getpid() and where == host:  # this process's own earlier Trainer
            lock.unlink(missing_ok=True)
            continue
        requeued = job is not None and holder.get("job") == job  # this job's earlier run, before its requeue
        alive = not requeued and (where != host or _process_alive(pid))
        if alive:
            raise ConfigError(
                f"output_dir {directory} is in use by process {pid} on {where} (since {holder.get('started')}): two "
                f"runs would interleave their checkpoints and metrics. Wait for it, or pass another --output_dir; if "
                f"that run is gone, delete {lock}.")
        warnings.warn(f"taking over the stale lock of process {pid} in {directory} (that process is gone)",
                      stacklevel=2)
        lock.unlink(missing_ok=True)


def release_run_lock(output_dir: str | os.PathLike) -> None:
    """Remove this process's lock (another process's is left alone)."""
    lock = Path(output_dir) / LOCK
    with contextlib.suppress(OSError, ValueError):
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: What a run writes first: a directory holding one of these is a run directory that `--overwrite` may empty.
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "summary.json")


def check_overwritable(output_dir: str | os.PathLike) -> None:
    """Refuse `--overwrite true` on a directory that holds files but no earlier run (none of `RUN_FILES`): it may be
    anything (a home directory, a data folder). Every rank calls it, so a refusal stops them all."""
    directory = Path(output_dir)
    entries = [p for p in directory.iterdir() if p.name != LOCK] if directory.is_dir() else []
    if entries and not any((directory / n).exists() for n in RUN_FILES):
        raise ConfigError(
            f"--overwrite true would delete everything in output_dir {directory}, which holds files but no earlier "
            f"run (none of {', '.join(RUN_FILES)}). Choose a new or empty --output_dir."
        )


def clear_run(output_dir: str | os.PathLike) -> None:
    """`--overwrite true`: empty an earlier run's directory, keeping nothing of it (checkpoints, metrics, summary,
    exported weights, pictures, tracker files), so nothing left over can pass for the new run's results. Call
    `check_overwritable` first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name == LOCK:  # this run's own
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, step: int, keep: int,
                    backend: Backend | None = None, finite: bool = True, files: dict[str, str] | None = None) -> Path:
    """Save the full training state for `step` on every rank; keep the newest `keep` checkpoints, and the newest
    one with finite weights. Returns the path.

    The marker records the backend that wrote it (a resume on an incompatible one is refused with the fix), whether
    the weights were `finite`, and the manifest of the files. `files`: name -> text written beside accelerate's
    (the run's config.yaml, which a resume compares with its own).
    """
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, text in (files or {}).items():
            (temporary / name).write_text(text)
        manifest = _flush_and_list(temporary)
        with open(temporary / MARKER, "w") as marker:
            marker.write(json.dumps({"step": step, "backend": dataclasses.asdict(backend or Backend()),
                                     "finite": finite, "files": manifest}) + "\n")
            marker.flush()
            os.fsync(marker.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        _fsync_dir(root)
        checkpoints = completed_checkpoints(output_dir)
        healthy = [path for path in checkpoints if read_marker(path).get("finite", True)]
        for old in checkpoints[:-keep]:
            if healthy and old == healthy[-1]:
                continue  # never pruned for checkpoints of a run that has gone non-finite since
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def completed_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first; incomplete ones are skipped with a warning."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if not match:
            continue
        if (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
        else:
            warnings.warn(f"skipping checkpoint {path}: it has no {MARKER} marker (the save was interrupted)")
    return [path for _, path in sorted(found)]


def check_resumable(path: Path, backend: Backend) -> None:
    """Refuse a checkpoint whose layout this backend cannot load. Loadable: the same backend; a run without DeepSpeed
    on any number of processes; DeepSpeed ZeRO-1/2 on another number of processes (through DeepSpeed's universal
    checkpoint); any DeepSpeed checkpoint in a run without DeepSpeed (its shards consolidated: `load_checkpoint`)."""
    written = json.loads((path / MARKER).read_text())["backend"]
    was, now = written.get("deepspeed_stage"), backend.deepspeed_stage
    if was == now and (was is None or written["num_processes"] == backend.num_processes):
        return
    if now is None or (was == now and was in (1, 2)):  # converted at load time
        return
    wrote = f"DeepSpeed ZeRO-{was} on {written['num_processes']} processes" if was else "a run without DeepSpeed"
    runs = f"DeepSpeed ZeRO-{now} on {backend.num_processes} processes"
    if was is None:
        fix = ("resume it without DeepSpeed (e.g. launch_configs/multi_cpu.yaml or ddp.yaml), or start a new DeepSpeed "
               "run from its weights (model.safetensors in the checkpoint)")
    elif was == now:  # ZeRO-3 on another world size
        fix = (f"resume on {written['num_processes']} processes, or without DeepSpeed (it is consolidated then): "
               "DeepSpeed's universal checkpoint gives every ZeRO-3 parameter group the first group's settings")
    else:
        fix = (f"resume with ZeRO-{was}, or without DeepSpeed (it is consolidated then), or start a new run from its "
               f"weights (`python -m framework.checkpoint consolidate {path} DIR` writes DIR/model.safetensors)")
    raise ConfigError(f"checkpoint {path} was written by {wrote} and cannot be loaded by {runs}: {fix}.")


def saved_world_size(path: Path) -> int:
    """The number of processes that wrote checkpoint `path`."""
    return int(read_marker(path)["backend"].get("num_processes", 1))


def saved_batch_position(path: Path) -> int:
    """The micro-batches of its epoch that checkpoint `path` had consumed on each process (the train state is always
    the first registered object), read weights-only."""
    with weights_only_loads():
        return int(torch.load(path / "custom_checkpoint_0.pkl", map_location="cpu")["batch_in_epoch"])


def batch_position_for_world_size(batches: int, old_world: int, new_world: int, accumulation: int) -> int:
    """Elastic resume: the per-process batch position on `new_world` processes that continues after the same samples
    as `batches` on `old_world` (each optimizer step of accelerate's sharded sampler takes the next batches of one
    shared order, one per process, so the position is carried by samples seen). A position that falls inside a batch
    of the new world size, or inside an accumulation window, cannot be continued exactly and is refused."""
    consumed = batches * old_world  # batches of the shared order
    if consumed % new_world or (consumed // new_world) % accumulation:
        raise ConfigError(
            f"the checkpoint stopped after {batches} batches of {old_world} process(es) in its epoch, which is not a "
            f"whole number of steps of {new_world} process(es) with accumulation {accumulation}: the rest of the epoch "
            f"would skip or repeat samples. Resume on {old_world} process(es), or from a checkpoint at an epoch end.")
    return consumed // new_world


def resolve_resume(resume_from: str | None, output_dir: str | os.PathLike, overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from: `latest` (None when there is none yet: a fresh start), or a checked path.

    A fresh start in a directory that holds an earlier run's checkpoints is refused unless `overwrite`: the two
    runs' checkpoints and metrics would mix, and pruning could delete the new run's checkpoints.
    """
    if resume_from is None:
        if completed_checkpoints(output_dir) and not overwrite:
            raise ConfigError(
                f"output_dir {output_dir} holds checkpoints of an earlier run. Pass `--resume_from latest` to continue "
                "it, `--overwrite true` to start over (deleting them), or another --output_dir."
            )
        return None
    if resume_from == "latest":
        return newest_healthy_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / MARKER).is_file():
        raise ConfigError(
            f"resume_from: {path} is not a complete checkpoint (no {MARKER} marker). "
            f"Pass a directory under {checkpoint_root(output_dir)} or `latest`."
        )
    problem = damage(path)
    if problem:
        raise ConfigError(f"resume_from: checkpoint {path} is damaged: {problem}. Pass an earlier checkpoint under "
                          f"{checkpoint_root(output_dir)}, or `latest` (which skips damaged ones).")
    return path


def newest_healthy_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint, preferring one with finite weights; None when there is no checkpoint at all.
    Each one skipped is named in a warning; an error when checkpoints exist but none is intact."""
    checkpoints = completed_checkpoints(output_dir)
    intact = []
    for path in reversed(checkpoints):
        problem = damage(path)
        if problem:
            warnings.warn(f"checkpoint {path} is damaged: {problem}; falling back to the one before it", stacklevel=2)
        else:
            intact.append(path)
    if checkpoints and not intact:
        raise ConfigError(f"no intact checkpoint under {checkpoint_root(output_dir)} (each is named above). Start over "
                          "with --overwrite true, or restore the files from a copy.")
    finite = [path for path in intact if read_marker(path).get("finite", True)]
    if intact and finite and finite[0] != intact[0]:
        warnings.warn(f"checkpoint {intact[0]} holds non-finite weights; resuming from {finite[0]}, the newest with "
                      "finite weights", stacklevel=2)
    return (finite or intact or [None])[0]


def _saved_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the model weights accelerate saved in checkpoint `path`, read without loading them;
    None for a layout without one weights file (DeepSpeed writes its own, per rank)."""
    from safetensors import safe_open

    if (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
            return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    if (path / "pytorch_model.bin").is_file():
        weights = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        return {key: tuple(value.shape) for key, value in weights.items()}
    return None


def _unwrapped(key: str) -> str:
    return key.removeprefix("module.").replace("_orig_mod.", "")


def _listing(items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def check_checkpoint_matches(path: Path, model: torch.nn.Module, registered: Sequence[Any]) -> None:
    """Refuse a checkpoint written by another model, model config or technique list, before `load_state` fails
    with a torch traceback: one report of the mismatched weight names and shapes.

    Args:
        model: the model, prepared (wrapped) or not.
        registered: the objects registered for checkpointing, in order (the train state, stateful techniques).
    """
    saved = _saved_shapes(path)
    if saved is not None:
        # Compared without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`): accelerate saves
        # and loads the unwrapped weights.
        saved = {_unwrapped(key): shape for key, shape in saved.items()}
        expected = {_unwrapped(key): tensor for key, tensor in model.state_dict().items()}
        # Tied weights (a GPT's embedding and output layer) are saved once, under one of their names.
        by_storage: dict[int, list[str]] = {}
        for key, tensor in expected.items():
            if tensor.numel():
                by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
        aliases = {key: keys for keys in by_storage.values() for key in keys}
        missing = [f"{key} {list(tensor.shape)}" for key, tensor in expected.items()
                   if key not in saved and not any(alias in saved for alias in aliases.get(key, ()))]
        unexpected = [f"{key} {list(shape)}" for key, shape in saved.items() if key not in expected]
        differ = [f"{key} {list(saved[key])} in the checkpoint, {list(tensor.shape)} in the model"
                  for key, tensor in expected.items() if key in saved and tuple(tensor.shape) != saved[key]]
        if missing or unexpected or differ:
            report = [f"checkpoint {path} holds weights of a different model:"]
            if differ:
                report.append(f"  shapes differ ({len(differ)}): {_listing(differ)}")
            if missing:
                report.append(f"  in the model, not in the checkpoint ({len(missing)}): {_listing(missing)}")
            if unexpected:
                report.append(f"  in the checkpoint, not in the model ({len(unexpected)}): {_listing(unexpected)}")
            report.append("Resume with the model options of the run that wrote it (its output_dir/config.yaml), "
                          "or start a new run in another --output_dir.")
            raise ConfigError("\n".join(report))
    saved_states = len(list(path.glob("custom_checkpoint_*.pkl")))
    if saved_states != len(registered):
        names = [getattr(obj, "name", "") or type(obj).__name__ for obj in registered]
        raise ConfigError(
            f"checkpoint {path} holds {saved_states} saved state(s) of the train state and stateful techniques, but "
            f"this run has {len(registered)} ({', '.join(names)}): it was written with other techniques. Resume with "
            "the techniques of the run that wrote it (its output_dir/config.yaml), or start a new run in another "
            "--output_dir."
        )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside reads tensors and plain values only, never arbitrary pickled objects, even where the
    caller asks for `weights_only=False` (accelerate does, for registered objects). Uses torch's own switch."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def deepspeed_safe_globals() -> list[Any]:
    """The few classes DeepSpeed's own checkpoint files pickle besides tensors and plain values (ZeRO 1-3 and offload,
    found by loading each layout weights-only): its loss scalers, the ZeRO stage enum, and parameter fragment
    addresses. Allowed by name when those files are loaded weights-only; nothing else is unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_checkpoint_loads(deepspeed: bool) -> Iterator[None]:
    """Every torch.load inside is weights-only (`weights_only_loads`), DeepSpeed's own classes allowed if `deepspeed`."""
    allowed = deepspeed_safe_globals() if deepspeed else []
    with weights_only_loads(), torch.serialization.safe_globals(allowed):
        yield


def _deepspeed_tag(path: Path) -> str:
    """The folder of checkpoint `path` that holds DeepSpeed's engine files (accelerate's `pytorch_model`)."""
    return (path / "latest").read_text().strip()


def _bare_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (and DeepSpeed's) wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def check_universal_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose state DeepSpeed's universal checkpoint does not carry: it holds each parameter's
    fp32 weights, exp_avg, exp_avg_sq and step only, so Adam or AdamW (without amsgrad)."""
    optimizer = _bare_optimizer(optimizer)
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or any(
            group.get("amsgrad") for group in optimizer.param_groups):
        raise ConfigError(
            f"a DeepSpeed checkpoint moves to another world size or backend through DeepSpeed's universal checkpoint, "
            f"which holds Adam's state only (exp_avg, exp_avg_sq, step), not {type(optimizer).__name__}'s: resume "
            "with the launch config that wrote it, or train with AdamW (optimizer.name adamw).")


def universal_checkpoint(path: Path) -> Path:
    """DeepSpeed checkpoint `path` (ZeRO-1/2/3, any number of processes) in DeepSpeed's universal layout, which a
    DeepSpeed engine loads on any number of processes: path/<tag>/zero/<parameter>/{fp32,exp_avg,exp_avg_sq,step}.pt
    and zero/optimizer_state.pt beside the engine's own files. Converted once, by DeepSpeed's ds_to_universal run in
    this process (never a script copied into the checkpoint; serial: no process pool), every file read weights-only;
    into a temporary folder renamed into place, so an interrupted conversion leaves nothing half-written. Call it on
    one process."""
    from deepspeed.checkpoint import ds_to_universal

    tag = _deepspeed_tag(path)
    final = path / tag / "zero"
    if final.is_dir():
        return final
    temporary = path / ".universal_tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    options = argparse.Namespace(input_folder=str(path / tag), output_folder=str(temporary / tag),
                                 num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)  # the info Megatron adds; none needed for plain models
    quiet = io.StringIO()  # its progress prints and bars
    with safe_checkpoint_loads(deepspeed=True), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal.main(options)
    os.rename(temporary / tag / "zero", final)
    shutil.rmtree(temporary)
    return final


def _universal_value(file: Path) -> Any:
    value = torch.load(file, map_location="cpu", weights_only=True)
    return value["param"] if isinstance(value, dict) else value  # ZeRO-1/2 files wrap the tensor, ZeRO-3's do not


def adam_state_from_universal(zero: Path, names: Sequence[Sequence[str]], shapes: dict[str, torch.Size],
                              template: dict[str, Any]) -> dict[str, Any]:
    """A torch Adam/AdamW `state_dict` from a universal checkpoint's folder `zero`: `names` lists each parameter
    group's parameter names in the optimizer's order, `shapes` their shapes, `template` is the optimizer's own
    `state_dict()` (its groups' settings and numbering). The saved groups' settings (the LR as it was) replace the
    template's; each parameter gets its exp_avg, exp_avg_sq and the step."""
    saved = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=True)
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(template["param_groups"]):
        raise ConfigError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's "
                          f"{len(template['param_groups'])}: build the optimizer as the run that wrote it did.")
    if (zero / names[0][0] / "step.pt").is_file():  # ZeRO-1/2: one per parameter
        step = _universal_value(zero / names[0][0] / "step.pt")
    else:  # ZeRO-3: the optimizer's, as DeepSpeed's own loader reads it
        step = saved["optimizer_state_dict"]["state"][0]["step"]
    groups, state = [], {}
    for group, saved_group, group_names in zip(template["param_groups"], saved_groups, names):
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": group["params"]})
        for index, name in zip(group["params"], group_names):
            state[index] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                            **{key: _universal_value(zero / name / f"{key}.pt").reshape(shapes[name])
                               for key in ("exp_avg", "exp_avg_sq")}}
    return {"state": state, "param_groups": groups}


WITHOUT_DEEPSPEED = "without_deepspeed"
CONVERSION_FAILED = "converting the checkpoint failed on the main process (see its error above)"


def checkpoint_without_deepspeed(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """DeepSpeed checkpoint `path` in the layout a run without DeepSpeed loads, as path/without_deepspeed/:
    model.safetensors (the full fp32 weights and buffers, gathered from every rank's shards), optimizer.bin (this
    `optimizer`'s state_dict: every parameter's Adam moments and the step, through the universal checkpoint) and the
    framework's own files (train state, techniques, RNG states) copied. Written to a temporary folder renamed into
    place. Call it on one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    check_universal_optimizer(optimizer)
    zero = universal_checkpoint(path)
    optimizer = _bare_optimizer(optimizer)
    model = getattr(model, "module", model)  # DDP's wrapper: the names DeepSpeed saved under
    name_of = {id(p): _unwrapped(name) for name, p in model.named_parameters()}
    names = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    shapes = {name_of[id(p)]: p.shape for group in optimizer.param_groups for p in group["params"]}
    with safe_checkpoint_loads(deepspeed=True):
        state = adam_state_from_universal(zero, names, shapes, optimizer.state_dict())
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path))
    final, temporary = path / WITHOUT_DEEPSPEED, path / f".{WITHOUT_DEEPSPEED}_tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(temporary / "model.safetensors"))
    torch.save(state, temporary / "optimizer.bin")
    for file in path.iterdir():  # accelerate's and the framework's files; not DeepSpeed's scripts or the marker
        if file.is_file() and file.suffix != ".py" and file.name not in (MARKER, "latest"):
            shutil.copy2(file, temporary / file.name)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(temporary, final)
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, model: torch.nn.Module, registered: Sequence[Any],
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """`accelerator.load_state(path)` after `check_checkpoint_matches`, with every torch.load weights-only, on every
    backend: the framework's own state files hold tensors and plain values only, and DeepSpeed's engine files are
    read with an allowlist of its few classes (`deepspeed_safe_globals`). A checkpoint never runs code.

    A DeepSpeed checkpoint of another world size, or loaded without DeepSpeed, is converted first (`optimizer`, the
    run's, must then be given): to DeepSpeed's universal checkpoint for a DeepSpeed run, to the layout without
    DeepSpeed (`checkpoint_without_deepspeed`) for another run."""
    written = read_marker(path)["backend"] if (path / MARKER).is_file() else {}
    deepspeed_now = accelerator.distributed_type == DistributedType.DEEPSPEED
    universal = False
    if written.get("deepspeed_stage") is not None and not deepspeed_now:
        on_main_process(accelerator, lambda: checkpoint_without_deepspeed(path, model, optimizer), CONVERSION_FAILED)
        path = path / WITHOUT_DEEPSPEED
    elif deepspeed_now and written.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        check_universal_optimizer(optimizer)
        on_main_process(accelerator, lambda: universal_checkpoint(path), CONVERSION_FAILED)
        universal = True
    check_checkpoint_matches(path, model, registered)
    with safe_checkpoint_loads(deepspeed_now):
        if universal:  # DeepSpeed's `checkpoint: {load_universal: true}`, for this one load (a rollback is not)
            model._config.load_universal_checkpoint = True
        try:
            accelerator.load_state(str(path))
        except pickle.UnpicklingError as error:
            raise ConfigError(
                f"checkpoint {path} holds pickled Python objects, not only tensors and plain values, so it is not "
                f"loaded (it may run code): {str(error).splitlines()[0]} Resume only from checkpoints this framework "
                "wrote."
            ) from error
        finally:
            if universal:
                model._config.load_universal_checkpoint = False
        if universal:  # DeepSpeed's universal load restores the parameters only: the buffers (BatchNorm statistics)
            saved = torch.load(path / _deepspeed_tag(path) / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=True)
            module = saved["module"]
            model.module.load_state_dict({name: module[name] for name, _ in model.module.named_buffers()
                                          if name in module}, strict=False)


def consolidate(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """A DeepSpeed checkpoint's full fp32 weights (gathered from every rank's ZeRO shards) as
    output_dir/model.safetensors, with DeepSpeed's library (never the script copied into the checkpoint) and every
    file read weights-only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    path = Path(checkpoint)
    if not (path / "latest").is_file():
        raise ConfigError(f"{path} is not a DeepSpeed checkpoint (no `latest` file): a checkpoint of a run without "
                          "DeepSpeed holds model.safetensors already.")
    problem = damage(path) if (path / MARKER).is_file() else None
    if problem:
        raise ConfigError(f"checkpoint {path} is damaged: {problem}.")
    with safe_checkpoint_loads(deepspeed=True):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out / "model.safetensors"


def main(args: Sequence[str] | None = None) -> None:
    """`python -m framework.checkpoint consolidate CHECKPOINT OUTPUT_DIR`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m framework.checkpoint")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("consolidate", help="a DeepSpeed checkpoint's full weights as model.safetensors")
    command.add_argument("checkpoint", help="a checkpoint directory, e.g. outputs/run/checkpoints/step_00000100")
    command.add_argument("output_dir", help="where model.safetensors is written")
    options = parser.parse_args(args)
    try:
        print(f"wrote {consolidate(options.checkpoint, options.output_dir)}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
