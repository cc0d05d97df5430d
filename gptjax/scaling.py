"""Scaling-law sweeps: expand a sweep into runs, train them, tabulate, fit and plot.

A sweep config is a Python file defining ``get_sweep() -> Sweep``: a base :class:`Config`
plus axes whose Cartesian product is the set of runs. ``gptjax sweep FILE`` (or
:func:`run_sweep`) trains every run into ``SWEEP_DIR/runs/<hash>``, skipping finished runs
and resuming interrupted ones, and writes ``SWEEP_DIR/results.csv``; ``gptjax fit`` and
``gptjax plot`` read the directory back.

Conventions (Kaplan et al. 2020): N is the non-embedding parameter count, D the tokens
trained on, C = 6 N D the training FLOPs, and L the validation loss in nats per token.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import shutil
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gptjax.config import Config, apply_overrides, flops_per_token, load_recipe, param_counts
from gptjax.errors import GptjaxError

ALIASES = {"lr": "optim.lr", "seed": "train.seed"}
BUDGETS = ("tokens", "flops")
COLUMNS = (
    "hash", "status", "n_layer", "n_embd", "n_head", "lr", "seed", "steps", "params_non_embedding",
    "params_total", "tokens", "flops", "flops_model", "train_loss", "val_loss", "wall_time_s", "point",
)  # fmt: skip
_PLOTS_HINT = "pip install 'gptjax[plots]'"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
    """A base config and the axes whose Cartesian product gives the runs.

    Attributes:
        name: The sweep's name (the default directory is ``sweeps/<name>``).
        base: The config every run starts from.
        axes: Axis name to values. ``size``: ``(n_layer, n_embd, n_head)`` tuples;
            ``tokens``: token budgets D (``train.steps = D / (batch_size * block_size)``);
            ``flops``: compute budgets C (steps from ``C = 6 N D``); ``lr``, ``seed``, or any
            dotted config key (``model.n_layer``, ``optim.warmup_steps``).
        concurrent: Runs trained at once, each on its own disjoint slice of the devices
            (the device count must divide evenly).
    """

    name: str
    base: Config
    axes: dict[str, Sequence[Any]]
    concurrent: int = 1

    def __post_init__(self) -> None:
        if not self.axes:
            raise GptjaxError(f"sweep {self.name!r} has no axes: give at least one, e.g. {{'size': [...]}}")
        for key, values in self.axes.items():
            if isinstance(values, str | bytes) or not isinstance(values, Sequence):
                raise GptjaxError(f"sweep axis {key!r} must be a list of values, got {values!r}")
            if len(values) == 0:
                raise GptjaxError(f"sweep axis {key!r} is empty: give it at least one value or remove it")
        if all(b in self.axes for b in BUDGETS):
            raise GptjaxError("a sweep sets budgets by 'tokens' or by 'flops', not both: drop one axis")
        if self.concurrent < 1:
            raise GptjaxError(f"sweep concurrent ({self.concurrent}) must be >= 1")

    def spec(self) -> dict[str, Any]:
        """What identifies the sweep (JSON): name, base config and axes."""
        spec = {"name": self.name, "base": self.base.to_dict(), "axes": dict(self.axes)}
        return json.loads(json.dumps(spec))  # tuples become lists, as when read back


class Run(NamedTuple):
    """One point of a sweep: its hash, its full config and its axis values."""

    hash: str
    config: Config
    point: dict[str, Any]


class SweepResult(NamedTuple):
    """What :func:`run_sweep` returns."""

    sweep_dir: Path
    table: Path
    rows: list[dict[str, Any]]


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Load ``get_sweep()`` from a Python file; ``overrides`` apply to its base config."""
    sweep = load_recipe(path, "get_sweep", Sweep, "sweep config")
    return dataclasses.replace(sweep, base=apply_overrides(sweep.base, list(overrides)))


def config_hash(config: Config) -> str:
    """A short hash of everything in a run's config except where it is written."""
    d = config.to_dict()
    d["train"]["run_dir"] = ""
    return _sha(json.dumps(d, sort_keys=True))[:10]


def expand(sweep: Sweep, sweep_dir: str | Path) -> list[Run]:
    """Every run of the sweep, validated; an invalid run is reported by its axis values."""
    keys, runs, seen = list(sweep.axes), [], {}
    for values in itertools.product(*(sweep.axes[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        label = ", ".join(f"{k}={v!r}" for k, v in point.items())
        try:
            config = _configure(sweep.base, point)
        except (GptjaxError, TypeError) as e:
            raise GptjaxError(f"sweep {sweep.name!r}: run [{label}] is invalid: {e}") from None
        h = config_hash(config)
        if h in seen:
            raise GptjaxError(f"sweep {sweep.name!r}: runs [{seen[h]}] and [{label}] are the same run")
        seen[h] = label
        config = _set(config, {"train.run_dir": str(Path(sweep_dir) / "runs" / h)})
        runs.append(Run(h, config, point))
    return runs


def _configure(base: Config, point: dict[str, Any]) -> Config:
    changes: dict[str, Any] = {}
    for key, value in point.items():
        if key == "size":
            if not (isinstance(value, Sequence) and len(value) == 3):
                raise GptjaxError(f"a size must be (n_layer, n_embd, n_head), got {value!r}")
            changes.update(zip(("model.n_layer", "model.n_embd", "model.n_head"), value, strict=True))
        elif key not in BUDGETS:
            changes[ALIASES.get(key, key)] = value
    config = _set(base, changes)
    tokens_per_step = config.train.batch_size * config.model.block_size
    if "tokens" in point:
        steps = round(point["tokens"] / tokens_per_step)
    elif "flops" in point:
        steps = round(point["flops"] / (6 * param_counts(config.model)["non_embedding"] * tokens_per_step))
    else:
        return config
    if steps < 1:
        raise GptjaxError(f"the budget is less than one step of {tokens_per_step} tokens: raise it")
    return _set(config, {"train.steps": steps})


def _set(config: Config, changes: dict[str, Any]) -> Config:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        fields = {f.name for f in dataclasses.fields(getattr(config, section, None) or Config)}
        if section == "name" or not hasattr(config, section) or name not in fields:
            raise GptjaxError(f"unknown sweep axis {key!r}: use size, tokens, flops, lr, seed or a.field")
        sections.setdefault(section, {})[name] = value
    new = {s: dataclasses.replace(getattr(config, s), **kw) for s, kw in sections.items()}
    return dataclasses.replace(config, **new)


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Running


def run_sweep(sweep: Sweep, sweep_dir: str | Path | None = None, *, devices=None) -> SweepResult:
    """Train every run of ``sweep`` that has not finished, then write ``results.csv``.

    Runs go one after another, or ``sweep.concurrent`` at a time in threads, each thread
    on its own disjoint slice of ``devices``. Threads, not processes: JAX dispatch releases
    the GIL, one process keeps one view of the accelerators on every backend, and the
    compiled-step caches are shared. Every run is validated (config and mesh) before any
    starts. A run that raises is recorded as ``failed`` (``error.txt``) and the sweep goes
    on; a run stopped by SIGTERM/SIGINT (sequential sweeps) stops the sweep.

    Args:
        sweep: The sweep.
        sweep_dir: Where runs and the table go (default ``sweeps/<name>``). A directory
            written by a different sweep is rejected.
        devices: Devices to train on (default: all).
    """
    import jax

    from gptjax import data as data_lib
    from gptjax import sharding
    from gptjax.train import build

    sweep_dir = Path(sweep_dir or Path("sweeps") / sweep.name)
    runs = expand(sweep, sweep_dir)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % sweep.concurrent:
        raise GptjaxError(
            f"sweep concurrent ({sweep.concurrent}) must divide the device count ({len(devices)})"
        )
    size = len(devices) // sweep.concurrent
    groups = [devices[i * size : (i + 1) * size] for i in range(sweep.concurrent)]
    for run in runs:  # every mesh and shape problem before any run starts
        try:
            build(run.config, sharding.make_mesh(run.config.mesh, devices=groups[0]))
        except GptjaxError as e:
            raise GptjaxError(f"sweep {sweep.name!r}: run {run.hash} {run.point} is invalid: {e}") from None
    _claim(sweep_dir, sweep, runs)
    todo = [r for r in runs if _status(r) != "finished"]
    for data in {json.dumps(dataclasses.asdict(r.config.data)): r.config.data for r in todo}.values():
        data_lib.prepare(data)  # build token stores once, before threads could race on them
    print(f"gptjax sweep: {len(runs)} runs in {sweep_dir}, {len(runs) - len(todo)} finished", flush=True)
    lock, stop = threading.Lock(), threading.Event()
    queue = iter(todo)

    def worker(group) -> None:
        while not stop.is_set():
            with lock:
                run = next(queue, None)
            if run is None:
                return
            mesh = sharding.make_mesh(run.config.mesh, devices=group)
            if _train_one(run, mesh) == "interrupted":
                stop.set()

    if sweep.concurrent == 1:
        worker(groups[0])  # in the main thread, so train()'s SIGTERM handling applies
    else:
        with ThreadPoolExecutor(sweep.concurrent) as pool:
            for future in [pool.submit(worker, g) for g in groups]:
                future.result()
    rows = table(sweep_dir)
    return SweepResult(sweep_dir, sweep_dir / "results.csv", rows)


def _claim(sweep_dir: Path, sweep: Sweep, runs: list[Run]) -> None:
    path, spec = sweep_dir / "sweep.json", sweep.spec()
    if path.exists():
        saved = json.loads(path.read_text()).get("spec", {})
        if saved != spec:
            diff = [k for k in spec if saved.get(k) != spec[k]] or ["spec"]
            raise GptjaxError(
                f"{str(sweep_dir)!r} was written by a different sweep ({saved.get('name')!r}; its "
                f"{', '.join(diff)} differ): use another sweep directory or delete this one"
            )
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise GptjaxError(f"{str(sweep_dir)!r} is not empty and holds no sweep.json: use another directory")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = {"spec": spec, "runs": {r.hash: r.point for r in runs}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def _status(run: Run) -> str:
    run_dir = Path(run.config.train.run_dir)
    result = run_dir / "result.json"
    if result.exists() and json.loads(result.read_text()).get("step") == run.config.train.steps:
        return "finished"
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
        return "interrupted"
    if (run_dir / "error.txt").exists():
        return "failed"
    return "running" if run_dir.exists() else "pending"


def _train_one(run: Run, mesh) -> str:
    from gptjax.train import train

    run_dir = Path(run.config.train.run_dir)
    if _status(run) in ("running", "failed"):
        shutil.rmtree(run_dir)  # killed or failed before its first checkpoint: start clean
    print(f"gptjax sweep: run {run.hash} {run.point}", flush=True)
    t0, status = time.perf_counter(), "failed"
    try:
        result = train(run.config, mesh=mesh)
        status = "interrupted" if result.interrupted else "finished"
    except Exception:  # recorded and reported in the table; the other runs go on
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        print(f"gptjax sweep: run {run.hash} failed, see {run_dir / 'error.txt'}", flush=True)
    timing = run_dir / "timing.json"
    spent = json.loads(timing.read_text())["wall_time_s"] if timing.exists() else 0.0
    timing.write_text(json.dumps({"wall_time_s": spent + time.perf_counter() - t0}))
    return status


def table(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The results table of a sweep directory (one row per run); rewrites ``results.csv``."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "sweep.json"
    if not path.exists():
        raise GptjaxError(f"{str(sweep_dir)!r} holds no sweep.json: give a directory written by gptjax sweep")
    try:
        spec = json.loads(path.read_text())["spec"]
        sweep = Sweep(name=spec["name"], base=Config.from_dict(spec["base"]), axes=spec["axes"])
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a sweep's record
        if isinstance(e, GptjaxError):
            raise
        raise GptjaxError(
            f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}): run gptjax sweep again to rewrite it"
        ) from e
    rows = []
    for run in expand(sweep, sweep_dir):
        m, tc, run_dir = run.config.model, run.config.train, Path(run.config.train.run_dir)
        n, tokens = param_counts(m)["non_embedding"], tc.steps * tc.batch_size * m.block_size
        status = _status(run)
        result = json.loads((run_dir / "result.json").read_text()) if status == "finished" else {}
        timing = run_dir / "timing.json"
        rows.append(
            {
                "hash": run.hash, "status": status, "n_layer": m.n_layer, "n_embd": m.n_embd,
                "n_head": m.n_head, "lr": run.config.optim.lr, "seed": tc.seed, "steps": tc.steps,
                "params_non_embedding": n, "params_total": param_counts(m)["total"], "tokens": tokens,
                "flops": 6.0 * n * tokens, "flops_model": flops_per_token(m)["total"] * tokens,
                "train_loss": result.get("loss", math.nan), "val_loss": result.get("val_loss", math.nan),
                "wall_time_s": json.loads(timing.read_text())["wall_time_s"] if timing.exists() else math.nan,
                "point": json.dumps(run.point),
            }
        )  # fmt: skip
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


# --------------------------------------------------------------------------------------
# Fits


@dataclasses.dataclass
class Fit:
    """A fitted law: best-fit parameters and their bootstrap samples (resampled rows)."""

    form: str
    params: dict[str, float]
    samples: dict[str, np.ndarray]
    n_points: int

    def ci(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """The percentile bootstrap interval of one parameter.

        Order statistics, not interpolation: a scale like x_c can overflow to inf in a
        bootstrap fit, and interpolating next to inf gives nan instead of an open bound.
        """
        q = [50 * (1 - level), 50 * (1 + level)]
        lo, hi = np.nanpercentile(self.samples[name], q, method="nearest")
        return float(lo), float(hi)

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "params": self.params,
            "ci95": {k: self.ci(k) for k in self.params},
            "n_points": self.n_points,
            "n_boot": len(next(iter(self.samples.values()))),
        }


def _scipy():
    try:
        import scipy.optimize
    except ImportError:
        raise GptjaxError(f"fits need scipy: {_PLOTS_HINT}") from None
    return scipy.optimize


def _bootstrap(fit_once, n: int, n_boot: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            out.append(fit_once(idx))
        except (ValueError, np.linalg.LinAlgError):
            continue  # a resample that cannot determine the law (e.g. one distinct x)
    return out


def fit_power_law(x, loss, *, irreducible: bool = False, n_boot: int = 200, seed: int = 0) -> Fit:
    """Fit ``L(X) = (X_c / X)^alpha`` (``+ E`` with ``irreducible``) by least squares on log L."""
    opt = _scipy()
    logx, logl = np.log(np.asarray(x, float)), np.log(np.asarray(loss, float))

    def fit_once(idx, start=None):
        lx, ll = logx[idx], logl[idx]
        if len(np.unique(lx)) < 2 + irreducible:
            raise ValueError("too few distinct points")
        if not irreducible:  # linear in log space: ordinary least squares
            slope, intercept = np.polyfit(lx, ll, 1)
            return np.array([-slope, intercept / -slope if slope else np.inf, -np.inf])

        def residuals(p):
            return np.logaddexp(p[2], p[0] * (p[1] - lx)) - ll

        def jacobian(p):
            s = 1 / (1 + np.exp(p[2] - p[0] * (p[1] - lx)))  # the power term's share of L
            return np.stack([s * (p[1] - lx), s * p[0], 1 - s], axis=1)

        starts = [start] if start is not None else []
        for frac in () if starts else (0.1, 0.5, 0.8, 0.95):  # E as a fraction of the lowest loss
            e0 = math.log(frac) + ll.min()
            s0, i0 = np.polyfit(lx, np.log(np.exp(ll) - math.exp(e0)), 1)
            a0 = max(-s0, 1e-3)
            starts.append(np.array([a0, i0 / a0, e0]))
        bounds = ([0.0, -np.inf, -np.inf], [10.0, np.inf, ll.min()])
        fits = [opt.least_squares(residuals, np.minimum(x0, bounds[1]), jacobian, bounds) for x0 in starts]
        return min(fits, key=lambda r: r.cost).x

    everything = np.arange(len(logx))
    best = fit_once(everything)
    boots = _bootstrap(lambda idx: fit_once(idx, best if irreducible else None), len(logx), n_boot, seed)
    names = ["alpha", "x_c"] + (["E"] if irreducible else [])

    def named(p):
        values = {"alpha": p[0], "x_c": math.exp(p[1]) if p[1] < 700 else math.inf, "E": math.exp(p[2])}
        return {k: float(values[k]) for k in names}

    samples = [named(p) for p in boots] or [named(best)]
    form = "L = (x_c / X)^alpha" + (" + E" if irreducible else "")
    return Fit(form, named(best), {k: np.array([s[k] for s in samples]) for k in names}, len(logx))


def fit_chinchilla(n, d, loss, *, n_boot: int = 200, seed: int = 0, delta: float = 1e-3) -> Fit:
    """Fit ``L(N, D) = E + A / N^alpha + B / D^beta`` as Hoffmann et al. (2022) do.

    Minimises the Huber loss (``delta``) of ``log L`` against
    ``LSE(log A - alpha log N, log B - beta log D, log E)`` from a grid of initialisations;
    bootstrap refits start from the best fit. Also reports the compute-optimal exponents
    ``a = beta / (alpha + beta)`` (N_opt ~ C^a) and ``b = alpha / (alpha + beta)``.
    """
    opt = _scipy()
    logn, logd = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    logl = np.log(np.asarray(loss, float))
    # Starts for (log A, log B, log E, alpha, beta), after Hoffmann et al.'s grid.
    grid = np.array(
        list(itertools.product(*[(0.0, 5.0, 10.0, 15.0)] * 2, (-1.0, 0.0, 1.0), *[(0.1, 0.3, 0.6)] * 2))
    )

    def fit_once(idx, starts=None):
        ln, ld, ll = logn[idx], logd[idx], logl[idx]
        if len(np.unique(ln)) < 2 or len(np.unique(ld)) < 2:
            raise ValueError("needs two distinct N and two distinct D")

        def terms(p):  # (3, n): log A - alpha log N, log B - beta log D, log E
            return np.stack([p[0] - p[3] * ln, p[1] - p[4] * ld, np.full_like(ln, p[2])])

        def residuals(p):
            t = terms(p)
            m = t.max(0)
            return m + np.log(np.exp(t - m).sum(0)) - ll

        def jacobian(p):
            t = terms(p)
            w = np.exp(t - t.max(0))
            w /= w.sum(0)  # each term's share of L
            return np.stack([w[0], w[1], w[2], -w[0] * ln, -w[1] * ld], axis=1)

        if starts is None:  # Hoffmann et al.'s grid, screened by the objective; refine the best few
            r = np.stack([residuals(p) for p in grid])
            huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(1)
            starts = grid[np.argsort(huber)[:4]]
        bounds = ([-np.inf] * 3 + [0.0] * 2, [np.inf] * 3 + [5.0] * 2)
        fits = [
            opt.least_squares(residuals, np.clip(x0, *bounds), jacobian, bounds, loss="huber", f_scale=delta)
            for x0 in starts
        ]
        return min(fits, key=lambda r: r.cost).x

    def named(p):
        alpha, beta = float(p[3]), float(p[4])
        return {
            "E": math.exp(p[2]), "A": math.exp(p[0]), "B": math.exp(p[1]), "alpha": alpha,
            "beta": beta, "a": beta / (alpha + beta), "b": alpha / (alpha + beta),
        }  # fmt: skip

    best = fit_once(np.arange(len(logl)))
    boots = _bootstrap(lambda idx: fit_once(idx, [best]), len(logl), n_boot, seed)
    samples = [named(p) for p in boots] or [named(best)]
    keys = list(named(best))
    form = "L = E + A / N^alpha + B / D^beta"
    return Fit(form, named(best), {k: np.array([s[k] for s in samples]) for k in keys}, len(logl))


def compute_optimal(fit: Fit, budget: float) -> dict[str, Any]:
    """N and D that minimise the Chinchilla fit at ``C = 6 N D = budget``, with intervals."""

    def solve(p):
        g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / (p["alpha"] + p["beta"]))
        n_opt = g * (budget / 6) ** p["a"]
        return n_opt, budget / (6 * n_opt)

    n_opt, d_opt = solve(fit.params)
    draws = np.array([solve({k: v[i] for k, v in fit.samples.items()}) for i in range(len(fit.samples["a"]))])
    lo, hi = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    return {
        "flops": budget, "params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt,
        "params_ci95": (float(lo[0]), float(hi[0])), "tokens_ci95": (float(lo[1]), float(hi[1])),
    }  # fmt: skip


def _points(rows: list[dict[str, Any]]) -> dict[tuple[float, float], float]:
    """Finished runs' val loss by (N, D): the mean over seeds, then the best over other axes."""
    by_setting: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] == "finished" and math.isfinite(r["val_loss"]):
            other = {k: v for k, v in json.loads(r["point"]).items() if k not in ("seed", "size", *BUDGETS)}
            key = (r["params_non_embedding"], r["tokens"], json.dumps(other, sort_keys=True))
            by_setting.setdefault(key, []).append(r["val_loss"])
    points: dict[tuple[float, float], float] = {}
    for (n, d, _), losses in by_setting.items():
        points[(n, d)] = min(points.get((n, d), math.inf), float(np.mean(losses)))
    return points


def frontier(points: dict[tuple[float, float], float]) -> list[tuple[float, float]]:
    """The compute-efficient frontier: (C, L) of runs that beat every cheaper run."""
    out, best = [], math.inf
    for c, loss in sorted((6.0 * n * d, loss) for (n, d), loss in points.items()):
        if loss < best:
            out.append((c, loss))
            best = loss
    return out


def fit_sweep(
    sweep_dir: str | Path, *, irreducible: bool = False, n_boot: int = 200, budgets: Sequence[float] = ()
) -> dict[str, Any]:
    """Fit L(N), L(D), L(C) and L(N, D) to a sweep's finished runs.

    L(N) uses each size's best loss over budgets, L(D) each budget's best over sizes, L(C)
    the compute-efficient frontier, L(N, D) every (N, D) point. A law with too few points
    is listed under ``skipped`` with the reason. ``compute_optimal`` is given at
    ``budgets`` (default: the sweep's largest C and 10x and 100x it). ``isoflop`` is
    Chinchilla's second approach, for sweeps over ``flops`` budgets (:func:`isoflop`).
    """
    from gptjax.validate import at_least

    at_least(bootstrap=(n_boot, 0), **{f"budget {i + 1}": (c, 1.0) for i, c in enumerate(budgets)})
    rows = table(sweep_dir)
    points = _points(rows)
    fits: dict[str, Fit] = {}
    skipped: dict[str, str] = {}
    by_n: dict[float, float] = {}
    by_d: dict[float, float] = {}
    for (n, d), loss in points.items():
        by_n[n] = min(by_n.get(n, math.inf), loss)
        by_d[d] = min(by_d.get(d, math.inf), loss)
    need = 4 if irreducible else 3
    laws = {"L(N)": sorted(by_n.items()), "L(D)": sorted(by_d.items()), "L(C)": frontier(points)}
    for name, pts in laws.items():
        if len(pts) < need:
            skipped[name] = f"needs {need} distinct points, the sweep has {len(pts)}"
        else:
            xs, ls = zip(*pts, strict=True)
            fits[name] = fit_power_law(xs, ls, irreducible=irreducible, n_boot=n_boot)
    if len(by_n) >= 2 and len(by_d) >= 2 and len(points) >= 6:
        ns, ds = zip(*points, strict=True)
        fits["L(N,D)"] = fit_chinchilla(ns, ds, list(points.values()), n_boot=n_boot)
    else:
        skipped["L(N,D)"] = (
            f"needs 2+ sizes, 2+ budgets, 6+ points; has {len(by_n)}, {len(by_d)}, {len(points)}"
        )
    optimal = []
    if "L(N,D)" in fits:
        top = max(6.0 * n * d for n, d in points)
        optimal = [compute_optimal(fits["L(N,D)"], c) for c in budgets or (top, 10 * top, 100 * top)]
    return {
        "sweep_dir": str(sweep_dir),
        "conventions": "N: non-embedding params; D: tokens; C = 6 N D FLOPs; L: val loss (nats/token)",
        "points": [{"N": n, "D": d, "C": 6.0 * n * d, "val_loss": v} for (n, d), v in sorted(points.items())],
        "fits": {k: f.to_dict() for k, f in fits.items()},
        "skipped": skipped,
        "compute_optimal": optimal,
        "isoflop": isoflop(rows),
    }


def isoflop(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Chinchilla's approach 2 on a sweep over ``flops`` budgets: per budget C, the N at the
    vertex of a parabola fitted to validation loss against log N, then ``N_opt ~ C^a``.

    Losses are averaged over seeds and the best over other axes is taken, as for the fits.
    Returns ``curves`` (per budget: its (N, loss) points, the parabola's coefficients in
    log N or None), ``minima`` (``flops``, ``params``, ``tokens`` = C / 6N, ``val_loss`` at
    the vertex), ``params_exponent`` a (None with fewer than 2 minima) and ``skipped``: by
    budget, why it has no minimum (fewer than 3 sizes, or no vertex inside the sizes tried).
    """
    by_setting: dict[tuple, list[float]] = {}
    for r in rows:
        point = json.loads(r["point"])
        if r["status"] == "finished" and math.isfinite(r["val_loss"]) and "flops" in point:
            other = {k: v for k, v in point.items() if k not in ("seed", "size", *BUDGETS)}
            key = (float(point["flops"]), r["params_non_embedding"], json.dumps(other, sort_keys=True))
            by_setting.setdefault(key, []).append(r["val_loss"])
    losses: dict[float, dict[float, float]] = {}
    for (c, n, _), values in by_setting.items():
        curve = losses.setdefault(c, {})
        curve[n] = min(curve.get(n, math.inf), float(np.mean(values)))
    curves, minima, skipped = [], [], {}
    for c, by_n in sorted(losses.items()):
        points = sorted(by_n.items())
        curves.append({"flops": c, "points": points, "parabola": None})
        if len(points) < 3:
            skipped[f"C = {c:.3g}"] = f"needs 3 sizes, has {len(points)}"
            continue
        log_n = np.log([n for n, _ in points])
        coef = np.polyfit(log_n, [loss for _, loss in points], 2)
        curves[-1]["parabola"] = [float(x) for x in coef]
        vertex = -coef[1] / (2 * coef[0]) if coef[0] > 0 else math.nan
        if not log_n.min() <= vertex <= log_n.max():
            skipped[f"C = {c:.3g}"] = "no minimum inside the sizes tried: add sizes past the lowest loss"
            continue
        n_opt = float(np.exp(vertex))
        loss = float(np.polyval(coef, vertex))
        minima.append({"flops": c, "params": n_opt, "tokens": c / (6 * n_opt), "val_loss": loss})
    exponent = None
    if len(minima) >= 2:
        log_c, log_n = np.log([m["flops"] for m in minima]), np.log([m["params"] for m in minima])
        exponent = float(np.polyfit(log_c, log_n, 1)[0])
    return {"curves": curves, "minima": minima, "params_exponent": exponent, "skipped": skipped}


# --------------------------------------------------------------------------------------
# Plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise GptjaxError(f"plots need matplotlib: {_PLOTS_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics(run_dir: Path) -> dict[str, dict[int, dict]]:
    """Train and eval rows of a run by step (a resumed run's re-logged steps: the last wins)."""
    train_rows: dict[int, dict] = {}
    eval_rows: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a process killed mid-write
            continue
        (train_rows if "loss" in row else eval_rows if "val_loss" in row else {})[row["step"]] = row
    return {"train": dict(sorted(train_rows.items())), "eval": dict(sorted(eval_rows.items()))}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """``run.png``: training and validation loss, and the learning rate, against step."""
    plt, run_dir = _pyplot(), Path(run_dir)
    rows = _metrics(run_dir)
    if not rows["train"]:
        raise GptjaxError(f"{str(run_dir)!r} has no metrics.jsonl rows: give a run that has trained")
    out = Path(out_dir or run_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    tr, ev = rows["train"], rows["eval"]
    ax_loss.plot(list(tr), [r["loss"] for r in tr.values()], label="train", lw=1)
    if ev:
        ax_loss.plot(list(ev), [r["val_loss"] for r in ev.values()], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"loss: {_run_point(run_dir)}")
    ax_loss.legend()
    ax_lr.plot(list(tr), [r["lr"] for r in tr.values()])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    return [_save(fig, out / "run.png", plt)]


def plot_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Loss against N per budget, loss against compute with the fitted frontier, and
    IsoFLOP curves when the sweep has several FLOP budgets. Returns the PNG paths."""
    plt, sweep_dir = _pyplot(), Path(sweep_dir)
    result = fit_sweep(sweep_dir, n_boot=50)
    rows = [r for r in table(sweep_dir) if r["status"] == "finished" and math.isfinite(r["val_loss"])]
    if not rows:
        raise GptjaxError(f"{str(sweep_dir)!r} has no finished runs yet: run gptjax sweep first")
    out = Path(out_dir or sweep_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    fits, paths = result["fits"], []

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for d in sorted({r["tokens"] for r in rows}):
        pts = sorted((r["params_non_embedding"], r["val_loss"]) for r in rows if r["tokens"] == d)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"D = {d:.3g} tokens")
    _draw_law(ax, fits.get("L(N)"), [r["params_non_embedding"] for r in rows], "L(N)")
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="validation loss")
    ax.set_title("loss against model size")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "loss_vs_params.png", plt))

    import matplotlib

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # Training curves coloured by model size (a colour bar, not 12 unlabelled lines).
    sizes = [r["params_non_embedding"] for r in rows]
    norm = matplotlib.colors.LogNorm(min(sizes), max(sizes) * 1.0001)
    cmap = matplotlib.colormaps["viridis"]
    for r in rows:
        tr = _metrics(sweep_dir / "runs" / r["hash"])["train"]
        per_step = r["tokens"] / r["steps"]
        c = [6.0 * r["params_non_embedding"] * per_step * s for s in tr]
        ax.plot(
            c,
            [v["loss"] for v in tr.values()],
            lw=0.8,
            alpha=0.7,
            color=cmap(norm(r["params_non_embedding"])),
        )
    fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="non-embedding parameters N"
    )
    _draw_law(ax, fits.get("L(C)"), [r["flops"] for r in rows], "frontier L(C)")  # under the points
    ax.plot([r["flops"] for r in rows], [r["val_loss"] for r in rows], "ko", ms=4, label="final val loss")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss")
    ax.set_title("loss against compute (lines: training loss)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "loss_vs_compute.png", plt))

    if len(result["isoflop"]["curves"]) >= 2:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for curve in result["isoflop"]["curves"]:
            (line,) = ax.plot(*zip(*curve["points"], strict=True), "o", label=f"C = {curve['flops']:.2g}")
            if curve["parabola"] is not None:
                log_n = np.log([n for n, _ in curve["points"]])
                grid = np.linspace(log_n.min(), log_n.max(), 50)
                ax.plot(np.exp(grid), np.polyval(curve["parabola"], grid), color=line.get_color())
        for m in result["isoflop"]["minima"]:
            ax.plot(m["params"], m["val_loss"], "k*")
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss")
        ax.set_title("IsoFLOP curves (star: fitted optimum)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / "isoflop.png", plt))
    return paths


def _draw_law(ax, fit: dict | None, xs: list[float], label: str) -> None:
    if fit is None:
        return
    p = fit["params"]
    grid = np.geomspace(min(xs), max(xs), 50)
    lo, hi = fit["ci95"]["alpha"]
    ax.plot(grid, p.get("E", 0.0) + (p["x_c"] / grid) ** p["alpha"], "k--",
            label=f"{label}: alpha = {p['alpha']:.3f} [{lo:.3f}, {hi:.3f}]")  # fmt: skip


def _run_point(run_dir: Path) -> str:
    """A run's title: its size and tokens (a sweep run's directory name is only a hash)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        m, t = config["model"], config["train"]
        tokens = t["steps"] * t["batch_size"] * m["block_size"]
        return f"{run_dir.name}: {m['n_layer']} layers x {m['n_embd']}, {tokens:,} tokens"
    except (OSError, ValueError, KeyError, TypeError):
        return run_dir.name


def _save(fig, path: Path, plt) -> Path:
    # Loss axes on a log scale span less than a decade: label them 2, 3, 4 rather than
    # only the minor ticks' 3x10^0, 4x10^0.
    from matplotlib.ticker import FormatStrFormatter

    for ax in fig.axes:
        if ax.get_yscale() == "log" and "loss" in ax.get_ylabel():
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
