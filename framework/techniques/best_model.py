"""Best-model saving: keep the top-k weights by a validation metric (the EMA weights when evaluation runs on them),
export the best as `model_best.safetensors`, and record which step and value won in summary.json. With
`evaluate_best` (the default) the test split is evaluated on the best weights too, reported as `test_best/*` beside
the final weights' `test/*`.

Hooks: `epoch_end` (after the epoch's validation), `test_weights`. The ranking is checkpointed, so a resumed run keeps
it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from framework.backend import full_state_dict, main_process_decides, weights_swapped_in
from framework.errors import require
from framework.state import TrainState
from framework.technique import Technique, register
from framework.techniques.early_stopping import improved


def last_evaluated_weights(state: TrainState) -> dict[str, torch.Tensor]:
    """The weights the last evaluation ran on: a technique's own if it swaps them in for evaluation (its
    `evaluated_weights`, e.g. EMA's average), else the model's."""
    for technique in state.techniques:
        weights = technique.evaluated_weights(state)
        if weights is not None:
            return weights
    return full_state_dict(state.accelerator, state.model)


@register("best_model")
class BestModel(Technique):
    """Keep the `top_k` best weights by `metric` under output_dir/best/, the best one as model_best.safetensors."""

    def __init__(self, metric: str = "val/accuracy", mode: Literal["min", "max"] = "max", top_k: int = 1,
                 evaluate_best: bool = True):
        require(top_k >= 1, f"best_model.top_k must be at least 1, got {top_k}.")
        self.metric, self.mode, self.top_k, self.evaluate_best = metric, mode, top_k, evaluate_best
        self.ranking: list[dict[str, Any]] = []  # best first: {"value", "step", "file"}

    def fit_start(self, state: TrainState) -> None:
        state.require_validation(self.name, self.metric)

    def _qualifies(self, value: float) -> bool:
        return len(self.ranking) < self.top_k or improved(value, self.ranking[-1]["value"], self.mode, 0.0)

    def epoch_end(self, state: TrainState) -> None:
        if not state.validated_now or any(entry["step"] == state.step for entry in self.ranking):
            return
        value = state.validation_metric(self.name, self.metric)
        if not main_process_decides(state.accelerator, self._qualifies(value)):  # the gather below is collective
            return
        weights = last_evaluated_weights(state)
        if not state.accelerator.is_main_process:
            return
        folder = state.output_dir / "best"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{state.step:08d}.safetensors"
        save_file(weights, str(path))
        self.ranking.append({"value": value, "step": state.step, "file": str(path)})
        self.ranking.sort(key=lambda entry: entry["value"], reverse=self.mode == "max")
        for dropped in self.ranking[self.top_k:]:
            path_dropped = folder / f"step_{dropped['step']:08d}.safetensors"
            path_dropped.unlink(missing_ok=True)
        self.ranking = self.ranking[: self.top_k]
        shutil.copyfile(self.ranking[0]["file"], state.output_dir / "model_best.safetensors")
        state.summary["best_model"] = {"metric": self.metric, **self.ranking[0],
                                       "exported": str(state.output_dir / "model_best.safetensors")}

    def test_weights(self, state: TrainState) -> dict[str, Any]:
        """The best weights on the test split too, as test_best/* beside the final weights' test/*."""
        path = state.output_dir / "model_best.safetensors"
        if not (self.evaluate_best and main_process_decides(state.accelerator, bool(self.ranking))):
            return {}
        if state.accelerator.is_main_process:
            state.summary["best_model"]["test_metrics"] = "test_best/*"
        return {"test_best": weights_swapped_in(state.accelerator, state.model, load_file(path))}

    def state_dict(self) -> dict[str, Any]:
        return {"ranking": self.ranking}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.ranking = list(state_dict["ranking"])
