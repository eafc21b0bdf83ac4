"""fp16's loss scaling, exercised on CPU with a real `torch.amp.GradScaler` in the Accelerator: the loop unscales
each backward pass once, so gradient hooks (centralization, clipping) and SAM's two passes see true gradients,
and an overflow skips the step without touching the weights. (The same path on a GPU: tests/gpu/run.sh.)"""

from __future__ import annotations

import pytest
import torch

from framework.techniques import SAM, GradientCentralization, GradientClipping
from helpers import LossTimes, make_trainer, reset_accelerate, scaled_accelerator


@pytest.mark.parametrize("techniques", [
    lambda: [GradientCentralization(), GradientClipping(max_norm=0.05)],
    lambda: [SAM(rho=0.2)],  # a gradient left scaled would make a 4096× larger step
    lambda: [SAM(rho=0.2), GradientCentralization(), GradientClipping(max_norm=0.05)],
], ids=["centralization+clipping", "sam", "sam+centralization+clipping"])
def test_loss_scaling_changes_nothing_when_nothing_overflows(tmp_path, techniques):
    plain = make_trainer(tmp_path / "plain", techniques(), batch_size=2, n=8, epochs=2)
    plain.fit()
    reset_accelerate()
    scaled = make_trainer(tmp_path / "scaled", techniques(), batch_size=2, n=8, epochs=2,
                          accelerator=scaled_accelerator(2.0**12))
    scaled.fit()
    assert scaled.accelerator.scaler.get_scale() == 2.0**12  # no step overflowed or was skipped
    for a, b in zip(plain.state.model.parameters(), scaled.state.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # a power-of-two scale unscales exactly


@pytest.mark.parametrize("techniques", [lambda: [GradientClipping(max_norm=0.05)], lambda: [SAM(rho=0.2)]],
                         ids=["clipping", "sam"])
def test_overflowing_steps_are_skipped_and_leave_the_weights_alone(tmp_path, techniques):
    trainer = make_trainer(tmp_path, [LossTimes(1000.0), *techniques()], batch_size=2, n=8, epochs=1,
                           accelerator=scaled_accelerator(3e38))
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in torch.nn.Linear(4, 3).parameters()]  # make_trainer's seed-0 weights
    trainer.fit()
    assert trainer.accelerator.scaler.get_scale() == pytest.approx(3e38 / 2**4)  # 4 overflows, 4 back-offs
    for p, p0 in zip(trainer.state.model.parameters(), initial):
        assert torch.isfinite(p).all()
        assert torch.equal(p, p0)  # every step overflowed (scale × 1000 × gradient = inf) and was skipped
