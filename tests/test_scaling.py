"""Scaling sweeps: fits recover known laws, a real sweep end to end, resume after a kill, bad input."""

import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax import cli, scaling
from gptjax.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    param_counts,
)
from gptjax.errors import GptjaxError
from gptjax.launch import with_cpu_devices

train_lib = importlib.import_module("gptjax.train")
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

# Kaplan et al. (2020), eqs. 1.1-1.3: exponent, scale (N_c params, D_c tokens, C_c FLOPs =
# 3.1e8 PF-days), and the x range the synthetic points span.
KAPLAN = {
    "N": (0.076, 8.8e13, (1e5, 1e10)),
    "D": (0.095, 5.4e13, (1e7, 1e11)),
    "C": (0.050, 3.1e8 * 8.64e19, (1e17, 1e23)),
}
# Hoffmann et al. (2022), approach 3.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
SEEDS = range(10)


def _check_recovery(fits, truth: dict[str, float], min_covered: int, rel: float = 0.05):
    """Every estimate within ``rel``, informative intervals, and (nominal 95%) intervals that
    cover the truth in at least ``min_covered`` of the independent noise draws."""
    for name, value in truth.items():
        covered = 0
        for fit in fits:
            assert fit.params[name] == pytest.approx(value, rel=rel), (name, fit.params)
            lo, hi = fit.ci(name)
            assert hi - lo < 0.25 * value, (name, lo, hi)
            covered += lo <= value <= hi
        assert covered >= min_covered, (name, covered)


@pytest.mark.parametrize("law", ["N", "D", "C"])
def test_power_law_fit_recovers_kaplan_exponents(law):
    alpha, scale, (lo, hi) = KAPLAN[law]
    x = np.geomspace(lo, hi, 30)
    fits = []
    for seed in SEEDS:
        noise = np.exp(np.random.default_rng(seed).normal(0, 0.01, x.size))  # 1% loss noise
        fits.append(scaling.fit_power_law(x, (scale / x) ** alpha * noise, seed=seed))
    _check_recovery(fits, {"alpha": alpha}, min_covered=8)
    assert fits[0].params["x_c"] == pytest.approx(scale, rel=0.5)  # log-scale offset: loose


def test_power_law_with_irreducible_term_recovers_exponent_and_floor():
    alpha, scale, _ = KAPLAN["N"]
    x = np.geomspace(1e5, 1e11, 40)
    fits = []
    for seed in SEEDS:
        noise = np.exp(np.random.default_rng(seed).normal(0, 0.002, x.size))
        fits.append(
            scaling.fit_power_law(x, (1.7 + (scale / x) ** alpha) * noise, irreducible=True, seed=seed)
        )
    _check_recovery(fits, {"alpha": alpha}, min_covered=8)
    # The floor trades off against the exponent's scale (a slow law): looser, still covered.
    _check_recovery(fits, {"E": 1.7}, min_covered=8, rel=0.1)


def test_chinchilla_fit_recovers_exponents_and_compute_optimal_allocation():
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e10, 10), np.geomspace(1e9, 1e12, 10)))
    t = CHINCHILLA
    clean = t["E"] + t["A"] / n ** t["alpha"] + t["B"] / d ** t["beta"]
    fits = []
    for seed in range(5):
        noise = np.exp(np.random.default_rng(seed).normal(0, 0.005, n.size))
        fits.append(scaling.fit_chinchilla(n, d, clean * noise, seed=seed))
    a = t["beta"] / (t["alpha"] + t["beta"])
    _check_recovery(fits, {"alpha": t["alpha"], "beta": t["beta"], "E": t["E"], "a": a}, min_covered=4)
    # The closed form agrees with minimising the true law along C = 6 N D numerically.
    exact = {**t, "a": a, "b": 1 - a}
    truth = scaling.Fit("truth", exact, {k: np.array([v]) for k, v in exact.items()}, 0)
    budget = 1e22
    from scipy.optimize import minimize_scalar  # here: scipy is slow to import at collection

    best = minimize_scalar(
        lambda logn: (
            t["A"] / math.exp(logn) ** t["alpha"] + t["B"] / (budget / 6 / math.exp(logn)) ** t["beta"]
        ),
        bounds=(math.log(1e6), math.log(1e13)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    optimal = scaling.compute_optimal(truth, budget)
    assert optimal["params"] == pytest.approx(math.exp(best.x), rel=1e-4)
    assert optimal["params"] * optimal["tokens"] * 6 == pytest.approx(budget)
    fitted = scaling.compute_optimal(fits[0], budget)
    lo, hi = fitted["params_ci95"]
    assert lo <= fitted["params"] <= hi


# --------------------------------------------------------------------------------------
# Sweeps


def _base(**train) -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=16),
        data=DataConfig(source="stdlib", tokenizer="bytes"),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.0),
        train=TrainConfig(
            batch_size=8, log_every=10, eval_every=0, eval_max_batches=8, checkpoint_every=0, **train
        ),
        sample=SampleConfig(num_samples=0),
    )


def _assert_png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # not a blank canvas


@pytest.mark.multidevice
@pytest.mark.slow
def test_real_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    sizes = [(1, 16, 2), (2, 24, 2), (2, 40, 4), (3, 64, 4)]
    sweep = scaling.Sweep(name="real", base=_base(), axes={"size": sizes, "tokens": [81_920]}, concurrent=2)
    t0 = time.perf_counter()
    result = scaling.run_sweep(sweep, tmp_path / "sweep", devices=jax.devices()[:2])
    rows = result.rows
    assert [r["status"] for r in rows] == ["finished"] * 4
    assert {r["tokens"] for r in rows} == {81_920} and {r["steps"] for r in rows} == {160}
    ns = [r["params_non_embedding"] for r in rows]
    assert ns == sorted(ns) and all(r["flops"] == 6 * r["params_non_embedding"] * r["tokens"] for r in rows)
    val = [r["val_loss"] for r in rows]
    print(f"sweep of 4 sizes in {time.perf_counter() - t0:.0f}s; N {ns}; val loss {val}")
    assert all(b < a for a, b in zip(val, val[1:], strict=False)), val  # bigger is better at equal D
    assert all(r["wall_time_s"] > 0 and r["train_loss"] > 0 for r in rows)
    csv_lines = result.table.read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("hash,status,")

    capsys.readouterr()
    assert cli.main(["fit", str(result.sweep_dir), "--json", "--bootstrap", "50"]) == 0
    fit = json.loads(capsys.readouterr().out)
    alpha = fit["fits"]["L(N)"]["params"]["alpha"]
    lo, hi = fit["fits"]["L(N)"]["ci95"]["alpha"]
    print(f"L(N) alpha = {alpha:.3f} [{lo:.3f}, {hi:.3f}]")
    assert 0 < lo <= alpha <= hi
    assert "L(N,D)" in fit["skipped"] and "L(D)" in fit["skipped"]  # one budget: said, not faked

    pngs = scaling.plot_sweep(result.sweep_dir)
    assert {p.name for p in pngs} == {"loss_vs_params.png", "loss_vs_compute.png"}
    pngs += scaling.plot_run(result.sweep_dir / "runs" / rows[-1]["hash"])
    for png in pngs:
        _assert_png(png)


_SWEEP_FILE = """
from gptjax.config import Config, DataConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig
from gptjax.scaling import Sweep


def get_sweep():
    base = Config(
        name="killed",
        model=ModelConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16),
        data=DataConfig(source="stdlib", tokenizer="bytes"),
        optim=OptimConfig(warmup_steps=2),
        train=TrainConfig(batch_size=8, log_every=5, eval_every=0, eval_max_batches=2,
                          checkpoint_every=10),
        sample=SampleConfig(num_samples=0),
    )
    return Sweep(name="killed", base=base, axes={"size": [(1, 16, 2), (1, 32, 2), (2, 32, 2)],
                                                 "tokens": [256 * 60]})
"""


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    config_file = tmp_path / "sweep_killed.py"
    config_file.write_text(textwrap.dedent(_SWEEP_FILE))
    sweep_dir = tmp_path / "sweep"
    hashes = [r.hash for r in scaling.expand(scaling.load_sweep(config_file), sweep_dir)]
    cmd = [sys.executable, "-m", "gptjax.cli", "sweep", str(config_file), "--dir", str(sweep_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=dict(os.environ))
    second = sweep_dir / "runs" / hashes[1]
    deadline = time.time() + 300
    # Kill (no chance to save) once the first run finished and the second has checkpointed.
    while time.time() < deadline and not (second / "checkpoints" / "10").is_dir():
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (second / "checkpoints" / "10").is_dir(), "the second run never checkpointed"
    first = sweep_dir / "runs" / hashes[0]
    before = {p: p.stat().st_mtime_ns for p in (first / "result.json", first / "metrics.jsonl")}
    statuses = [r["status"] for r in scaling.table(sweep_dir)]
    assert statuses[0] == "finished" and statuses[2] == "pending", statuses
    assert statuses[1] in ("interrupted", "finished"), statuses

    result = scaling.run_sweep(scaling.load_sweep(config_file), sweep_dir)
    assert [r["status"] for r in result.rows] == ["finished"] * 3
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the finished run was not re-trained
    if statuses[1] == "interrupted":
        log = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in log if "loss" in r]
        assert steps.count(5) == 1 and steps[-1] == 60  # resumed from step 10, not from scratch
    assert len(result.table.read_text().splitlines()) == 4


# --------------------------------------------------------------------------------------
# Bad input, and idempotence without training (train replaced by a recorder)


@pytest.fixture
def fake_train(monkeypatch):
    calls = []

    def train(config, *, mesh=None, stop_at=None):
        calls.append(config.train.run_dir)
        run_dir = Path(config.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        loss = 3.0 - 0.1 * config.model.n_layer + (0.5 if config.optim.lr < 2e-3 else 0.0)
        (run_dir / "result.json").write_text(
            json.dumps({"step": config.train.steps, "loss": loss, "val_loss": loss + 0.1})
        )
        return train_lib.TrainResult(run_dir, config.train.steps, {}, [], None)

    monkeypatch.setattr(train_lib, "train", train)
    return calls


def test_empty_axis_is_rejected():
    with pytest.raises(GptjaxError, match="sweep axis 'size' is empty: give it at least one value"):
        scaling.Sweep(name="s", base=_base(), axes={"size": [], "lr": [1e-3]})
    with pytest.raises(GptjaxError, match="has no axes"):
        scaling.Sweep(name="s", base=_base(), axes={})


@pytest.mark.multidevice
def test_invalid_size_is_reported_before_any_run(tmp_path, fake_train):
    sweep = scaling.Sweep(name="s", base=_base(), axes={"size": [(1, 16, 2), (2, 30, 4)], "lr": [1e-3]})
    with pytest.raises(
        GptjaxError,
        match=r"run \[size=\(2, 30, 4\), lr=0.001\] is invalid: n_embd \(30\) must be divisible by n_head",
    ):
        scaling.run_sweep(sweep, tmp_path / "sweep")
    assert fake_train == [] and not (tmp_path / "sweep").exists()
    bad_key = scaling.Sweep(name="s", base=_base(), axes={"model.n_layers": [1]})
    with pytest.raises(GptjaxError, match="unknown sweep axis 'model.n_layers'"):
        scaling.run_sweep(bad_key, tmp_path / "sweep")
    short = scaling.Sweep(name="s", base=_base(), axes={"tokens": [100]})
    with pytest.raises(GptjaxError, match=r"run \[tokens=100\] is invalid: the budget is less than one step"):
        scaling.run_sweep(short, tmp_path / "sweep")
    mesh = scaling.Sweep(name="s", base=_base(), axes={"lr": [1e-3]}, concurrent=3)
    with pytest.raises(GptjaxError, match=r"concurrent \(3\) must divide the device count \(8\)"):
        scaling.run_sweep(mesh, tmp_path / "sweep")


def test_rerun_skips_finished_and_other_sweep_is_rejected(tmp_path, fake_train):
    sweep = scaling.Sweep(name="a", base=_base(), axes={"size": [(1, 16, 2), (2, 16, 2)], "lr": [1e-3, 3e-3]})
    first = scaling.run_sweep(sweep, tmp_path / "sweep")
    assert len(fake_train) == 4 and len({Path(p).name for p in fake_train}) == 4
    assert [r["status"] for r in first.rows] == ["finished"] * 4
    again = scaling.run_sweep(sweep, tmp_path / "sweep")
    assert len(fake_train) == 4 and again.rows == first.rows
    other = scaling.Sweep(name="b", base=_base(), axes={"size": [(1, 16, 2)], "lr": [1e-3]})
    with pytest.raises(GptjaxError, match=r"written by a different sweep \('a'; its name, axes differ\)"):
        scaling.run_sweep(other, tmp_path / "sweep")
    changed = scaling.Sweep(name="a", base=_base(seed=1), axes=sweep.axes)
    with pytest.raises(GptjaxError, match="its base differ"):
        scaling.run_sweep(changed, tmp_path / "sweep")
    fit = scaling.fit_sweep(tmp_path / "sweep", n_boot=10)
    assert fit["fits"] == {} and len(fit["points"]) == 2  # the best lr per size
    assert [p["val_loss"] for p in fit["points"]] == pytest.approx([3.0, 2.9])


# Chinchilla's fitted law (Hoffmann et al. 2022), scaled down 10x so losses look like losses.
_E, _A, _B, _ALPHA, _BETA = 1.69, 40.64, 41.07, 0.34, 0.28


@pytest.fixture
def chinchilla_train(monkeypatch):
    """A trainer whose final loss is E + A/N^alpha + B/D^beta at the run's N and D."""

    def train(config, *, mesh=None, stop_at=None):
        run_dir = Path(config.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        n = param_counts(config.model)["non_embedding"]
        tokens_per_step = config.train.batch_size * config.model.block_size
        loss = _E + _A / n**_ALPHA + _B / (config.train.steps * tokens_per_step) ** _BETA
        rows = [{"step": s, "loss": loss + 1.0 / s, "lr": 1e-3} for s in (1, config.train.steps)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "result.json").write_text(
            json.dumps({"step": config.train.steps, "loss": loss, "val_loss": loss})
        )
        return train_lib.TrainResult(run_dir, config.train.steps, {}, [], None)

    monkeypatch.setattr(train_lib, "train", train)


def test_isoflop_minima_recover_the_compute_optimal_size(tmp_path, chinchilla_train, capsys):
    """Chinchilla's approach 2 on a flops sweep: each budget's parabola vertex lands on the
    analytic optimum of the law the runs follow, and N_opt grows as C^(beta / (alpha + beta))."""
    sizes = [(1, 32, 2), (2, 32, 2), (2, 48, 4), (3, 64, 4), (4, 80, 4), (4, 128, 4), (6, 160, 4)]  # 13K-1.9M
    budgets = [6e10, 6e11, 6e12]
    sweep = scaling.Sweep(name="iso", base=_base(), axes={"size": sizes, "flops": budgets})
    result = scaling.run_sweep(sweep, tmp_path / "sweep")
    assert [r["status"] for r in result.rows] == ["finished"] * 21
    iso = scaling.fit_sweep(result.sweep_dir, n_boot=10)["isoflop"]
    assert iso["skipped"] == {} and [m["flops"] for m in iso["minima"]] == budgets
    g = (_ALPHA * _A / (_BETA * _B)) ** (1 / (_ALPHA + _BETA))
    for m in iso["minima"]:
        analytic = g * (m["flops"] / 6) ** (_BETA / (_ALPHA + _BETA))
        assert m["params"] == pytest.approx(analytic, rel=0.06)  # a parabola on an asymmetric curve
        assert 6 * m["params"] * m["tokens"] == pytest.approx(m["flops"])
        curve = next(c for c in iso["curves"] if c["flops"] == m["flops"])
        assert m["val_loss"] <= min(loss for _, loss in curve["points"]) + 1e-3
    assert iso["params_exponent"] == pytest.approx(_BETA / (_ALPHA + _BETA), abs=0.02)

    pngs = scaling.plot_sweep(result.sweep_dir)
    assert [p.name for p in pngs] == ["loss_vs_params.png", "loss_vs_compute.png", "isoflop.png"]
    _assert_png(pngs[-1])
    capsys.readouterr()
    assert cli.main(["fit", str(result.sweep_dir), "--bootstrap", "10"]) == 0
    out = capsys.readouterr().out
    assert "IsoFLOP minimum at C = 6e+10: N = " in out and "IsoFLOP: N_opt ~ C^0.4" in out


def test_isoflop_says_why_a_budget_has_no_minimum():
    def row(n, loss, flops):
        point = json.dumps({"size": [1, 16, 2], "flops": flops})
        return {"status": "finished", "params_non_embedding": n, "val_loss": loss, "point": point}

    still_falling = [row(n, 3.0 - 0.1 * i, 1e12) for i, n in enumerate((1e3, 1e4, 1e5))]
    too_few = [row(n, 3.0, 1e13) for n in (1e3, 1e4)]
    iso = scaling.isoflop(still_falling + too_few)
    assert iso["minima"] == [] and iso["params_exponent"] is None
    assert iso["skipped"] == {
        "C = 1e+12": "no minimum inside the sizes tried: add sizes past the lowest loss",
        "C = 1e+13": "needs 3 sizes, has 2",
    }


# --------------------------------------------------------------------------------------
# Claims, executors and SLURM scripts without a cluster


def test_claims_one_winner_requeued_job_reclaims_dead_owner_is_replaced(tmp_path):
    import threading

    from gptjax.scaling import claims

    run_dir = tmp_path / "run"
    running = {"7": {"state": "RUNNING"}}
    assert claims.claim(run_dir, {"job": "7", "since": 0.0}, queue=running)["n"] == 1
    assert claims.claim(run_dir, {"job": "8", "since": 0.0}, queue=running) is None  # live owner
    assert claims.claim(run_dir, {"job": "7", "since": 1.0}, queue=running)["n"] == 2  # requeued: its own
    # Job 7 left the queue: of 16 running jobs racing for its dead claim, exactly one wins.
    won, barrier = [], threading.Barrier(16)
    contenders = {str(100 + i): {"state": "RUNNING"} for i in range(16)}

    def contend(i):
        barrier.wait()
        got = claims.claim(run_dir, {"job": str(100 + i), "since": 0.0}, queue=contenders)
        if got is not None:
            won.append(got)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = claims.history(run_dir)
    assert len(won) == 1 and [c["n"] for c in history] == [1, 2, 3] and history[-1]["job"] == won[0]["job"]
    # A local owner is alive while its process runs, dead once it exits.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    local = {"host": claims.me()["host"], "pid": proc.pid, "start": claims._start_time(proc.pid)}
    assert claims.alive(local)
    proc.kill()
    proc.wait()
    assert not claims.alive(local)


def test_partial_sweep_status_fit_and_plot_say_how_many_runs(tmp_path, chinchilla_train, capsys, monkeypatch):
    sweep = scaling.Sweep(name="part", base=_base(), axes={"size": [(1, 32, 2), (2, 32, 2), (2, 48, 4)],
                                                           "tokens": [8192, 16384]})  # fmt: skip
    runs = scaling.expand(sweep, tmp_path / "sweep")
    original = train_lib.train

    def train(config, **kw):  # the largest model fails
        if config.model.n_embd == 48:
            raise RuntimeError("out of memory")
        return original(config, **kw)

    monkeypatch.setattr(train_lib, "train", train)
    scaling.run_sweep(sweep, tmp_path / "sweep")
    shutil.rmtree(runs[1].config.train.run_dir)  # as if never started: pending
    monkeypatch.setattr(scaling.slurm, "queue", lambda: None)  # no squeue here
    rows = scaling.states(tmp_path / "sweep")
    assert [r["status"] for r in rows] == ["finished", "pending", "finished", "finished", "failed", "failed"]
    lines = scaling.format_status(rows).splitlines()
    assert lines[0].split() == ["run", "status", "step", "loss", "job", "elapsed", "point"]
    assert lines[-1] == "1 pending, 3 finished, 2 failed (6 runs)"
    capsys.readouterr()
    assert cli.main(["fit", str(tmp_path / "sweep"), "--bootstrap", "5"]) == 0
    assert "gptjax fit: used 3 of 6 runs (1 pending, 2 failed)" in capsys.readouterr().out
    assert cli.main(["plot", str(tmp_path / "sweep")]) == 0
    assert "gptjax plot: used 3 of 6 runs (1 pending, 2 failed)" in capsys.readouterr().out


def test_submit_dry_run_writes_a_requeueing_script_and_bad_options_are_one_line(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = ["submit", "nano", "train.steps=500", "train.run_dir=job", "--dry-run", "--time", "30",
            "--ntasks", "2", "--partition", "gpu", "--sbatch=--mem=8G"]  # fmt: skip
    assert cli.main(argv) == 0
    script = capsys.readouterr().out
    assert script == (tmp_path / "job" / "submit.sbatch").read_text()
    for line in ("#SBATCH --ntasks=2", "#SBATCH --time=30", "#SBATCH --partition=gpu", "#SBATCH --mem=8G",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", f"PYTHON={sys.executable}",
                 'scontrol requeue "$SLURM_JOB_ID"'):  # fmt: skip
        assert line in script, line
    assert "srun --kill-on-bad-exit=1" in script and f"train.run_dir={tmp_path / 'job'}" in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "job" / "submit.sbatch")]).returncode == 0
    assert cli.main(["submit", "nano", "--ntasks", "0", "--dry-run"]) == 2
    assert "slurm ntasks (0) must be an integer >= 1" in capsys.readouterr().err
    assert cli.main(["submit", "nano", "--sbatch", "mem=8G", "--dry-run"]) == 2
    assert "must be one sbatch option" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert cli.main(["submit", "nano", "train.run_dir=job2"]) == 2
    assert (
        "sbatch is not installed: run on a SLURM login node, or use --local-workers K"
        in capsys.readouterr().err
    )
    bad = scaling.Sweep
    with pytest.raises(GptjaxError, match=r"sweep slurm keys \['gpus'\] are unknown"):
        bad(name="s", base=_base(), axes={"lr": [1e-3]}, slurm={"gpus": 1})


@pytest.mark.slow
def test_local_workers_train_each_run_in_its_own_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XLA_FLAGS", with_cpu_devices(os.environ["XLA_FLAGS"], 1))  # one device per worker
    config_file = tmp_path / "sweep_killed.py"
    config_file.write_text(textwrap.dedent(_SWEEP_FILE).replace("256 * 60", "256 * 20"))
    sweep_dir = tmp_path / "sweep"
    argv = ["sweep", str(config_file), "--dir", str(sweep_dir), "--local-workers", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "run 1/3" in out and "run 3/3" in out and "ETA" in out
    rows = scaling.table(sweep_dir)
    assert [r["status"] for r in rows] == ["finished"] * 3
    from gptjax.scaling import claims

    pids = {claims.latest(sweep_dir / "runs" / r["hash"])["pid"] for r in rows}
    assert len(pids) == 3 and os.getpid() not in pids  # one process per run, not this one
    assert cli.main(argv) == 0 and "3 runs in" in capsys.readouterr().out
    assert all(len(claims.history(sweep_dir / "runs" / r["hash"])) == 1 for r in rows)  # nothing retrained
