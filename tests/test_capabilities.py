"""The loop and the techniques meet through capabilities declared on `Technique` / `Task`, never through a
technique's registered name or class: no technique file names another technique, and nothing in framework/ dispatches
on a technique's identity. Then each declared capability, as the technique that has it declares it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import framework.techniques  # noqa: F401  (registers the built-in techniques)
from framework.backend import Backend
from framework.errors import ConfigError
from framework.task import ClassificationTask, LanguageModelTask, Task
from framework.technique import TECHNIQUES, Technique
from framework.techniques import EMA, SAM, CosineLR, NaNGuard
from helpers import make_trainer

FRAMEWORK = Path(__file__).resolve().parents[1] / "framework"


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, kinds) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def names_of_other_techniques(path: Path) -> list[str]:
    """Where the code of a technique file names a technique defined in another file: its registered name as a string
    (`t.name == "nan_guard"`) or its class (`isinstance(t, LRSchedule)`, an import of it). Messages that advise the
    user to turn another technique on (`--techniques.gradient_clipping.max_norm 1.0`) are longer strings: allowed."""
    unit = f"framework.techniques.{path.relative_to(FRAMEWORK / 'techniques').parts[0].removesuffix('.py')}"

    def mine(cls: type) -> bool:  # defined in this file, or in a file of this technique's package
        return cls.__module__ == unit or cls.__module__.startswith(unit + ".")

    others = {name: cls for name, cls in TECHNIQUES.items() if not mine(cls)}
    own_classes = {cls.__name__ for cls in TECHNIQUES.values() if mine(cls)}
    other_classes = ({cls.__name__ for cls in others.values()} | {"LRSchedule"}) - own_classes - (
        {"LRSchedule"} if own_classes & {"CosineLR"} else set())  # the schedules' base class is their file's own
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and node.value in others:
            found.append(f"{path.name}:{node.lineno}: the name {node.value!r}")
        elif isinstance(node, ast.Name) and node.id in other_classes \
                or isinstance(node, ast.Attribute) and node.attr in other_classes:
            found.append(f"{path.name}:{node.lineno}: the class {getattr(node, 'id', getattr(node, 'attr', ''))}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{path.name}:{node.lineno}: imports {alias.name}" for alias in node.names
                      if alias.name in other_classes]
    return found


def test_no_technique_file_names_another_technique():
    files = [p for p in sorted((FRAMEWORK / "techniques").rglob("*.py")) if p.name != "__init__.py"]  # the registry
    assert len(files) > 20
    found = [hit for path in files for hit in names_of_other_techniques(path)]
    assert found == [], "techniques meet through capabilities on Technique / Task, not names:\n" + "\n".join(found)


def test_nothing_in_framework_dispatches_on_a_technique_identity():
    """The issue's grep: `isinstance(.*LRSchedule` and `.name == "<a registered technique>"` find nothing."""
    pattern = re.compile(r"isinstance\(.*LRSchedule\b|\.name [!=]= [\"'](\w+)[\"']")
    found = []
    for path in sorted(FRAMEWORK.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                if match.group(1) is None or match.group(1) in TECHNIQUES:  # tracker.name == "wandb" is no technique
                    found.append(f"{path.relative_to(FRAMEWORK.parent)}:{number}: {line.strip()}")
    assert found == [], "\n".join(found)


def test_the_capabilities_are_declared_on_the_base_classes():
    plain = Technique()
    assert plain.handles_nonfinite is False and plain.evaluated_weights(None) is None
    assert plain.lr_schedulers() == [] and plain.sets_learning_rate is False
    assert NaNGuard.handles_nonfinite and not any(
        cls.handles_nonfinite for cls in TECHNIQUES.values() if cls is not NaNGuard)
    assert EMA().overrides("evaluated_weights") and not EMA(evaluate_with_ema=False).evaluated_weights(None)
    assert CosineLR.sets_learning_rate and CosineLR().overrides("lr_schedulers")

    logits = torch.zeros(4, 10)
    assert Task().output_classes(logits) is None  # a task that declares nothing: the doctor checks nothing
    assert ClassificationTask(num_classes=7).output_classes(logits) == 7
    assert LanguageModelTask().output_classes(torch.zeros(2, 5, 256)) == 256  # the vocabulary: the logits' size


def test_sam_refuses_accumulation_in_check():
    SAM().check(Backend(), [])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps to 1"):
        SAM().check(Backend(gradient_accumulation_steps=2), [])


class RollbackAt(Technique):
    """Asks the loop to roll back to the newest healthy checkpoint, with the LR halved, once, at `step`."""

    def __init__(self, step: int):
        self.step, self.rolled_back_to, self.lrs = step, None, []

    def before_optimizer_step(self, state):
        if state.step == self.step and self.rolled_back_to is None:
            self.rolled_back_to = state.rollback(lr_factor=0.5)
            state.skip_step = True

    def batch_end(self, state, logs):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def test_the_loop_rolls_back_through_its_own_load_path(tmp_path):
    rollback = RollbackAt(step=6)
    trainer = make_trainer(tmp_path, [rollback], batch_size=2, n=8, epochs=3, lr=0.1, doctor=False,
                           checkpoint_every=4)
    summary = trainer.fit()
    assert rollback.rolled_back_to.name == "step_00000004"
    assert summary["run"]["steps"] == 12  # steps 5 and 6 were taken again after the rollback
    assert rollback.lrs[0] == pytest.approx(0.1) and rollback.lrs[-1] == pytest.approx(0.05)
