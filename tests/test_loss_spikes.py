"""nan_guard's loss-spike detection (off by default): a loss more than k robust standard deviations above the median
of its recent window skips the step on every rank; spikes in a row roll back with a lower LR like NaNs do; the
report names the batch (its sample indices when the batch carries them)."""

from __future__ import annotations

import torch

from framework.technique import Technique
from framework.techniques.nan_guard import NaNGuard, is_spike
from helpers import make_trainer


def test_is_spike_against_a_hand_computed_median_and_mad():
    window = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0]
    median, mad = 1.0, 0.05  # |x - 1|: 0, .2, .2, .1, .1, 0, .05, .05, 0, 0 -> median 0.05
    threshold = median + 6 * 1.4826 * mad  # 1.44478
    assert is_spike(1.45, window, 6) and not is_spike(1.44, window, 6)
    assert not is_spike(100.0, window[:5], 6, min_window=10)  # too few losses yet to judge
    assert not is_spike(threshold - 1e-6, window, 6)


class Spiker(Technique):
    """Multiplies the loss by 100 on the given micro-batches (counted from 0), as a bad batch would."""

    def __init__(self, batches):
        self.batches, self.seen = set(batches), 0

    def on_loss(self, state, loss, batch, outputs):
        self.seen += 1
        return loss * 100 if self.seen - 1 in self.batches else loss


class WeightLog(Technique):
    def __init__(self):
        self.weights = []

    def batch_end(self, state, logs):
        self.weights.append(state.accelerator.unwrap_model(state.model).weight.detach().clone())


def test_spikes_skip_their_steps_and_repeated_spikes_roll_back(tmp_path, capsys):
    log = WeightLog()
    guard = NaNGuard(spike_threshold=6.0, spike_window=8, max_consecutive=2)
    # 4 batches per epoch, 8 epochs; a lone spike at batch 14, two in a row at 21 and 22.
    trainer = make_trainer(tmp_path, [Spiker([14, 21, 22]), guard, log], batch_size=4, n=16, epochs=8,
                           lr=0.05, doctor=False, checkpoint_every=4)
    trainer.fit()
    assert guard.spikes == 3 and guard.rollbacks == 1
    assert torch.equal(log.weights[14], log.weights[13])  # the spiked batch moved no weight
    printed = capsys.readouterr().out
    assert "loss spike at step" in printed and "batch: epoch 4, micro-batch 3 of the epoch" in printed
    assert trainer.state.summary["nan_guard"]["spikes"] == 3


def test_spike_detection_is_off_by_default(tmp_path):
    guard = NaNGuard()
    make_trainer(tmp_path, [Spiker([14]), guard], batch_size=4, n=16, epochs=5, lr=0.05, doctor=False).fit()
    assert guard.spikes == 0 and guard.skipped == 0
