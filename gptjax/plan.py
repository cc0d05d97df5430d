"""``gptjax plan CONFIG --target v5e-16``: choose a mesh, remat policy and micro-batching for a TPU slice.

The search space, for the config's global batch B on a slice of n chips:

- mesh ``data x fsdp x tensor = n`` with ``tensor`` a power of two up to 8 dividing
  ``n_head`` (tensor parallelism beyond one ICI ring's neighbours rarely pays);
- ``model.remat`` in none / dots / full;
- ``optim.accum_steps`` k with B/k divisible by ``data x fsdp``.

Every candidate is first scored analytically (:func:`estimate`): per-chip memory from the
sharded state and a per-layer activation model, step time as FLOPs over the generation's
peak plus communication bytes over its ICI bandwidth (:mod:`gptjax.targets` has the table
and its sources). Candidates whose estimate exceeds the chip's HBM by more than
``slack`` are dropped; the ``compile`` best of the rest are compiled for the target with
libtpu (:func:`gptjax.preflight.tpu_dry_run`), and the compiler's memory is the
constraint: only those that fit are ranked, by the same objective computed from the
compiled program's own FLOPs and collective bytes.

The objective is a roofline bound, not a prediction of step time: it ignores overlap of
communication with compute and every kernel's efficiency. It orders layouts; it does not
promise a throughput.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gptjax.config import Config, apply_overrides
from gptjax.errors import GptjaxError
from gptjax.preflight import step_flops, tpu_dry_run
from gptjax.targets import Target, parse_target

REMATS = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout: mesh sizes, remat policy and gradient-accumulation steps."""

    data: int
    fsdp: int
    tensor: int
    remat: str
    accum_steps: int

    def overrides(self) -> list[str]:
        return [
            f"mesh.data={self.data}",
            f"mesh.fsdp={self.fsdp}",
            f"mesh.tensor={self.tensor}",
            f"model.remat={self.remat}",
            f"optim.accum_steps={self.accum_steps}",
        ]


def candidates(config: Config, target: Target) -> list[Candidate]:
    """Every layout of the search space that divides the batch and the heads."""
    n, batch = target.devices, config.train.batch_size
    out = []
    for tensor in (1, 2, 4, 8):
        if n % tensor or config.model.n_head % tensor:
            continue
        for fsdp in (d for d in range(1, n // tensor + 1) if (n // tensor) % d == 0):
            data = n // tensor // fsdp
            for accum in (1, 2, 4, 8, 16):
                if batch % accum or (batch // accum) % (data * fsdp):
                    continue
                out += [Candidate(data, fsdp, tensor, remat, accum) for remat in REMATS]
    return out


def estimate(config: Config, target: Target, c: Candidate) -> dict[str, float]:
    """Analytic per-chip memory (bytes) and step-time bound (seconds) of a candidate."""
    m, gen = config.model, target.generation
    d, layers, t, v = m.n_embd, m.n_layer, m.block_size, m.vocab_size
    params = layers * 12 * d * d + (v + t) * d
    width = 2 if m.dtype != "float32" else 4
    p_bytes = 4 if m.param_dtype == "float32" else 2
    shards = c.fsdp * c.tensor
    state = params * p_bytes * 4 / shards  # params, 2 Adam moments, gradients
    rows = config.train.batch_size // c.accum_steps // (c.data * c.fsdp)  # per chip, per micro-batch
    per_layer = (
        {  # bytes per token and layer kept for the backward pass (Korthikanti et al. 2022)
            "none": (10 + 24 / c.tensor) * d + 5 * m.n_head * t / c.tensor,
            "dots": (4 + 12 / c.tensor) * d,
            "full": 2 * d,
        }[c.remat]
        * width
        / 2
    )
    one_layer = ((10 + 24 / c.tensor) * d + 5 * m.n_head * t / c.tensor) * width / 2
    activations = rows * t * (layers * per_layer + one_layer) + rows * t * v * 4 * 2 / c.tensor
    candidate = apply_overrides(config, [f"model.remat={c.remat}"])
    flops = step_flops(candidate, target.devices)
    comm = 0.0
    if c.data * c.fsdp > 1:  # gradients reduced once (all-reduce, or reduce-scatter + FSDP gathers)
        comm += params * width * (2 if c.fsdp == 1 else 3) / c.tensor
    if c.fsdp > 1:  # weights gathered again in every micro-batch
        comm += params * width * 2 * (c.accum_steps - 1) / c.tensor
    if c.tensor > 1:  # Megatron: 4 all-reduces of the hidden states per layer and micro-batch
        comm += 4 * layers * rows * t * d * width * c.accum_steps * 2 * (c.tensor - 1) / c.tensor
    return {
        "memory_bytes": state + activations,
        "seconds": flops / gen.peak_flops + comm / gen.ici_bytes_per_s,
        "flops": flops,
        "comm_bytes": comm,
    }


def objective(report: dict[str, Any], target: Target) -> float:
    """Compiled step-time bound: FLOPs over peak FLOP/s plus collective bytes over ICI bandwidth."""
    gen = target.generation
    return (
        report.get("flops_per_step", 0.0) / gen.peak_flops
        + report.get("collective_bytes", 0) / gen.ici_bytes_per_s
    )


def plan(
    config: Config, target_name: str, *, compile: int = 3, slack: float = 0.9, first_fit: bool = False
) -> dict[str, Any]:
    """Search layouts for ``config`` on ``target_name``; compile the most promising; rank those that fit.

    Args:
        config: The run (its global batch and model are fixed; mesh, remat and
            accumulation are searched).
        target_name: A TPU slice, e.g. ``v5e-16``.
        compile: How many candidates (best analytic estimate first) to compile.
        slack: Keep candidates whose analytic memory is at most ``slack`` x HBM.
        first_fit: Stop compiling at the first candidate that fits.

    Returns:
        ``{"target", "considered", "estimated": [...], "compiled": [...], "best"}``; each
        compiled entry has the candidate, its dry-run report's key numbers, ``fits`` and
        ``objective_s``; ``best`` is the fitting one with the smallest objective (or None).
    """
    target = parse_target(target_name)
    pool = candidates(config, target)
    if not pool:
        raise GptjaxError(
            f"no layout of {target.devices} chips divides train.batch_size ({config.train.batch_size}) "
            f"and model.n_head ({config.model.n_head})"
        )
    hbm = target.generation.hbm_bytes
    scored = sorted(
        ((estimate(config, target, c), c) for c in pool),
        key=lambda e: (e[0]["seconds"], e[0]["memory_bytes"]),
    )
    kept = [(e, c) for e, c in scored if e["memory_bytes"] <= slack * hbm]
    compiled = []
    for est, cand in kept[:compile]:
        report = tpu_dry_run(apply_overrides(config, cand.overrides()), target_name)
        compiled.append(
            {
                **dataclasses.asdict(cand),
                "estimated_gib": est["memory_bytes"] / 2**30,
                "gib": report["total_bytes"] / 2**30,
                "fits": bool(report["fits"]),
                "compile_s": report.get("compile_s", 0.0),
                "collective_bytes": report.get("collective_bytes", 0),
                "objective_s": objective(report, target) if report["fits"] else None,
            }
        )
        if first_fit and report["fits"]:
            break
    fitting = sorted((r for r in compiled if r["fits"]), key=lambda r: r["objective_s"])
    best = fitting[0] if fitting else None
    return {
        "target": target_name,
        "considered": len(pool),
        "estimated": [
            {**dataclasses.asdict(c), "estimated_gib": e["memory_bytes"] / 2**30, "estimated_s": e["seconds"]}
            for e, c in kept[: max(compile, 10)]
        ],
        "compiled": fitting + [r for r in compiled if not r["fits"]],
        "best": best,
        "override": " ".join(Candidate(**_fields(best)).overrides()) if best else None,
    }


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    return {f.name: row[f.name] for f in dataclasses.fields(Candidate)}


def format_plan(result: dict[str, Any]) -> str:
    """The table ``gptjax plan`` prints: compiled candidates ranked, then the override line."""
    lines = [f"{result['target']}: {result['considered']} layouts, compiled the best by estimate:"]
    lines.append(f"{'data':>4} {'fsdp':>4} {'tp':>3} {'remat':>5} {'accum':>5} {'est GiB':>8} "
                 f"{'GiB':>6} {'fits':>5} {'compile s':>9} {'comm MiB':>9} {'bound ms':>9}")  # fmt: skip
    for r in result["compiled"]:
        bound = f"{r['objective_s'] * 1e3:9.2f}" if r["objective_s"] is not None else f"{'-':>9}"
        lines.append(
            f"{r['data']:>4} {r['fsdp']:>4} {r['tensor']:>3} {r['remat']:>5} {r['accum_steps']:>5} "
            f"{r['estimated_gib']:8.1f} {r['gib']:6.1f} {'yes' if r['fits'] else 'no':>5} "
            f"{r['compile_s']:9.1f} {r['collective_bytes'] / 2**20:9.1f} {bound}"
        )
    if result["best"] is None:
        lines.append("no compiled layout fits: raise --compile, or lower train.batch_size")
    else:
        lines.append(f"best: {result['override']}")
    return "\n".join(lines)
