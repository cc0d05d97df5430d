"""``gptjax info`` through the CLI entry point: parameter counts of the GPT-2 family."""

import json
import re

import pytest

from gptjax.cli import main
from gptjax.config import load_config, param_counts

# The sizes of the released GPT-2 checkpoints (HF transformers' num_parameters()).
GPT2_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-xl": 1_557_611_200}


def run_info(capsys, *argv: str) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("preset", "params"), GPT2_PARAMS.items())
def test_info_json_gpt2_sizes(capsys, preset, params):
    result = run_info(capsys, preset)
    assert result["name"] == preset
    assert result["params"] == params
    assert result["non_embedding_params"] + result["embedding_params"] == params
    assert result["param_bytes_fp32"] == 4 * params
    assert result["model"]["n_layer"] == load_config(preset).model.n_layer


def test_info_gpt2_non_embedding_and_flops(capsys):
    result = run_info(capsys, "gpt2")
    # Kaplan et al.'s N: everything but the 50257 x 768 tokens and 1024 x 768 positions.
    assert result["non_embedding_params"] == 124_439_808 - 50257 * 768 - 1024 * 768 == 85_056_000
    n_matmul = 85_056_000 + 50257 * 768  # the tied head is still a matmul
    assert result["flops_per_token"] == 6 * n_matmul + 6 * 12 * 1024 * 768


def test_info_table(capsys):
    assert main(["info", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "parameters" in out


def test_info_with_overrides(capsys):
    result = run_info(capsys, "gpt2", "model.n_layer=6", "model.tie_embeddings=false")
    model = load_config("gpt2", ["model.n_layer=6", "model.tie_embeddings=false"]).model
    assert result["params"] == param_counts(model)["total"]
    assert result["params"] == 124_439_808 - 6 * 7_087_872 + 50257 * 768  # 7,087,872 per block
    # An override alone (no config) applies to the quick start.
    result = run_info(capsys, "model.n_layer=2")
    assert result["name"] == "quickstart" and result["model"]["n_layer"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gpt5"], "unknown config 'gpt5'"),
        (["gpt2", "model.n_head=7"], r"n_embd \(768\) must be divisible by n_head \(7\)"),
        (["gpt2", "model.n_layers=7"], "unknown config key 'model.n_layers'"),
    ],
)
def test_info_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(["info", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax info: error: ")
    assert re.search(message, lines[0])
