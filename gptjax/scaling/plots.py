"""Plots of a run (loss and learning rate against step) and of a sweep (loss against N
per budget, loss against compute with the fitted frontier, IsoFLOP curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gptjax.errors import GptjaxError
from gptjax.scaling.fits import PLOTS_HINT, fit_sweep
from gptjax.scaling.results import metrics, table


def _figure(**kw):
    """A matplotlib ``Figure`` (no pyplot, no process-wide backend switch)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GptjaxError(f"plots need matplotlib: {PLOTS_HINT}") from None
    return Figure(**kw)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """``run.png``: training and validation loss, and the learning rate, against step."""
    run_dir = Path(run_dir)
    rows = metrics(run_dir)
    if not rows["train"]:
        raise GptjaxError(f"{str(run_dir)!r} has no metrics.jsonl rows: give a run that has trained")
    out = Path(out_dir or run_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    fig = _figure(figsize=(11, 4))
    ax_loss, ax_lr = fig.subplots(1, 2)
    tr, ev = rows["train"], rows["eval"]
    ax_loss.plot(list(tr), [r["loss"] for r in tr.values()], label="train", lw=1)
    if ev:
        ax_loss.plot(list(ev), [r["val_loss"] for r in ev.values()], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"loss: {_run_point(run_dir)}")
    ax_loss.legend()
    ax_lr.plot(list(tr), [r["lr"] for r in tr.values()])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    return [_save(fig, out / "run.png")]


def plot_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Loss against N per budget, loss against compute with the fitted frontier, and
    IsoFLOP curves when the sweep has several FLOP budgets. Returns the PNG paths."""
    sweep_dir = Path(sweep_dir)
    result = fit_sweep(sweep_dir, n_boot=50)
    rows = [r for r in table(sweep_dir) if r["status"] == "finished" and math.isfinite(r["val_loss"])]
    if not rows:
        raise GptjaxError(f"{str(sweep_dir)!r} has no finished runs yet: run gptjax sweep first")
    out = Path(out_dir or sweep_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    fits, paths = result["fits"], []
    used = f" ({result['runs']['used']} of {result['runs']['total']} runs)"

    fig = _figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for d in sorted({r["tokens"] for r in rows}):
        pts = sorted((r["params_non_embedding"], r["val_loss"]) for r in rows if r["tokens"] == d)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"D = {d:.3g} tokens")
    _draw_law(ax, fits.get("L(N)"), [r["params_non_embedding"] for r in rows], "L(N)")
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="validation loss")
    ax.set_title("loss against model size" + used)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "loss_vs_params.png"))

    import matplotlib

    fig = _figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    # Training curves coloured by model size (a colour bar, not a dozen unlabelled lines).
    sizes = [r["params_non_embedding"] for r in rows]
    norm = matplotlib.colors.LogNorm(min(sizes), max(sizes) * 1.0001)
    cmap = matplotlib.colormaps["viridis"]
    for r in rows:
        tr = metrics(sweep_dir / "runs" / r["hash"])["train"]
        per_step = r["tokens"] / r["steps"]
        c = [6.0 * r["params_non_embedding"] * per_step * s for s in tr]
        color = cmap(norm(r["params_non_embedding"]))
        ax.plot(c, [v["loss"] for v in tr.values()], lw=0.8, alpha=0.7, color=color)
    fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="non-embedding parameters N"
    )
    _draw_law(ax, fits.get("L(C)"), [r["flops"] for r in rows], "frontier L(C)")  # under the points
    ax.plot([r["flops"] for r in rows], [r["val_loss"] for r in rows], "ko", ms=4, label="final val loss")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss")
    ax.set_title("loss against compute (lines: training loss)" + used, fontsize=10)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "loss_vs_compute.png"))

    if len(result["isoflop"]["curves"]) >= 2:
        fig = _figure(figsize=(6.5, 4.5))
        ax = fig.subplots()
        for curve in result["isoflop"]["curves"]:
            (line,) = ax.plot(*zip(*curve["points"], strict=True), "o", label=f"C = {curve['flops']:.2g}")
            if curve["parabola"] is not None:
                log_n = np.log([n for n, _ in curve["points"]])
                grid = np.linspace(log_n.min(), log_n.max(), 50)
                ax.plot(np.exp(grid), np.polyval(curve["parabola"], grid), color=line.get_color())
        for m in result["isoflop"]["minima"]:
            ax.plot(m["params"], m["val_loss"], "k*")
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss")
        ax.set_title("IsoFLOP curves (star: fitted optimum)" + used, fontsize=10)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / "isoflop.png"))
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


def _save(fig, path: Path) -> Path:
    # Loss axes on a log scale span less than a decade: label them 2, 3, 4 rather than
    # only the minor ticks' 3x10^0, 4x10^0.
    from matplotlib.ticker import FormatStrFormatter

    for ax in fig.axes:
        if ax.get_yscale() == "log" and "loss" in ax.get_ylabel():
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
