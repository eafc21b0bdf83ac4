"""Preemption through `accelerate launch` itself, with DataLoader workers, as SLURM (`scancel`, the time limit, the
sbatch's `kill -TERM $SRUN_PID`), Kubernetes or a terminal deliver it: the signal goes to the launcher's whole process
group. Every rank stops after the same step with a checkpoint, the workers survive until then, and the run resumes to
bitwise the weights of an uninterrupted one. A launcher killed with SIGKILL takes its ranks with it (they stop the same
way), and Ctrl-C stops gracefully on the first press and aborts on the second."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint import completed_checkpoints
from framework.preemption import INTERRUPT_MESSAGE, PreemptionWatch, ignore_stop_signals_in_worker
from helpers import ROOT, launch, launch_command, launch_environment

DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
STEPS = 24
# The default image config (EMA on, no augmentation), two DataLoader workers per rank.
ARGS = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--tracker", "none",
        "--max_steps", str(STEPS), "--log_every", "4", "--data.num_workers", "2", "--techniques.dump_params", "{}")
WORLD = {"cpu.yaml": 1, "multi_cpu.yaml": 2}
PACE = ("--techniques.pace", "{seconds: 0.3}")  # slow steps: the signal lands mid-run


def start(output_dir, launch_config, *extra):
    """Start a launch in a session of its own (so a test can signal its whole process group), output to files."""
    command = launch_command(DUMP, *ARGS, "--output_dir", str(output_dir), *extra, launch_config=launch_config)
    output_dir.mkdir(parents=True)
    process = subprocess.Popen(command, cwd=ROOT, env=launch_environment(), start_new_session=True,
                               stdout=(output_dir.parent / f"{output_dir.name}.out").open("w"),
                               stderr=(output_dir.parent / f"{output_dir.name}.err").open("w"))
    process.output_dir = output_dir
    return process


def output(process):
    out, err = (process.output_dir.parent / f"{process.output_dir.name}.{s}" for s in ("out", "err"))
    return out.read_text(), err.read_text()


def wait_for_step(process, step, timeout=300):
    marker = process.output_dir / "step_rank0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and int(marker.read_text() or 0) >= step:
            return
        if process.poll() is not None:
            pytest.fail(f"the launch ended (status {process.returncode}) before step {step}:\n" + "\n".join(output(process)))
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def finish(process, timeout=180):
    try:
        status = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    stdout, stderr = output(process)
    print(stdout[-3000:], stderr[-6000:], sep="\n")
    return status, stdout, stderr


def assert_stopped_with_a_checkpoint(output_dir, stdout, stderr, world):
    """Every rank stopped after the same step S < STEPS and the checkpoint of S is complete; no worker crashed."""
    assert "is killed by signal" not in stderr and "exited unexpectedly" not in stderr
    assert "Traceback" not in stderr
    stopped = re.search(r"preempted: stopped after step (\d+) with a checkpoint", stdout)
    assert stopped, "no 'preempted:' line"
    step = int(stopped.group(1))
    assert 3 <= step < STEPS
    assert [int((output_dir / f"step_rank{r}").read_text()) for r in range(world)] == [step] * world
    assert completed_checkpoints(output_dir)[-1].name == f"step_{step:08d}"
    assert not (output_dir / "summary.json").exists()  # it did not pretend to finish
    return step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's output directory, per launch config (run once, on first use)."""
    runs = {}

    def get(launch_config):
        if launch_config not in runs:
            output_dir = tmp_path_factory.mktemp("reference") / launch_config
            assert launch(DUMP, *ARGS, "--output_dir", str(output_dir), launch_config=launch_config).returncode == 0
            runs[launch_config] = output_dir
        return runs[launch_config]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", list(WORLD))
def test_sigterm_to_the_launch_checkpoints_every_rank_and_resumes_bitwise(tmp_path, launch_config, reference):
    process = start(tmp_path / "run", launch_config, *PACE)
    wait_for_step(process, 3)
    os.killpg(process.pid, signal.SIGTERM)  # the launcher, the rank(s) and their workers, as SLURM does
    status, stdout, stderr = finish(process)
    # accelerate's launcher forwards the signal, waits for its ranks, then exits 128 + the signal number whatever
    # they did (accelerate's own code, not the ranks'); the ranks stopped gracefully (the checks below).
    assert status == 128 + signal.SIGTERM
    step = assert_stopped_with_a_checkpoint(tmp_path / "run", stdout, stderr, WORLD[launch_config])

    resumed = launch(DUMP, *ARGS, "--output_dir", str(tmp_path / "run"), "--resume_from", "latest",
                     launch_config=launch_config)
    assert resumed.returncode == 0 and f"step_{step:08d}" in resumed.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run"]["steps"] == STEPS
    for name in ("model.safetensors", "model_ema.safetensors"):
        expected, got = load_file(reference(launch_config) / name), load_file(tmp_path / "run" / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"{name} differs from the uninterrupted run"


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", list(WORLD))
def test_ctrl_c_to_the_launch_stops_gracefully(tmp_path, launch_config):
    process = start(tmp_path / "run", launch_config, *PACE)
    wait_for_step(process, 3)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
    status, stdout, stderr = finish(process)
    assert status == 128 + signal.SIGINT  # accelerate's launcher, as for SIGTERM
    assert INTERRUPT_MESSAGE.strip() in stdout
    assert_stopped_with_a_checkpoint(tmp_path / "run", stdout, stderr, WORLD[launch_config])


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", list(WORLD))
def test_ranks_stop_when_their_launcher_is_killed(tmp_path, launch_config):
    process = start(tmp_path / "run", launch_config, *PACE)
    wait_for_step(process, 3)
    tree = psutil.Process(process.pid).children(recursive=True)  # the rank(s) and their DataLoader workers
    assert len(tree) >= WORLD[launch_config] * 3
    process.send_signal(signal.SIGKILL)  # the launcher only; torchrun's ranks are in sessions of their own
    process.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for leftover in alive:
        leftover.kill()
    assert not alive, f"left running after their launcher died: {alive}"
    stdout, stderr = output(process)
    assert_stopped_with_a_checkpoint(tmp_path / "run", stdout, stderr, WORLD[launch_config])


def test_dataloader_workers_ignore_stop_signals():
    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 1000

        def __getitem__(self, index):
            return os.getpid()

    loader = torch.utils.data.DataLoader(Pids(), batch_size=2, num_workers=1, persistent_workers=True,
                                         worker_init_fn=ignore_stop_signals_in_worker)
    batches = iter(loader)
    worker = psutil.Process(int(next(batches)[0]))
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        for name in ("TERM", "INT", "USR1"):  # from another process, as a launcher's or a scheduler's would be
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
        time.sleep(0.5)
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        assert int(next(batches)[0]) == worker.pid
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if sys.platform.startswith("linux"):  # SIGTERM from its own process (multiprocessing's terminate()) still ends it
        os.kill(worker.pid, signal.SIGTERM)
        assert worker.wait(5) in (0, None)  # None: multiprocessing reaped it first
    del batches


def test_first_ctrl_c_stops_gracefully_and_the_second_aborts(capfd):
    watch = PreemptionWatch(distributed=False)
    try:
        assert not watch.requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread
        assert watch.requested() and watch.received == signal.SIGINT
        assert INTERRUPT_MESSAGE in capfd.readouterr().out
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's follow-up SIGTERM changes nothing
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_gets_sigterm_when_its_launcher_dies(tmp_path):
    rank = textwrap.dedent(f"""
        import signal, sys, time
        from framework.preemption import exit_with_launcher
        signal.signal(signal.SIGTERM, lambda *_: (open({str(tmp_path / "got")!r}, "w").write("SIGTERM"), sys.exit(0)))
        print(exit_with_launcher(), flush=True)
        time.sleep(60)
    """)
    launcher = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {rank!r}]); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True,
                               env=launch_environment({"ACCELERATE_MIXED_PRECISION": "no"}))
    assert process.stdout.readline().strip() == "True"  # armed: started by a launcher, on Linux
    child = psutil.Process(process.pid).children()[0]
    process.kill()
    process.wait()
    child.wait(10)  # not our child: psutil cannot tell its status, the file does
    assert (tmp_path / "got").read_text() == "SIGTERM"
