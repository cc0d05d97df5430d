"""TPU targets: names, the ``--target`` dry run compiled by libtpu, its OOM verdict, the planner.

The compiles run XLA:TPU on this CPU (libtpu, ``pip install -e '.[tpu]'``); they skip with
that reason where libtpu is absent. Small models on 4-chip slices keep them to seconds.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax.config import load_config
from gptjax.errors import GptjaxError
from gptjax.targets import libtpu_available, parse_target

needs_libtpu = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]')"
)


@pytest.mark.parametrize(
    ("name", "chips", "topology"),
    [
        ("v5e-16", 16, "v5e:4x4"),
        ("v5litepod-16", 16, "v5e:4x4"),
        ("v5e-8", 8, "v5e:2x4"),
        ("v6e-8", 8, "v6e:2x4"),
        ("v4-32", 16, "v4:2x2x4"),
        ("v5p-128", 64, "v5p:4x4x4"),
        ("v5p-8", 4, "v5p:2x2x1"),
    ],
)
def test_cloud_tpu_names(name, chips, topology):
    target = parse_target(name)
    assert (target.chips, target.topology) == (chips, topology)


@pytest.mark.parametrize("name", ["v5e-12", "v7x-8", "v5p-3", "v5e-512", "tpu"])
def test_bad_target_names_say_what_is_expected(name):
    with pytest.raises(GptjaxError, match="target"):
        parse_target(name)


def test_several_slices():
    target = parse_target("v5e-16x2")
    assert (target.num_slices, target.devices) == (2, 32)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptjax.cli", *args], capture_output=True, text=True, check=False, timeout=600
    )


@needs_libtpu
def test_dry_run_for_a_tpu_target_reports_memory_flops_and_collectives():
    out = cli("train", "nano", "train.batch_size=8", "mesh.fsdp=-1", "mesh.data=1",
              "--dry-run", "--target", "v5e-4", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["fits"] and report["target_bytes"] == 16 * 2**30
    assert 0 < report["total_bytes"] < 2**30 and report["temp_bytes"] >= 0
    assert report["flops_per_step"] > 0 and report["compile_s"] > 0
    assert report["collectives"]["all-gather"]["bytes"] > 0 and report["collective_bytes"] > 0


@needs_libtpu
def test_hbm_oom_is_a_verdict_not_a_traceback():
    """gpt2-xl replicated on 4 v5e chips: 18 GiB of state alone; the compiler stops, we say so."""
    out = cli("train", "gpt2-xl", "model.dtype=bfloat16", "train.batch_size=4", "--dry-run", "--target=v5e-4")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "does NOT fit" in out.stdout and "exceeds available HBM" in out.stdout


def test_dry_run_target_errors_are_one_line():
    out = cli("train", "nano", "--dry-run", "--target", "v9x-4")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown target 'v9x-4'" in out.stderr


@needs_libtpu
def test_plan_finds_a_layout_that_the_dry_run_confirms():
    from gptjax.plan import plan
    from gptjax.preflight import tpu_dry_run

    config = load_config("nano", ["train.batch_size=8"])
    result = plan(config, "v5e-4", compile=1)
    best = result["best"]
    assert best is not None and best["fits"] and best["objective_s"] > 0
    assert result["considered"] > len(result["compiled"])
    from gptjax.config import apply_overrides

    report = tpu_dry_run(apply_overrides(config, result["override"].split()), "v5e-4")
    assert report["fits"] and report["mesh"] == {k: best[k] for k in ("data", "fsdp", "tensor")}


ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "configs/tpu_gpt2_v5e8.py": "v5e-8",
    "configs/tpu_gpt2xl_v5e16.py": "v5e-16",
    "configs/tpu_gpt2xl_v5p32.py": "v5p-32",
}


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "target"), RECIPES.items())
def test_tpu_recipes_compile_fit_and_say_so(recipe, target):
    """Each TPU recipe fits its target, at the per-chip size its docstring states (within 5%)."""
    from gptjax.preflight import tpu_dry_run

    path = ROOT / recipe
    stated = float(re.search(r"([\d.]+) GiB; fits", path.read_text()).group(1))
    report = tpu_dry_run(load_config(str(path)), target)
    assert report["fits"]
    assert report["total_bytes"] / 2**30 == pytest.approx(stated, rel=0.05)
