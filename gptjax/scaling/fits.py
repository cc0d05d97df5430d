"""Scaling-law fits to a sweep's finished runs: power laws L(N), L(D), L(C) (Kaplan et
al. 2020), L(N, D) (Hoffmann et al. 2022, approach 3) with compute-optimal allocations,
and IsoFLOP minima (approach 2); every interval from a bootstrap over the points.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.errors import GptjaxError
from gptjax.scaling.results import table
from gptjax.scaling.sweep import BUDGETS

PLOTS_HINT = "pip install 'gptjax[plots]'"


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
        raise GptjaxError(f"fits need scipy: {PLOTS_HINT}") from None
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


def runs_used(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many runs a fit or plot used (finished, with a finite val loss) of how many."""
    used = sum(r["status"] == "finished" and math.isfinite(r["val_loss"]) for r in rows)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return {"used": used, "total": len(rows), "by_status": by_status}


def describe_runs(runs: dict[str, Any]) -> str:
    """``used 6 of 8 runs (2 running)``: the line fit and plot print."""
    others = ", ".join(f"{n} {s}" for s, n in runs["by_status"].items() if s != "finished")
    return f"used {runs['used']} of {runs['total']} runs" + (f" ({others})" if others else "")


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
    A partly finished sweep is fitted on its finished runs; ``runs`` says how many.
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
        "runs": runs_used(rows),
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
