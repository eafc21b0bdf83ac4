"""Each technique: its pure function against a hand computation or torch's reference, then its hooks on a tiny state."""

from __future__ import annotations

import copy

import pytest
import torch

from framework.backend import Backend
from framework.config import build_techniques
from framework.errors import ConfigError, IncompatibleError
from framework.technique import Technique, check_techniques
from framework.techniques import EMA, CosineLR, GradientClipping, ema_update_
from helpers import tiny_state


# --- EMA ---------------------------------------------------------------------------------------------------------
def test_ema_update_matches_formula_and_copies_buffers():
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    params = [torch.tensor([3.0, 6.0]), torch.tensor([[10.0]])]
    ema_buffers = [torch.tensor([0.0, 0.0]), torch.tensor(0)]
    buffers = [torch.tensor([5.0, 7.0]), torch.tensor(42)]
    ema_update_(ema, params, 0.9, ema_buffers, buffers)
    # 0.9 * 1 + 0.1 * 3 = 1.2; 0.9 * 2 + 0.1 * 6 = 2.4; 0.9 * 0 + 0.1 * 10 = 1.0
    torch.testing.assert_close(ema[0], torch.tensor([1.2, 2.4]))
    torch.testing.assert_close(ema[1], torch.tensor([[1.0]]))
    assert torch.equal(ema_buffers[0], buffers[0]) and ema_buffers[1].item() == 42
    assert torch.equal(params[0], torch.tensor([3.0, 6.0]))  # the model's weights are untouched


def test_ema_technique_tracks_swaps_and_restores(tmp_path):
    state = tiny_state(tmp_path)
    ema = EMA(decay=0.5)
    ema.fit_start(state)
    weights = list(state.model.parameters())
    before = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.add_(1.0)
    state.step = 1
    ema.after_optimizer_step(state)
    for shadow, old in zip(ema.ema_params, before):
        torch.testing.assert_close(shadow, old + 0.5)  # 0.5 * old + 0.5 * (old + 1)
    live = [w.detach().clone() for w in weights]
    ema.eval_start(state)
    for w, shadow in zip(weights, ema.ema_params):
        assert torch.equal(w, shadow)
    ema.eval_end(state)
    for w, kept in zip(weights, live):
        assert torch.equal(w, kept)
    restored = EMA(decay=0.5)
    restored.fit_start(state)
    restored.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert restored.num_updates == 1
    for a, b in zip(restored.ema_params, ema.ema_params):
        assert torch.equal(a, b)


def test_ema_warmup_and_update_every():
    ema = EMA(decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)  # (1 + 0) / (10 + 0)
    ema.num_updates = 90
    assert ema.current_decay() == pytest.approx(91 / 100)
    assert EMA(decay=0.9, update_every=4).current_decay() == pytest.approx(0.9**4)


def test_ema_runs_on_every_backend_and_refuses_bad_decay():
    for stage in (None, 1, 2, 3):
        check_techniques([EMA()], Backend(distributed_type="DEEPSPEED" if stage else "NO", deepspeed_stage=stage))
    with pytest.raises(ConfigError, match="ema.decay"):
        EMA(decay=1.5)


# --- gradient clipping ---------------------------------------------------------------------------------------------
def test_gradient_clipping_matches_torch_and_logs_preclip_norm(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    reference = copy.deepcopy(model)
    inputs = torch.randn(16, 5)
    for m in (model, reference):
        (m(inputs) ** 2).sum().mul(10).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.5)
    assert expected_norm > 0.5  # the case actually clips
    state = tiny_state(tmp_path, model=model)
    GradientClipping(max_norm=0.5).before_optimizer_step(state)
    torch.testing.assert_close(state.logs["grad_norm"], expected_norm)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert clipped == pytest.approx(0.5, rel=1e-4)


# --- the contract ----------------------------------------------------------------------------------------------------
class StepOwner(Technique):
    owns_optimizer_step = True


def test_two_step_owners_are_refused_and_one_under_deepspeed():
    with pytest.raises(IncompatibleError, match="only one"):
        check_techniques([StepOwner(), StepOwner()], Backend())
    check_techniques([StepOwner()], Backend(distributed_type="MULTI_GPU", num_processes=8))
    with pytest.raises(IncompatibleError, match="engine steps inside backward"):
        check_techniques([StepOwner()], Backend(distributed_type="DEEPSPEED", deepspeed_stage=1))


def test_build_techniques_validates_names_and_types():
    built = build_techniques({"cosine_lr": {"warmup_steps": 3}, "ema": {"decay": 0.9}, "gradient_clipping": None})
    assert [type(t) for t in built] == [CosineLR, EMA]  # order kept, null removes one
    assert built[1].decay == 0.9
    with pytest.raises(ConfigError, match="techniques.emma: unknown technique"):
        build_techniques({"emma": {}})
    with pytest.raises(ConfigError, match="techniques.ema.decy: unknown argument"):
        build_techniques({"ema": {"decy": 0.9}})
    with pytest.raises(ConfigError, match="techniques.ema.*decay"):
        build_techniques({"ema": {"decay": "fast"}})


def test_only_overridden_hooks_are_called():
    from framework.technique import hook_table

    table = hook_table([EMA(), GradientClipping()])
    assert [m.__self__.name for m in table["after_optimizer_step"]] == ["ema"]
    assert [m.__self__.name for m in table["before_optimizer_step"]] == ["gradient_clipping"]
    assert table["on_batch"] == []
