"""Smoke tests of the train benchmark, the PyTorch reference and the dry run.

The benchmark runs end to end on a tiny model (one round, two steps) and its JSON schema
is checked; the reference is checked to compute the same losses as our train step on
the same weights; the dry run's memory report is checked for consistency.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax.config import MODEL_PRESETS, Config, DataConfig, MeshConfig, OptimConfig, TrainConfig
from gptjax.launch import with_cpu_devices

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nano_config(batch_size: int = 8, **model) -> Config:
    return Config(
        name="bench-test",
        model=dataclasses.replace(MODEL_PRESETS["nano"], **model),
        data=DataConfig(tokenizer="bytes"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-3, schedule="constant", warmup_steps=0),
        train=TrainConfig(steps=10, batch_size=batch_size),
    )


def test_bench_train_smoke_schema():
    pytest.importorskip("torch")
    env = {**os.environ, "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1)}
    script = str(ROOT / "scripts" / "bench_train.py")
    out = subprocess.run(
        [sys.executable, script, "--smoke", "--no-parity", "--json-only", "--cpu-devices", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    runs = [json.loads(line) for line in lines[:-1]]
    assert {r["impl"] for r in runs} == {"jax", "torch"}
    summary = json.loads(lines[-1])
    assert summary["command"].startswith("python scripts/bench_train.py")
    assert {"backend", "cpu_count", "jax"} <= set(summary["machine"])
    (row,) = summary["results"]
    assert (row["shape"], row["batch_size"], row["seq_len"]) == ("smoke", 4, 64)
    assert row["peak_flops"] > 0 and "6 * n_layer * T * n_embd" in row["flops_formula"]
    for impl in ("jax", "torch"):
        r = row[impl]
        assert len(r["step_time_per_round"]) == 1 and r["step_time_s"] > 0
        assert r["tokens_per_sec"] == pytest.approx(4 * 64 / r["step_time_s"])
        assert 0 < r["mfu"] < 1
    assert row["jax"]["compile_s"] > 0 and row["jax"]["n_devices"] == 2
    assert row["speedup_vs_torch"] == pytest.approx(row["torch"]["step_time_s"] / row["jax"]["step_time_s"])


def test_torch_reference_matches_our_train_step():
    """Same weights and batch: the same loss at step 0 and, after one AdamW update, at step 1."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT))
    try:
        result = _bench_module().worker_parity(_nano_config(), threads=1)
    finally:
        sys.path.remove(str(ROOT))
    assert result["ours"][0] == pytest.approx(math.log(257), abs=0.1)  # ~ln(V) at init
    assert result["torch"] == pytest.approx(result["ours"], abs=1e-5)
    assert result["ours"][1] < result["ours"][0]  # the update did something


@pytest.mark.multidevice
def test_dry_run_reports_compiled_memory():
    from gptjax.preflight import dry_run, format_report

    config = _nano_config()
    report = dry_run(config, device_memory=2**40)
    assert report["method"].startswith("compiled")
    assert report["devices"] == 8 and report["mesh"]["data"] == 8
    n_params = report["params"]
    assert report["params_bytes"] == 4 * n_params  # replicated: every device holds all of them
    assert report["opt_state_bytes"] >= 2 * report["params_bytes"]  # AdamW's two moments
    assert report["argument_bytes"] >= report["params_bytes"] + report["opt_state_bytes"]
    assert report["total_bytes"] >= report["argument_bytes"] + report["temp_bytes"] - report["alias_bytes"]
    assert report["fits"] and "fits" in format_report(report)
    tiny = dry_run(config, device_memory=1024)
    assert not tiny["fits"] and "does NOT fit" in format_report(tiny)


def test_dry_run_on_more_devices_than_visible_shards_the_state():
    from gptjax.preflight import dry_run

    config = dataclasses.replace(_nano_config(batch_size=16), mesh=MeshConfig(data=1, fsdp=16))
    report = dry_run(config, n_devices=16)
    assert "16 fake CPU devices" in report["method"]
    assert report["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    # embed (32) is split 16 ways wherever it appears, so each device holds far less than all
    assert report["params_bytes"] < 4 * report["params"] / 4


def test_analytic_estimate_counts_state_and_activations():
    from gptjax.preflight import _analytic

    config = _nano_config()
    sizes = {
        "mesh": {"data": 8, "fsdp": 1, "tensor": 1},
        "params_bytes": 1000,
        "opt_state_bytes": 2000,
        "batch_bytes": 10,
    }
    est = _analytic(config, sizes)
    assert est["method"].startswith("analytic")
    assert est["total_bytes"] > 3010 and est["argument_bytes"] == 3010


@pytest.mark.multidevice
def test_cpu_devices_share_the_measured_peak(monkeypatch):
    """The 8 fake CPU devices of the suite share the cores the probe measured: per-device
    peak x devices is the probe's rate, not 8 times it (MFU would read 8x too low)."""
    import jax

    from gptjax import metrics

    monkeypatch.setattr(metrics, "measured_cpu_peak", lambda: 8e11)
    peak, source = metrics.peak_flops("float32")
    assert jax.local_device_count() == 8
    assert (
        peak * 8 == pytest.approx(8e11)
        and source == "measured (float32 matmul probe, shared by 8 CPU devices)"
    )
    assert metrics.peak_flops("float32", configured=3e12) == (3e12, "configured")


def test_bench_vocab_smoke_schema():
    env = {**os.environ, "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1)}
    script = str(ROOT / "scripts" / "bench_vocab.py")
    args = ["--shape", "smoke", "--vocabs", "257", "320", "--rounds", "2", "--steps", "1"]
    out = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[0])
    rows = report["results"]
    assert [r["vocab_size"] for r in rows] == [257, 320]
    assert rows[0]["speedup_vs_first"] == 1.0
    for row in rows:
        assert len(row["step_s_rounds"]) == 2 and row["step_s_median"] > 0
        assert math.isfinite(row["last_loss"]) and row["compile_s"] > 0
    assert "vs 257" in out.stdout  # the table


@pytest.mark.parametrize("kind, generation", [("TPU v5 lite", "v5e"), ("TPU v6e", "v6e"), ("TPU v4", "v4")])
def test_tpu_peaks_come_from_the_generations_table(monkeypatch, kind, generation):
    """MFU on a TPU and `gptjax plan` read one table (gptjax.targets.GENERATIONS)."""
    import jax

    from gptjax import metrics
    from gptjax.targets import GENERATIONS

    class FakeTpu:
        platform, device_kind = "tpu", kind

    monkeypatch.setattr(jax, "devices", lambda: [FakeTpu()])
    peak = GENERATIONS[generation].peak_flops
    assert metrics.peak_flops("bfloat16") == (peak, f"table ({kind}, bfloat16)")
    assert metrics.peak_flops("float32")[0] == pytest.approx(peak / 3)
