"""The ablation harness (benchmarks/ablation.py): the low-data subsample it trains on (`data.train_per_class`), its
statistics against hand computations, and one real `--smoke` run of the whole harness."""

from __future__ import annotations

import collections
import json
import math
import sys

import numpy as np
import pytest

from framework.data import ImageDataConfig, image_data
from framework.data.sources import per_class_subset
from framework.errors import ConfigError
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablation  # noqa: E402


# --- data.train_per_class ------------------------------------------------------------------------------------------
def splits(**config):
    return image_data(ImageDataConfig(num_workers=0, **config)).splits


def test_train_per_class_keeps_exactly_n_per_class_and_leaves_validation_and_test_whole():
    full, low = splits(), splits(train_per_class=7)
    assert collections.Counter(low["train"]["label"]) == {label: 7 for label in range(10)}
    for split in ("validation", "test"):
        assert low[split]["image"] == full[split]["image"] and low[split]["label"] == full[split]["label"]
    # a subset of the training split, each image once
    full_train = {image.tobytes() for image in full["train"]["image"]}
    low_train = [image.tobytes() for image in low["train"]["image"]]
    assert len(set(low_train)) == 70 and set(low_train) <= full_train


def test_train_per_class_depends_on_the_split_seed_only():
    a, b = splits(train_per_class=5), splits(train_per_class=5)
    assert a["train"]["image"] == b["train"]["image"]
    loaders = image_data(ImageDataConfig(num_workers=0, train_per_class=5), seed=3)  # another training seed
    assert loaders.splits["train"]["image"] == a["train"]["image"]
    other = splits(train_per_class=5, split_seed=1)
    assert other["train"]["image"] != a["train"]["image"]


def test_per_class_subset_draws_from_a_seeded_generator():
    import datasets

    data = datasets.Dataset.from_dict({"label": [0, 0, 0, 1, 1, 2, 2, 2, 2]},
                                      features=datasets.Features({"label": datasets.ClassLabel(names=["a", "b", "c"])}))
    picked = per_class_subset(data.add_column("row", list(range(9))), 2, seed=4, label_column="label")["row"]
    generator = np.random.default_rng(4)  # the same draws by hand: class by class, without replacement
    expected = sorted(int(i) for rows in ([0, 1, 2], [3, 4], [5, 6, 7, 8])
                      for i in generator.choice(rows, 2, replace=False))
    assert picked == expected


@pytest.mark.parametrize("per_class, words", [(0, "must be at least 1"), (-3, "must be at least 1")])
def test_train_per_class_below_one_is_refused_before_loading(per_class, words):
    with pytest.raises(ConfigError, match=f"{words}.*--data.train_per_class 1"):
        ImageDataConfig(train_per_class=per_class)


def test_train_per_class_above_a_class_size_names_the_class_and_the_largest_n():
    with pytest.raises(ConfigError) as error:
        splits(train_per_class=200)  # the digits' training split has ~125 images per class
    message = str(error.value)
    assert "fewer images than that" in message and "Pass --data.train_per_class" in message
    counts = collections.Counter(splits()["train"]["label"])
    assert f"--data.train_per_class {min(counts.values())} or fewer" in message


# --- statistics ----------------------------------------------------------------------------------------------------
def test_compare_matches_welchs_interval_and_p_by_hand():
    a, b = [92.0, 94.5, 93.0, 95.5, 94.0], [90.0, 91.5, 89.0, 92.5, 91.0]
    va, vb, n = np.var(a, ddof=1), np.var(b, ddof=1), 5
    se = math.sqrt(va / n + vb / n)
    df = (va / n + vb / n) ** 2 / ((va / n) ** 2 / (n - 1) + (vb / n) ** 2 / (n - 1))  # Welch–Satterthwaite
    t = (np.mean(a) - np.mean(b)) / se
    half = scipy_t().ppf(0.975, df) * se
    result = ablation.compare(a, b)
    assert result["difference"] == pytest.approx(3.0)
    assert result["low"] == pytest.approx(3.0 - half) and result["high"] == pytest.approx(3.0 + half)
    assert result["p"] == pytest.approx(2 * scipy_t().sf(abs(t), df))
    assert 0 < result["low"] and result["p"] < 0.01


def scipy_t():
    import scipy.stats

    return scipy.stats.t


def test_compare_with_one_seed_has_no_interval():
    result = ablation.compare([93.0], [91.0])
    assert result["difference"] == 2.0 and math.isnan(result["low"]) and math.isnan(result["p"])
    assert ablation.verdict(result["low"], result["high"]) == "too few seeds"


@pytest.mark.parametrize("low, high, higher_is_better, word", [
    (0.5, 2.0, True, "helps"), (-2.0, -0.5, True, "hurts"), (-0.5, 2.0, True, "no measurable effect"),
    (-0.2, -0.05, False, "helps"), (0.05, 0.2, False, "hurts"), (-0.1, 0.1, False, "no measurable effect"),
])
def test_verdict_reads_the_interval_in_the_metrics_direction(low, high, higher_is_better, word):
    assert ablation.verdict(low, high, higher_is_better) == word


def test_verdict_follows_the_interval_not_the_mean():
    # a large mean gain with a wide spread: the interval straddles 0, so no claim is made
    noisy = ablation.compare([99.0, 80.0, 98.0, 82.0, 99.0], [89.0, 90.0, 88.0, 91.0, 90.0])
    assert noisy["difference"] > 0 and noisy["low"] < 0 < noisy["high"]
    assert ablation.verdict(noisy["low"], noisy["high"]) == "no measurable effect"


def test_rows_time_ratio_is_paired_by_seed_and_bits_per_byte_lower_is_better():
    regime = ablation.lm_overfit()
    runs = {"baseline": [{"seed": s, "metric": m, "seconds": t} for s, m, t in
                         ((0, 3.70, 10.0), (1, 3.72, 20.0), (2, 3.69, 10.0))],
            "dropout": [{"seed": s, "metric": m, "seconds": t} for s, m, t in
                        ((0, 3.50, 11.0), (1, 3.52, 22.0), (2, 3.51, 11.0))]}
    baseline, dropout = ablation.rows(regime, runs)
    assert baseline["mean"] == pytest.approx(3.7033333) and "verdict" not in baseline
    assert dropout["time_ratio"] == pytest.approx(1.1)
    assert dropout["difference"] == pytest.approx(3.51 - 3.70333333) and dropout["verdict"] == "helps"
    assert "| dropout | 3.5100 ± 0.0100 | -0.1933 [" in ablation.markdown(regime, [baseline, dropout])


def test_every_variant_parses_as_the_recipe_reads_it(tmp_path):
    """Each variant's command line is a valid config of its recipe (a typo in a technique's arguments fails here,
    not 20 minutes into `make ablate`)."""
    from framework.config import configured_techniques, parse_config
    from helpers import load_recipe

    for regime, config_name in ((ablation.digits_low_data(), "ImageClassificationConfig"),
                                (ablation.lm_overfit(), "LanguageModelConfig")):
        config_class = getattr(load_recipe(regime.recipe.removesuffix(".py")), config_name)
        for variant in regime.variants:
            config = parse_config(config_class, ablation.command(regime, variant, 3, regime.epochs, tmp_path,
                                                                 tmp_path / "out", 7 if variant.equal_time else None))
            names = [type(t).__name__ for t in configured_techniques(config)]
            assert config.seed == 3 and len(names) == len({**regime.base_techniques, **variant.techniques})
            assert config.max_steps == (7 if variant.equal_time else None)
            if regime.name == "digits_low_data":
                assert config.data.train_per_class == 10 and config.epochs == regime.epochs
                assert bool(config.data.augment) == ("augmentation" in variant.name or "all" in variant.name)


def test_the_combination_keeps_digits_regularizeds_mixing_share_also_when_cut_to_equal_time():
    regime = ablation.digits_low_data(epochs=50)
    at_equal_epochs, at_equal_time = (v for v in regime.variants if v.name.startswith("digits_regularized"))
    assert at_equal_time.equal_time and ablation.equal_time_partner(regime) == at_equal_epochs.name
    assert at_equal_epochs.techniques["mixup"]["stop_epoch"] == round(34 / 40 * 50)  # the config: 34 of 40 epochs
    shortened = regime.shorten(at_equal_time.techniques, 25.0)
    assert shortened["mixup"]["stop_epoch"] == round(34 / 40 * 25)
    assert {k: v for k, v in shortened.items() if k != "mixup"} == {
        k: v for k, v in at_equal_time.techniques.items() if k != "mixup"}


def test_an_equal_time_run_is_submitted_after_the_next_seeds_first_runs_and_every_run_once():
    regime = ablation.digits_low_data(epochs=50)
    equal_time = next(v for v in regime.variants if v.equal_time)
    partner = ablation.equal_time_partner(regime)
    order = [(seed, v.name) for seed, v in ablation.submission_order(regime.variants, [0, 1, 2], jobs=2)]
    assert sorted(order) == sorted((seed, v.name) for seed in [0, 1, 2] for v in regime.variants)
    for seed in [0, 1]:  # `jobs` runs of the next seed start between its partner and it
        at = order.index((seed, equal_time.name))
        assert order[at - 2:at] == [(seed + 1, regime.variants[0].name), (seed + 1, regime.variants[1].name)]
        assert order.index((seed, partner)) < at - 2
    assert order[-1] == (2, equal_time.name)
    without = [v for v in regime.variants if not v.equal_time]  # no equal-time run: plain seed-major order
    assert ablation.submission_order(without, [0, 1], 2) == [(seed, v) for seed in [0, 1] for v in without]


def test_the_runs_get_the_environment_accelerate_launch_gives_its_process():
    launched = ablation.launcher_environment()
    assert launched["ACCELERATE_USE_CPU"] == "True" and launched["ACCELERATE_MIXED_PRECISION"] == "no"
    assert launched["OMP_NUM_THREADS"] == "1" and launched["PYTHONPATH"].split(":")[0] == str(ROOT)


# --- the harness, for real -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_writes_json_markdown_and_figure(tmp_path):
    record = ablation.main(["--smoke", "--out-dir", str(tmp_path)])
    written = json.loads((tmp_path / "ablation.json").read_text())
    regime = written["regimes"]["digits_low_data"]
    assert set(regime["runs"]) == {"baseline", "ema"} and all(len(r) == 1 for r in regime["runs"].values())
    assert all(0 <= run["metric"] <= 1 and run["seconds"] > 0 and 0 <= run["train_accuracy"] <= 1
               for runs in regime["runs"].values() for run in runs)
    assert [row["variant"] for row in regime["rows"]] == ["baseline", "ema"]
    assert regime["rows"][1]["verdict"] == "too few seeds"  # one seed: no interval, no claim
    table = (tmp_path / "ablation.md").read_text()
    assert "| baseline |" in table and "| ema |" in table
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert regime["rows"][1]["low"] is None and regime["rows"][1]["p"] is None  # strict JSON: null, not NaN
    assert [row["mean"] for row in record["regimes"]["digits_low_data"]["rows"]] == [
        row["mean"] for row in regime["rows"]]
