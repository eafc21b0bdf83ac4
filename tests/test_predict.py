"""A finished run used on its own: `python -m framework.predict` and `--evaluate_only true`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from framework.data import ImageDataConfig, image_data
from framework.data.images import preprocess_images
from framework.predict import load_run, predict
from helpers import ROOT, launch, launch_environment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The image recipe's default config, shortened, without EMA (so test/* are the final weights' metrics)."""
    run = tmp_path_factory.mktemp("run")
    result = launch(ROOT / "recipes" / "image_classification.py", "--max_steps", "60", "--tracker", "none",
                    "--techniques.ema", "null", "--output_dir", str(run), "--data.num_workers", "0")
    assert result.returncode == 0
    return run


def test_predict_names_the_top_classes_with_the_models_probabilities(finished_run, tmp_path):
    """Images saved as PNG files, read back by predict: the same tensors the run's evaluation built for them, and
    the printed classes and probabilities are the rebuilt model's on those tensors."""
    data = image_data(ImageDataConfig(num_workers=0))
    test = data.splits["test"]
    column = data.loaders["test"].dataset.image_transform.image_column
    paths = []
    for index in range(8):
        path = tmp_path / f"digit_{index}.png"
        test[index][column].save(path)
        paths.append(path)
    printed = subprocess.run([sys.executable, "-m", "framework.predict", str(finished_run), *map(str, paths),
                              "--top", "2"], capture_output=True, text=True, env=launch_environment(), cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 8
    preprocessor = json.loads((finished_run / "preprocessor.json").read_text())
    assert preprocessor["class_names"] == [str(i) for i in range(10)] and preprocessor["image_mode"] == "L"

    model, preprocessor = load_run(finished_run)
    evaluated = torch.stack([data.loaders["test"].dataset[i]["pixel_values"] for i in range(8)])
    assert torch.equal(preprocess_images(preprocessor, [Image.open(p) for p in paths]), evaluated)
    with torch.no_grad():
        probabilities = model(evaluated).softmax(-1)
    correct = 0
    for line, row, index in zip(lines, probabilities, range(8)):
        top = row.topk(2)
        assert line == f"{paths[index]}: " + ", ".join(
            f"{i} {p:.4f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        correct += top.indices[0].item() == test[index]["label"]
    assert correct >= 6  # a trained digit classifier
    assert predict(model, preprocessor, [Image.open(paths[0])], top=1)[0][0][0] == lines[0].split(": ")[1].split()[0]


def test_evaluate_only_reproduces_the_runs_test_metrics_and_keeps_the_run(finished_run):
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    summary = json.loads((finished_run / "summary.json").read_text())
    result = launch(ROOT / "recipes" / "image_classification.py", "--evaluate_only", "true", "--tracker", "none",
                    "--techniques.ema", "null", "--output_dir", str(finished_run), "--data.num_workers", "0")
    assert result.returncode == 0
    evaluation = json.loads((finished_run / "evaluation.json").read_text())["metrics"]
    for key in ("val/loss", "val/accuracy", "test/loss", "test/accuracy"):
        assert evaluation[key] == pytest.approx(summary["metrics"][key], rel=1e-5), key
    assert "test/accuracy" in result.stdout
    after = {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the run was touched


def test_predict_without_a_run_is_one_clear_error(tmp_path):
    printed = subprocess.run([sys.executable, "-m", "framework.predict", str(tmp_path), "x.png"],
                             capture_output=True, text=True, env=launch_environment(), cwd=ROOT)
    assert printed.returncode == 2
    assert printed.stderr.startswith("error: ") and "lacks model.json" in printed.stderr
    assert "Traceback" not in printed.stderr
