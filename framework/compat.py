"""The technique × backend compatibility table, generated from each technique's own `check`.

    python -m framework.compat      # prints the markdown table that README.md shows

Each column is a launch config of launch_configs/ described as the `Backend` the framework sees there; each cell runs
the technique's `check` (with its default arguments) against it.
"""

from __future__ import annotations

import framework.techniques  # noqa: F401  (registers the built-in techniques: the table's rows)
from framework.backend import Backend
from framework.errors import IncompatibleError
from framework.technique import TECHNIQUES, check_techniques

#: What each launch config looks like to `Technique.check` (tests keep these in step with the YAML files).
LAUNCH_BACKENDS: dict[str, Backend] = {
    "cpu": Backend("NO", 1, "no", "cpu"),
    "multi_cpu": Backend("MULTI_CPU", 2, "no", "cpu"),
    "single_gpu": Backend("NO", 1, "no", "cuda"),
    "ddp": Backend("MULTI_GPU", 8, "no", "cuda"),
    "multi_node": Backend("MULTI_GPU", 16, "no", "cuda"),
    "fp16": Backend("NO", 1, "fp16", "cuda"),
    "bf16": Backend("NO", 1, "bf16", "cuda"),
    "deepspeed_zero1": Backend("DEEPSPEED", 2, "no", "cuda", deepspeed_stage=1),
    "deepspeed_zero2": Backend("DEEPSPEED", 2, "no", "cuda", deepspeed_stage=2),
    "deepspeed_zero3": Backend("DEEPSPEED", 2, "no", "cuda", deepspeed_stage=3),
    "deepspeed_zero3_offload": Backend("DEEPSPEED", 2, "no", "cuda", deepspeed_stage=3),
    "fsdp": Backend("FSDP", 8, "bf16", "cuda"),
}


def compatibility(technique_name: str, backend: Backend) -> str | None:
    """None if the technique (its example arguments) runs on `backend`, else its refusal message."""
    cls = TECHNIQUES[technique_name]
    try:
        check_techniques([cls(**cls.example_args)], backend)
    except IncompatibleError as error:
        return str(error)
    return None


def compatibility_table() -> str:
    """A markdown table: ✓ where the technique runs, ✗ with a numbered note where its `check` refuses."""
    header = "| technique | " + " | ".join(f"`{name}`" for name in LAUNCH_BACKENDS) + " |"
    lines = [header, "|---" * (len(LAUNCH_BACKENDS) + 1) + "|"]
    notes: list[str] = []
    for name in sorted(TECHNIQUES):
        cells = []
        for backend in LAUNCH_BACKENDS.values():
            reason = compatibility(name, backend)
            if reason is None:
                cells.append("✓")
            else:
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"✗{notes.index(reason) + 1}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"{i}. {reason}" for i, reason in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(compatibility_table(), end="")
