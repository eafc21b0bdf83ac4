"""Techniques without the loop: Mixup / CutMix, EMA and SAM called from a plain PyTorch loop (no Trainer, no
Accelerator) against hand computations and torch's own references; SAM's standalone step equals the technique's; the
README's "Using a technique in your own loop" examples run and print what the README shows."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from framework.techniques import EMA, SAM, ema_decay, ema_update_, mix_batch, sample_lambda, sam_step
from helpers import ROOT, launch_environment, make_trainer, tiny_classification_data


# --- Mixup / CutMix -------------------------------------------------------------------------------------------------
def images(batch: int = 6, height: int = 5, width: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return torch.randn(batch, 2, height, width, generator=generator), torch.arange(batch) % 4


def mix_by_hand(x, y, num_classes, alpha, cutmix_alpha, switch_prob, prob, seed):
    """The mixing written out from the generator's draws, in the documented order: the `prob` coin, the permutation,
    the Mixup/CutMix switch, λ, the box's centre (y, then x)."""
    draws = torch.Generator().manual_seed(seed)
    if prob < 1.0 and torch.rand((), generator=draws).item() >= prob:
        return x, y, None, "clean"
    soft = F.one_hot(y, num_classes).float()
    permutation = torch.randperm(x.shape[0], generator=draws)
    cutmix = cutmix_alpha > 0 and (alpha == 0 or torch.rand((), generator=draws).item() < switch_prob)
    a = cutmix_alpha if cutmix else alpha
    lam = torch._sample_dirichlet(torch.tensor([a, a]), generator=draws)[0].item()  # λ ~ Beta(a, a)
    if not cutmix:
        return lam * x + (1 - lam) * x[permutation], lam * soft + (1 - lam) * soft[permutation], lam, "mixup"
    height, width = x.shape[-2:]
    cut_h, cut_w = round(height * math.sqrt(1 - lam)), round(width * math.sqrt(1 - lam))
    centre_y = torch.randint(height, (), generator=draws).item()
    centre_x = torch.randint(width, (), generator=draws).item()
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y - cut_h // 2 + cut_h, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x - cut_w // 2 + cut_w, width)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[permutation][:, :, top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
    return mixed, lam * soft + (1 - lam) * soft[permutation], lam, "cutmix"


def test_mix_batch_with_a_seeded_generator_repeats_and_leaves_the_global_rng_alone():
    x, y = images()
    global_state = torch.get_rng_state()
    first = mix_batch(x, y, 4, alpha=0.4, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(5))
    second = mix_batch(x, y, 4, alpha=0.4, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)  # every draw came from the generator
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]
    other = mix_batch(x, y, 4, alpha=0.4, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(first[0], other[0])


def test_mix_batch_equals_the_hand_computation_from_the_same_draws():
    x, y = images()
    kinds = set()
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        mixed, targets, lam = mix_batch(x, y, 4, alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, prob=0.8,
                                        generator=generator)
        expected_x, expected_y, expected_lam, kind = mix_by_hand(x, y, 4, 0.4, 1.0, 0.5, 0.8, seed)
        kinds.add(kind)
        if kind == "clean":
            assert lam is None and mixed is x and targets is y
            continue
        assert lam == pytest.approx(expected_lam, abs=1e-12), (seed, kind)
        torch.testing.assert_close(mixed, expected_x, rtol=0, atol=1e-6)
        torch.testing.assert_close(targets, expected_y, rtol=0, atol=1e-6)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert kinds == {"clean", "mixup", "cutmix"}  # every branch was checked


def test_sample_lambda_is_beta_and_without_a_generator_is_the_techniques_draw():
    generator = torch.Generator().manual_seed(0)
    draws = [sample_lambda(0.4, generator) for _ in range(3000)]
    assert stats.kstest(draws, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    assert stats.kstest(draws, stats.beta(0.4, 1.0).cdf).pvalue < 1e-6  # the test can tell a wrong shape apart
    # No generator: torch's global RNG, the very number torch.distributions.Beta draws (resumes rely on it).
    torch.manual_seed(7)
    ours = sample_lambda(0.4)
    torch.manual_seed(7)
    assert ours == float(torch.distributions.Beta(0.4, 0.4).sample())


# --- EMA ------------------------------------------------------------------------------------------------------------
def test_ema_decay_against_hand_values_and_the_technique():
    assert ema_decay(0, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup=True) == pytest.approx(1 / 10)
    assert ema_decay(9, 0.999, warmup=True) == pytest.approx(10 / 19)
    assert ema_decay(5000, 0.999, warmup=True) == pytest.approx(5001 / 5010)  # still warming up
    assert ema_decay(20000, 0.999, warmup=True) == 0.999  # 20001 / 20010 > 0.999: the decay itself
    assert ema_decay(3, 0.9, update_every=4) == pytest.approx(0.9**4)
    assert ema_decay(1, 0.99, warmup=True, update_every=2) == pytest.approx(2 / 11)
    technique = EMA(decay=0.99, warmup=True, update_every=2)
    for n in range(50):
        technique.num_updates = n
        assert technique.current_decay() == ema_decay(n, 0.99, warmup=True, update_every=2)


def plain_training(steps: int):
    """A Linear(4, 3) classifier and SGD on fixed batches; yields after each optimizer step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(steps, 8, 4, generator=data), torch.randint(3, (steps, 8), generator=data)
    return model, optimizer, x, y


def test_ema_update_in_a_plain_loop_equals_a_hand_lerp_and_torchs_averaged_model():
    model, optimizer, x, y = plain_training(20)
    ema = [p.detach().clone() for p in model.parameters()]
    by_hand = [p.detach().clone() for p in model.parameters()]
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))  # constant decay, torch's own
    reference.update_parameters(model)  # its first call copies the weights: the same start as ours
    constant = [p.detach().clone() for p in model.parameters()]
    for step in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(x[step]), y[step]).backward()
        optimizer.step()
        decay = ema_decay(step, 0.9, warmup=True)
        ema_update_(ema, list(model.parameters()), decay)
        by_hand = [decay * e + (1 - decay) * p.detach() for e, p in zip(by_hand, model.parameters())]
        ema_update_(constant, list(model.parameters()), 0.9)
        reference.update_parameters(model)
    for ours, hand in zip(ema, by_hand):
        torch.testing.assert_close(ours, hand, rtol=1e-6, atol=1e-7)
    for ours, torchs in zip(constant, reference.module.parameters()):
        assert torch.equal(ours, torchs)
    live = list(model.parameters())
    assert not torch.allclose(ema[0], live[0], atol=1e-3)  # an average, not a copy of the live weights


# --- SAM ------------------------------------------------------------------------------------------------------------
def linear_gradient(w, b, x, y):
    """∂/∂(w, b) of mean((x wᵀ + b − y)²) for a Linear(3, 1), by hand."""
    residual = x @ w.T + b - y  # (N, 1)
    return 2 * residual.T @ x / len(x), 2 * residual.sum(0) / len(x)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_in_a_plain_loop_equals_the_hand_formula(adaptive):
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.25]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 0.5, -1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([[1.0], [0.0], [-1.0], [2.0]])
    rho = 0.3

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    closure()
    second_loss = sam_step(model.parameters(), closure, optimizer, rho=rho, adaptive=adaptive)

    w, b = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([0.25])
    gw, gb = linear_gradient(w, b, x, y)
    if adaptive:  # e = rho · w² g / ‖|w| g‖
        norm = torch.sqrt(((w.abs() * gw) ** 2).sum() + ((b.abs() * gb) ** 2).sum())
        ew, eb = rho * w**2 * gw / norm, rho * b**2 * gb / norm
    else:  # e = rho · g / ‖g‖
        norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
        ew, eb = rho * gw / norm, rho * gb / norm
    gw2, gb2 = linear_gradient(w + ew, b + eb, x, y)  # the gradient at the worst nearby point
    torch.testing.assert_close(model.weight.detach(), w - 0.1 * gw2)
    torch.testing.assert_close(model.bias.detach(), b - 0.1 * gb2)
    torch.testing.assert_close(second_loss.detach(), ((x @ (w + ew).T + b + eb - y) ** 2).mean())
    assert not torch.allclose(gw2, gw)  # the step used the second gradient, not the first


def test_sam_step_equals_the_sam_technique_in_the_loop(tmp_path):
    trainer = make_trainer(tmp_path, [SAM(rho=0.2)], batch_size=2, n=8, epochs=2)
    trainer.fit()
    torch.manual_seed(0)  # make_trainer's model, data and optimizer, trained in a plain loop
    model = torch.nn.Linear(4, 3)
    initial_weights = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = tiny_classification_data(8)
    for _ in range(2):
        for start in range(0, 8, 2):
            x = torch.stack([d["pixel_values"] for d in data[start:start + 2]])
            y = torch.stack([d["label"] for d in data[start:start + 2]])

            def closure():
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            closure()
            sam_step(model.parameters(), closure, optimizer, rho=0.2)
    for ours, technique, initial in zip(model.parameters(), trainer.state.model.parameters(), initial_weights,
                                         strict=True):
        torch.testing.assert_close(ours.detach(), technique.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours.detach(), initial, atol=1e-3)  # both trained


# --- the README's examples ------------------------------------------------------------------------------------------
README = (ROOT / "README.md").read_text()
README_SECTION = re.split(r"\n##+ ", README.split("### Using a technique in your own loop", 1)[-1], maxsplit=1)[0]
EXAMPLES = re.findall(r"```python\n(.*?)```", README_SECTION, flags=re.S)


def numbers_and_words(line: str) -> tuple[list[str], list[float]]:
    pattern = r"-?\d+\.\d+(?:e-?\d+)?"
    return re.split(pattern, line), [float(n) for n in re.findall(pattern, line)]


def test_readme_section_has_the_three_examples():
    assert "\n### Using a technique in your own loop\n" in README
    assert len(EXAMPLES) == 3
    for example, name in zip(EXAMPLES, ["mix_batch", "ema_update_", "sam_step"]):
        assert name in example


@pytest.mark.parametrize("index", range(3))
def test_readme_example_runs_and_prints_what_the_readme_shows(index):
    example = EXAMPLES[index]
    expected = re.findall(r"# -> (.*)$", example, flags=re.M)
    assert expected, "each example shows what it prints after `# -> `"
    result = subprocess.run([sys.executable, "-c", example], cwd=ROOT, env=launch_environment(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()
    assert len(printed) == len(expected), (printed, expected)
    for line, shown in zip(printed, expected):
        (words, values), (shown_words, shown_values) = numbers_and_words(line), numbers_and_words(shown.strip())
        assert words == shown_words, (line, shown)
        assert values == pytest.approx(shown_values, abs=2e-4), (line, shown)
