"""Hugging Face transformers causal LMs on the framework: built from a config or a local directory, their FLOPs per
token against torch's own counter, throughput figures, sampling through `generate`, and the language-model recipe
with `source: transformers` launched for real (export, fine-tuning, every CPU backend)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, pipeline

from framework.data.text import TextDataConfig, text_data
from framework.errors import ConfigError
from framework.models.causal_lm import CausalLMConfig, build_causal_lm, flops_per_token, transformer_flops_per_token
from framework.models.gpt import GPT, GPTConfig
from framework.techniques.text_sample import sample_text
from framework.tracking import peak_tflops, throughput
from helpers import ROOT, launch

SIZES = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def tiny_llama(tied: bool = False, attention: str = "eager") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied, **SIZES)
    return LlamaForCausalLM._from_config(config, attn_implementation=attention)


def counted_flops_per_token(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """torch's FlopCounterMode over one forward and backward, per token."""
    with FlopCounterMode(display=False) as counter:
        outputs = model(tokens)
        getattr(outputs, "logits", outputs).sum().backward()
    return counter.get_total_flops() / tokens.numel()


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_equals_torchs_flop_counter(tied):
    """6 per matrix weight plus 12·L·d·T of attention is exactly what torch counts (eager attention's two batched
    products), for a GQA Llama with a tied or untied head and for the framework's GPT (tied head)."""
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    llama = tiny_llama(tied)
    assert flops_per_token(llama, 32) == counted_flops_per_token(llama, tokens)
    gpt = GPT(GPTConfig(vocab_size=128, context_length=32, n_layer=2, n_head=4, n_embd=64, attention="naive"))
    assert flops_per_token(gpt, 32) == counted_flops_per_token(gpt, tokens)
    # by hand for the Llama: per layer q 64·64, k and v 64·32 each, o 64·64, three MLP matrices 64·96; the head 128·64
    matrices = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96) + 128 * 64
    assert flops_per_token(llama, 32) == transformer_flops_per_token(matrices, 2, 64, 32) == 6 * matrices + 12 * 2 * 64 * 32
    assert flops_per_token(torch.nn.Linear(3, 3), 32) is None  # a model whose shape is unknown


def test_peak_table_is_dense_bf16_and_mfu_follows():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # dense; 1979 would be the 2:4-sparse figure
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("Tesla T4") is None
    values = throughput(tokens_per_second=2e4, flops_per_token=3 * 10**9, processes=2, device=torch.device("cpu"))
    assert values == {"perf/tflops": pytest.approx(2e4 * 3e9 / 2 / 1e12)}  # per device; no MFU off the table


def test_build_from_architecture_and_sizes_and_clear_errors(tmp_path):
    special = {"eos": 0, "bos": None, "pad": None}
    model = build_causal_lm(CausalLMConfig(architecture="llama", sizes=SIZES), 300, 48, special)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 300
    assert model.config.max_position_embeddings == 48 and model.config.eos_token_id == 0
    assert model.config.use_cache is False  # training builds no KV cache
    with pytest.raises(ConfigError, match="not a transformers model type"):
        build_causal_lm(CausalLMConfig(architecture="lama"), 300, 48, special)
    with pytest.raises(ConfigError, match=r"\['hidden_sise'\] are not fields of LlamaConfig"):
        build_causal_lm(CausalLMConfig(sizes={"hidden_sise": 64}), 300, 48, special)
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        build_causal_lm(CausalLMConfig(pretrained="no-such-org/no-such-model"), 300, 48, special)
    model.save_pretrained(tmp_path / "saved")
    loaded = build_causal_lm(CausalLMConfig(pretrained=str(tmp_path / "saved")), 300, 48, special)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ConfigError, match="embeds 300 tokens but the tokenizer has 512"):
        build_causal_lm(CausalLMConfig(pretrained=str(tmp_path / "saved")), 512, 48, special)


def test_text_sample_goes_through_generate_and_is_reproducible():
    model = tiny_llama()
    model.config.use_cache = False
    first = sample_text(model, "ab", 12, seed=3)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    assert sample_text(model, "ab", 12, seed=3) == first  # the same seed, the same text
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's own random stream untouched
    assert model.training
    # what transformers' own sampling gives from the same seed, decoded as bytes (no tokenizer given)
    torch.manual_seed(3)
    reference = model.generate(torch.tensor([[97, 98]]), do_sample=True, max_new_tokens=12, min_new_tokens=12,
                               temperature=0.8, top_k=40, pad_token_id=0)
    assert first == bytes(t for t in reference[0].tolist() if t != 0).decode("utf-8", errors="replace")


# --- the recipe with `source: transformers`, launched ----------------------------------------------------------------

DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
LLAMA = ("--config", str(ROOT / "recipes" / "configs" / "llama_tiny.yaml"))
# A smaller run of the shipped config: a 512-token BPE, 64-token context, a few steps.
SMALL = ("--tracker", "none", "--data.vocab_size", "512", "--data.context_length", "64", "--data.max_eval_blocks",
         "32", "--log_every", "2", "--techniques.cosine_lr.warmup_steps", "2", "--techniques.text_sample.length", "8")


def run_llama(output_dir, *extra, launch_config="cpu.yaml", steps=6, launcher_args=()):
    result = launch(DUMP, *LLAMA, *SMALL, "--output_dir", str(output_dir), "--max_steps", str(steps), *extra,
                    launch_config=launch_config, env={"DUMP_RECIPE": "language_model"}, launcher_args=launcher_args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "summary.json").read_text())


def exported_test_loss(directory, context_length=64, blocks=32):
    """The test loss of output_dir/hf_model loaded by transformers alone, on the run's test blocks."""
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    data = text_data(TextDataConfig(tokenizer=str(directory), context_length=context_length, max_eval_blocks=blocks))
    nats = tokens = 0.0
    with torch.no_grad():
        for batch in data.loaders["test"]:
            logits = model(batch["input_ids"][:, :-1]).logits
            nats += F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum").item()
            tokens += batch["input_ids"][:, 1:].numel()
    return nats / tokens


def test_llama_recipe_exports_a_model_transformers_loads_and_fine_tunes_from_it(tmp_path):
    summary = run_llama(tmp_path / "run", steps=12)
    model_section = summary["model"]
    assert model_section["class"] == "LlamaForCausalLM"
    exported = tmp_path / "run" / "hf_model"
    loaded = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    assert model_section["parameters"] == loaded.num_parameters()
    assert model_section["flops_per_token"] == flops_per_token(loaded, 64)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["perf/tflops"] > 0 for line in logged if "train/loss" in line)
    assert "perf/mfu" not in logged[-1]  # no peak for a CPU
    # the exported weights and tokenizer reproduce the run's own test loss
    assert exported_test_loss(exported) == pytest.approx(summary["metrics"]["test/loss"], abs=1e-4)
    generate = pipeline("text-generation", model=str(exported), device="cpu")
    assert generate("def ", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("def ")
    assert (tmp_path / "run" / "sample.txt").read_text().startswith("def")
    # Fine-tuning from the export starts from its loss: with a vanishing LR the test loss is the export's.
    tuned = run_llama(tmp_path / "tuned", "--model.pretrained", str(exported), "--data.tokenizer", str(exported),
                      "--optimizer.lr", "1e-12", steps=3)
    assert tuned["metrics"]["test/loss"] == pytest.approx(summary["metrics"]["test/loss"], abs=1e-4)
    assert tuned["metrics"]["test/loss"] < math.log(512) - 0.5  # far from a fresh model's ln(vocab)


# launch config -> world size; the first three also resume bitwise from a mid-run checkpoint
LLAMA_BACKENDS = {"multi_cpu.yaml": 2, "deepspeed_zero2.yaml": 2, "cpu.yaml": 1, "bf16.yaml": 1,
                  "deepspeed_zero3.yaml": 2, "deepspeed_zero3_offload.yaml": 2}


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", list(LLAMA_BACKENDS))
def test_llama_recipe_on_every_cpu_backend(tmp_path, launch_config):
    """Trains (under ZeRO-3 from a model built partitioned, or built whole when the launch turns zero3_init_flag
    off), the ranks agree, the export (gathered from ZeRO-3's shards) loads and reproduces the test loss; on
    cpu, multi_cpu and ZeRO-2 a resume from step 3's checkpoint ends with the same weights bit for bit."""
    world_size = LLAMA_BACKENDS[launch_config]
    # ZeRO-3 builds the model partitioned (the launch config's zero3_init_flag: true); the offload case turns the
    # flag off at the launcher, so the model is built whole and partitioned when prepared, the other way.
    partitioned_init = {"deepspeed_zero3.yaml": True, "deepspeed_zero3_offload.yaml": False}.get(launch_config)
    launcher_args = ("--zero3_init_flag", "false") if partitioned_init is False else ()
    summary = run_llama(tmp_path / "run", "--checkpoint_every", "3", "--techniques.dump_params", "{}",
                        launch_config=launch_config, launcher_args=launcher_args)
    assert summary["run"]["num_processes"] == world_size and summary["run"]["steps"] == 6
    assert summary.get("model_built_partitioned") is partitioned_init
    losses = [line["train/loss"] for line in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "train/loss" in line]
    assert losses[-1] < losses[0] - 0.1, losses
    ranks = [load_file(tmp_path / "run" / f"params_rank{rank}.safetensors") for rank in range(world_size)]
    for other in ranks[1:]:
        assert all(torch.equal(ranks[0][name], other[name]) for name in ranks[0])
    precise = launch_config != "bf16.yaml"  # bf16 autocast evaluated the run; the check below runs in fp32
    assert exported_test_loss(tmp_path / "run" / "hf_model") == pytest.approx(
        summary["metrics"]["test/loss"], abs=1e-4 if precise else 2e-2)
    if launch_config not in ("cpu.yaml", "multi_cpu.yaml", "deepspeed_zero2.yaml"):
        return
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    run_llama(tmp_path / "resumed", "--resume_from", str(checkpoint), "--techniques.dump_params", "{}",
              launch_config=launch_config)
    resumed = load_file(tmp_path / "resumed" / "params_rank0.safetensors")
    assert all(torch.equal(resumed[name], ranks[0][name]) for name in ranks[0])
