"""The README's shell blocks: valid bash that copies and pastes as written, and the cheap commands print what the
README says they do (parsing, --print_config, --help, refusals)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT, launch_environment

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_has_shell_blocks():
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_shell_block_is_valid_bash_that_pastes_as_written(index):
    block = BLOCKS[index]
    checked = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert checked.returncode == 0, f"block {index}: {checked.stderr}\n{block}"
    for line in block.splitlines():
        # A comment after a line continuation ends the command there: bash passes ' ' and runs half of it.
        assert not re.search(r"\\\s+\S", line), f"block {index}: text after a line-continuing backslash: {line!r}"
        assert not line.endswith("\\ "), f"block {index}: a space after the line-continuing backslash: {line!r}"


def cheap_commands() -> list[str]:
    """`python recipes/...` lines of the README that stop before training (parse, print, help, refuse)."""
    commands = []
    for block in BLOCKS:
        variables = dict(re.findall(r'^(\w+)="([^"]*)"$', block, flags=re.M))
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command.startswith("python recipes/") and re.search(r"--print_config|--help", command):
                for name, value in variables.items():
                    command = command.replace(f"${name}", value)
                commands.append(command)
    return commands


@pytest.mark.parametrize("command", cheap_commands())
def test_cheap_readme_command_runs_as_written(command):
    args = shlex.split(command)
    result = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, env=launch_environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if "--print_config" in args:
        assert "techniques:" in result.stdout and "optimizer:" in result.stdout
    if "--help" in args:
        assert "--output_dir" in result.stdout


def test_readme_refusal_examples_print_what_the_readme_shows():
    """The three refusals of "Configuring a run", as printed there."""
    block = README.split("Unknown keys and wrong types stop the program", 1)[1].split("```", 2)[1]
    examples = re.findall(r"^\$ (python .*)\n((?:(?!\$ ).*\n)*)", block, flags=re.M)
    assert len(examples) == 3
    for command, expected in examples:
        result = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, env=launch_environment(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        for line in expected.strip().splitlines():
            assert line.strip() in result.stderr, (command, line, result.stderr[-2000:])
