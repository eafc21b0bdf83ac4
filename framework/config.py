"""Recipe configs: one dataclass per recipe, read from YAML and the command line with jsonargparse.

    python recipes/x.py --config recipes/configs/x.yaml --epochs 3 --optimizer.lr 0.1 --techniques.ema.decay 0.99

Unknown keys and wrong types are refused with the key named (exit status 2); `--print_config` prints the resolved
config as YAML, which `--config` reads back unchanged, as it does output_dir/config.yaml (`config_to_yaml`).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar

import torch
import yaml
from accelerate.state import PartialState, is_initialized

import framework.techniques  # noqa: F401  (registers the built-in techniques, which configs name)
from framework.console import tell_launcher
from framework.errors import ConfigError, FrameworkError
from framework.technique import TECHNIQUES, Technique
from framework.diagnosis import out_of_memory_report

C = TypeVar("C")


@dataclass
class TrainerConfig:
    """The options every recipe has (its config dataclass inherits them)."""

    output_dir: str = "outputs/run"
    """Everything the run writes goes here: metrics.jsonl, summary.json, model.safetensors, checkpoints/, tracker files."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (counted over the whole run), even mid-epoch."""
    seed: int = 0
    """Seeds python, numpy and torch on every rank, and the data order."""
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    """Experiment tracker. W&B runs offline (synced later with `wandb sync`) unless you are logged in."""
    resume_from: Optional[str] = None
    """A checkpoint directory, or `latest` for the newest complete one under output_dir/checkpoints."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds an earlier run's checkpoints, deleting them and its metrics.jsonl."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; gradients are not all-reduced on the micro-steps in between."""
    compile: bool = False
    """Compile the model with torch.compile (inductor) when accelerate prepares it; the launch config's
    dynamo_config does the same."""
    find_lr: bool = False
    """Run the LR range test (output_dir/lr_finder.png, .json: two suggested LRs) and exit without training."""
    preview_lr: bool = False
    """Draw this run's LR schedule to output_dir/lr_schedule.png and exit without training."""
    log_every: int = 50
    """Optimizer steps between log lines (each costs one host sync: 50 keeps the loop at 0.02 syncs per step)."""
    eval_every: int = 1
    """Epochs between evaluations on the validation split (0: only at the end)."""
    checkpoint_every: Optional[int] = None
    """Also checkpoint every N optimizer steps (a checkpoint is always written at each epoch's end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    handle_preemption: bool = True
    """On SIGTERM, SIGUSR1 or a first Ctrl-C (to any rank) every rank stops after the same step, saves a checkpoint
    and exits 0 (a second Ctrl-C aborts)."""
    project: str = "framework"
    """Tracker project name."""
    run_name: Optional[str] = None
    """Tracker run name (default: the output directory's name)."""
    group: Optional[str] = None
    """W&B run group (e.g. one sweep or one experiment's seeds)."""
    tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    wandb_rewind: bool = False
    """On resume, rewind the W&B run to the checkpoint's step (W&B's `resume_from`; a preview feature your W&B
    account must have) instead of continuing it, which ignores the repeated steps (same values when nothing changed)."""
    doctor: bool = True
    """Run the training doctor (cheap checks that print a finding, its evidence and the fix once); false: off."""
    overfit_batches: int = 0
    """Debug: train on the first N batches only (same ones every epoch) and report whether the loss nears zero."""
    detect_anomaly: bool = False
    """Debug: torch.autograd's anomaly detection (names the forward op whose backward made a NaN; slow)."""
    evaluate_only: bool = False
    """Train nothing: load output_dir/model.safetensors (a finished run's weights), evaluate the validation and test
    splits, print the metrics and write output_dir/evaluation.json."""
    deterministic: bool = False
    """Deterministic kernels only (torch.use_deterministic_algorithms, cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG):
    the same run twice gives bitwise-equal weights, at some speed. Off: cuDNN autotunes its kernels on CUDA."""
    channels_last: bool = False
    """Convolutional models: weights and 4-D image batches in channels-last memory format (faster convolutions on
    GPUs with tensor cores; same results within float tolerance)."""
    techniques: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    """Techniques by registered name with their arguments, in hook order. `--techniques.NAME null` removes one."""

    def __post_init__(self) -> None:
        for name in ("epochs", "gradient_accumulation_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}: pass --{name} 1 or more.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or null for no limit), got {self.max_steps}.")
        if self.overfit_batches < 0:
            raise ConfigError(f"overfit_batches must be 0 (off) or more, got {self.overfit_batches}.")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be 0 (only at the end) or more, got {self.eval_every}.")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1 (or null: only at epoch ends), got "
                              f"{self.checkpoint_every}.")


def parse_config(config_class: type[C], args: Sequence[str] | None = None) -> C:
    """Parse `--config file.yaml` and dotted overrides into `config_class`; exit with status 2 on a bad key or type.

    `--techniques.NAME.ARG VALUE` changes one argument of one technique and keeps its others (jsonargparse alone
    would replace the technique's whole argument mapping). Technique names and arguments are validated here too,
    so every config error comes before any work starts.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    lock_down_parsing()  # a config is data: values that name Python code are never imported or called
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows each field's docstring
    parser = ArgumentParser(
        prog=os.path.basename(sys.argv[0]), description=config_class.__doc__, exit_on_error=True, allow_abbrev=False,
        formatter_class=_help_formatter(),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of the options below "
                        "(e.g. a run's output_dir/config.yaml, or what --print_config printed).")
    parser.add_class_arguments(config_class)
    _explain_help(parser, config_class)
    args = list(sys.argv[1:] if args is None else args)
    print_config = "--print_config" in args  # handled here, so that it shows the technique overrides too
    args = [arg for arg in args if arg != "--print_config"]
    technique_overrides, args = _split_technique_overrides(args, parser)
    for path in _config_files(args):  # YAML itself keeps the last of two equal keys without a word
        problem = duplicate_key(path)
        if problem:
            parser.error(f"{path}: {problem}")
    try:
        namespace = parser.parse_args(args)
    except ValueError as error:  # the few errors jsonargparse lets through, e.g. a value holding a NUL byte
        parser.error(f"a value could not be read ({error}): check the --config file and the values given.")
    namespace.pop("config", None)
    for name, key, value in technique_overrides:
        if namespace.techniques.get(name) is None:
            namespace.techniques[name] = {}
        namespace.techniques[name][key] = value
    try:
        refuse_code(namespace.as_dict())
        if print_config:
            print(parser.dump(namespace, skip_none=False), end="")
            sys.exit(0)
        config = config_class(**parser.instantiate_classes(namespace).as_dict())
        if isinstance(config, TrainerConfig):
            build_techniques(config.techniques)
    except ConfigError as error:
        parser.error(str(error))
    return config


def _help_formatter() -> type:
    """jsonargparse's help formatter, keeping the line breaks of `--techniques`'s help (one technique a line)."""
    import textwrap

    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        keep_lines = False

        def _format_action(self, action: Any) -> str:
            self.keep_lines = action.dest == "techniques"
            return super()._format_action(action)

        def _split_lines(self, text: str, width: int) -> list[str]:
            if not self.keep_lines:
                return super()._split_lines(text, width)
            lines = []
            for line in text.splitlines():  # an indented line (a technique) continues 2 spaces further in
                indent = line[:len(line) - len(line.lstrip())]
                lines += textwrap.wrap(line, width, subsequent_indent=indent + "  " if indent else "") or [""]
            return lines

    return HelpFormatter


def _explain_help(parser: Any, config_class: type) -> None:
    """Readable `--help`: nested config groups titled by their class docstring (not the dataclass's generated
    signature), and `--techniques` listing every registered technique with the first sentence of its docstring."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # a hint that does not resolve here: keep jsonargparse's titles
        hints = {}
    for key, group in getattr(parser, "groups", {}).items():
        cls = hints.get(key)
        if dataclasses.is_dataclass(cls) and str(group.title).startswith(f"{cls.__name__}("):
            group.title = f"{cls.__name__} (--{key}.*)"  # a dataclass without a docstring of its own
    for action in parser._actions:
        if action.dest == "techniques":
            lines = [f"  {name}: {_first_sentence(cls.__doc__)}" for name, cls in TECHNIQUES.items()]
            action.help = " ".join((action.help or "").split()) + "\nRegistered techniques:\n" + "\n".join(lines)


def _first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[:end + 1]


def _config_files(args: Sequence[str]) -> list[str]:
    """The files named by `--config PATH` and `--config=PATH`, in order."""
    files = []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def duplicate_key(path: str) -> str | None:
    """The first key given twice in one mapping of the YAML file at `path`, as one sentence naming its dotted path
    (None when there is none, or when the file cannot be read: the parser reports that)."""
    try:
        with open(path, encoding="utf-8") as file:
            root = yaml.compose(file, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    pending = [(root, "")]
    while pending:
        node, where = pending.pop(0)
        if isinstance(node, yaml.SequenceNode):
            pending += [(item, f"{where}[{index}]") for index, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        seen = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            dotted = f"{where}.{key.value}" if where else key.value
            if (key.tag, key.value) in seen:
                if where == "techniques":
                    return f"{dotted} is listed twice; list each technique once."
                return f"{dotted} is given twice; give each key once."
            seen.add((key.tag, key.value))
            pending.append((value, dotted))
    return None


def _split_technique_overrides(args: list[str], parser: Any) -> tuple[list[tuple[str, str, Any]], list[str]]:
    """Take `--techniques.NAME.ARG VALUE` (or `=VALUE`) out of args; VALUE is read as YAML (0.9, true, [1, 2])."""
    overrides, rest, index = [], [], 0
    while index < len(args):
        arg = args[index]
        flag, _, inline = arg.partition("=")
        parts = flag.split(".")
        if len(parts) == 3 and parts[0] == "--techniques":
            if "=" in arg:
                value = inline
            elif index + 1 < len(args):
                index += 1
                value = args[index]
            else:
                parser.error(f"{flag} expects a value")
            try:
                overrides.append((parts[1], parts[2], yaml.safe_load(value)))
            except yaml.YAMLError as error:
                parser.error(f"{flag}: {value!r} is not a YAML value ({str(error).splitlines()[0]}). Quote strings "
                             "that contain YAML syntax, e.g. --techniques.NAME.ARG \"'a: b'\".")
        else:
            rest.append(arg)
        index += 1
    return overrides, rest


# --- building techniques from a config: only registered ones, with their arguments checked ---------------------------
def build_techniques(specs: Mapping[str, Mapping[str, Any] | None]) -> list[Technique]:
    """Build techniques from a config mapping `{registered_name: {argument: value}}`, keeping its order.

    A value of `None` (``--techniques.ema null`` on the command line) leaves that technique out. Arguments are
    validated against the technique's constructor signature and type hints; errors name the key.
    """
    techniques = []
    for name, args in specs.items():
        if args is None:
            continue
        if name not in TECHNIQUES:
            raise ConfigError(
                f"techniques.{name}: unknown technique. Registered techniques: {', '.join(sorted(TECHNIQUES))}."
            )
        cls = TECHNIQUES[name]
        techniques.append(cls(**_validated_arguments(f"techniques.{name}", cls, dict(args))))
    return techniques


def configured_techniques(config: TrainerConfig) -> list[Technique]:
    """The techniques `config.techniques` lists, with the doctor first when `config.doctor` is on and the list does
    not name it (first: it sees the raw loss)."""
    techniques = build_techniques(config.techniques)
    if config.doctor and "doctor" not in config.techniques:
        techniques = build_techniques({"doctor": {}}) + techniques
    return techniques


def lock_down_parsing() -> None:
    """Make jsonargparse treat every config as data: it never imports or instantiates what a value names.

    By default jsonargparse builds `{class_path: os.system, init_args: {command: ...}}` wherever a field accepts
    `Any` (technique and augmentation arguments), which would let a YAML file run any command. Idempotent.
    """
    from jsonargparse import set_parsing_settings

    set_parsing_settings(import_path_denylist=["*"], instantiate_subclass_spec_in_any=False)


def refuse_code(value: Any, where: str = "") -> None:
    """Raise `ConfigError` if a config value names Python code to import (a `class_path` key anywhere in it).

    Only registered techniques, and the recipe's own model and data classes, can be built from a config.
    """
    if isinstance(value, Mapping):
        if "class_path" in value:
            raise ConfigError(
                f"{where + '.' if where else ''}class_path: a config cannot name Python code to import or call "
                f"({value['class_path']!r}). Choose techniques by registered name (techniques: {{NAME: {{ARG: "
                "VALUE}}}}) and models and data through their own options; new techniques are registered in Python "
                "with @register."
            )
        for key, item in value.items():
            refuse_code(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            refuse_code(item, f"{where}[{index}]")


def _validated_arguments(prefix: str, cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """Check names and types of constructor arguments with jsonargparse (the same checks as the rest of the config)."""
    from jsonargparse import ArgumentParser

    lock_down_parsing()
    refuse_code(args, prefix)
    known = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    for key in args:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown argument. {cls.__name__} accepts: {', '.join(known)}.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, fail_untyped=False)
    try:
        namespace = parser.parse_object(args)
    except Exception as error:  # jsonargparse raises its ArgumentError; its message names the key
        raise ConfigError(f"{prefix}: {str(error).strip()}") from None
    defaults = inspect.signature(cls).parameters
    for key in args:  # jsonargparse lets null through for a typed argument; the constructor would then fail
        if args[key] is None and namespace.get(key) is None and defaults[key].default is not None \
                and "None" not in str(defaults[key].annotation) and "Optional" not in str(defaults[key].annotation):
            raise ConfigError(f"{prefix}.{key}: null is not a value of this argument; leave it out for its default "
                              f"{defaults[key].default!r}.")
    return {key: namespace[key] for key in known if key in namespace and key in args}


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass (or nested dict) as one level of dotted keys with scalar values, for trackers' hyperparameters."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def config_to_yaml(config: Any) -> str:
    """The resolved config as nested YAML that `--config` reads back to an equal config: output_dir/config.yaml.

    Tuples are written as lists, None as null, and the techniques mapping as it is (in hook order).
    """
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {item.name: plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return yaml.safe_dump(plain(config), sort_keys=False, allow_unicode=True)


#: Keys (or key prefixes) whose change on resume would misread the checkpoint's state: the data order and position,
#: the model's weights, what an optimizer step holds. Refused with the key named (so is a technique added or removed).
FIXED_ON_RESUME = ("data.", "model.", "gradient_accumulation_steps", "seed", "optimizer.name", "optimizer.betas",
                   "optimizer.no_decay")
#: Keys that name where the run is, not what it does: never compared.
NOT_COMPARED = ("output_dir", "resume_from", "overwrite")
#: Data keys that change how fast batches come, not which ones (augmentation draws do not depend on workers).
DATA_SPEED = ("data.num_workers", "data.prefetch_factor", "data.eval_batch_size")


def resume_changes(saved: dict[str, Any], config: Any) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every setting changed since the checkpoint was written
    (`saved`: its config, as `config_to_yaml` wrote it), in the config's order. A change that would misread the
    saved state (`FIXED_ON_RESUME`, a technique added or removed) raises `ConfigError` naming the keys; a changed
    argument of a technique present in both is applied as the technique is built."""
    current = yaml.safe_load(config_to_yaml(config))
    used = {side: {k for k, v in (values.get("techniques") or {}).items() if v is not None}
            for side, values in (("before", saved), ("now", current))}
    before, now = flatten(saved), flatten(current)
    keys = list(dict.fromkeys([*now, *before]))
    changed = [(key, before.get(key), now.get(key)) for key in keys
               if before.get(key) != now.get(key) and not key.startswith(NOT_COMPARED)
               and (not key.startswith("techniques.") or key.split(".")[1] in used["before"] & used["now"])]
    fixed = [f"{key} {old!r} -> {new!r}" for key, old, new in changed
             if key.startswith(FIXED_ON_RESUME) and not key.startswith(DATA_SPEED)]
    # A technique with checkpointed state cannot come or go; one without (a logger, a probe) can.
    fixed += [f"techniques.{name} added" for name in sorted(used["now"] - used["before"]) if _stateful(name)]
    fixed += [f"techniques.{name} removed" for name in sorted(used["before"] - used["now"]) if _stateful(name)]
    changed += [(f"techniques.{name}", "absent" if name in used["now"] else "listed",
                 "listed" if name in used["now"] else "absent") for name in sorted(used["now"] ^ used["before"])]
    if fixed:
        raise ConfigError(
            f"these settings cannot change on resume, since the checkpoint's state depends on them: {'; '.join(fixed)}. "
            "Resume with the checkpoint's values (its config.yaml), or start a new run in another --output_dir.")
    return changed


def _stateful(name: str) -> bool:
    """Does the registered technique `name` keep state in checkpoints (unknown names count as stateful)?"""
    technique = TECHNIQUES.get(name)
    return technique is None or technique.state_dict is not Technique.state_dict


RANK_ZERO_PRINTS_FIRST_SECONDS = 10.0
"""How long a rank other than 0 that refuses waits before it prints and exits (see `run_main`)."""


def run_main(main: Callable[[], Any]) -> None:
    """Run a recipe's `main`, turning a `FrameworkError` into one line on stderr and exit status 2 (no traceback);
    running out of memory into the doctor's report (peak memory, the flags that trade memory for something else)."""
    try:
        try:
            main()
        except torch.OutOfMemoryError as error:
            device = PartialState().device if is_initialized() else "cpu"  # the run's Accelerator set it
            raise FrameworkError(out_of_memory_report(error, device)) from error
    except FrameworkError as error:
        tell_launcher(f"error: {error}")  # torchrun's failure report then ends with it (framework/console.py)
        if os.environ.get("RANK", "0") != "0":
            # torchrun stops every rank as soon as one exits: a rank that refused before rank 0 got there would
            # kill it before it said why. Wait for rank 0 (which checks the same things) to print and exit; a
            # refusal of this rank alone is printed by it after the wait.
            time.sleep(RANK_ZERO_PRINTS_FIRST_SECONDS)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    # Free the finished run (a DeepSpeed engine holds gloo work handles in reference cycles) while the interpreter
    # is whole: destroyed during interpreter shutdown instead, they can abort the process after a successful run.
    gc.collect()
