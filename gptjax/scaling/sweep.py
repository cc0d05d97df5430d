"""Scaling-law sweeps, the definition: a base config and axes, expanded into runs.

A sweep config is a Python file defining ``get_sweep() -> Sweep``: a base :class:`Config`
plus axes whose Cartesian product is the set of runs. Each run trains into
``SWEEP_DIR/runs/<hash>`` (the hash of its config); ``SWEEP_DIR/sweep.json`` records which
sweep owns the directory. Executors (:mod:`gptjax.scaling.local`, :mod:`gptjax.scaling.slurm`)
train the runs, :mod:`gptjax.scaling.results` tabulates them, :mod:`gptjax.scaling.fits`
and :mod:`gptjax.scaling.plots` read the table back.

Conventions (Kaplan et al. 2020): N is the non-embedding parameter count, D the tokens
trained on, C = 6 N D the training FLOPs, and L the validation loss in nats per token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from gptjax import fields
from gptjax.config import Config, apply_overrides, load_recipe, param_counts
from gptjax.errors import GptjaxError

ALIASES = {"lr": "optim.lr", "seed": "train.seed"}
BUDGETS = ("tokens", "flops")
SLURM_KEYS = (
    "partition", "account", "time", "ntasks", "gpus_per_task", "cpus_per_task", "max_parallel",
    "signal_seconds", "extra",
)  # fmt: skip


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
        concurrent: Runs trained at once in one process (:func:`run_sweep`), each on its own
            disjoint slice of the devices (the device count must divide evenly).
        slurm: Defaults for ``gptjax sweep --slurm`` (keys: ``partition``, ``account``,
            ``time``, ``ntasks``, ``gpus_per_task``, ``cpus_per_task``, ``max_parallel``,
            ``signal_seconds``, ``extra``: a list of ``#SBATCH`` option strings); the
            command line's options win.
    """

    name: str
    base: Config
    axes: dict[str, Sequence[Any]]
    concurrent: int = 1
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)

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
        unknown = sorted(set(self.slurm) - set(SLURM_KEYS))
        if unknown:
            raise GptjaxError(f"sweep slurm keys {unknown} are unknown: use {', '.join(SLURM_KEYS)}")

    def spec(self) -> dict[str, Any]:
        """What identifies the sweep (JSON): name, base config and axes."""
        spec = {"name": self.name, "base": self.base.to_dict(), "axes": dict(self.axes)}
        return json.loads(json.dumps(spec))  # tuples become lists, as when read back


class Run(NamedTuple):
    """One point of a sweep: its hash, its full config and its axis values."""

    hash: str
    config: Config
    point: dict[str, Any]


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
    return fields.replace(config, changes, what="sweep axis")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record(sweep_dir: str | Path, sweep: Sweep, runs: list[Run]) -> Path:
    """Write ``sweep.json`` (what identifies the sweep, and its runs' axis values); a
    directory written by another sweep, or holding something else, is rejected."""
    sweep_dir = Path(sweep_dir)
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
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"spec": spec, "runs": {r.hash: r.point for r in runs}}, indent=2))
    tmp.replace(path)
    return path


def read(sweep_dir: str | Path) -> tuple[Sweep, list[Run]]:
    """The sweep a directory was written by, and its runs."""
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
    return sweep, expand(sweep, sweep_dir)


def default_dir(sweep: Sweep) -> Path:
    return Path("sweeps") / sweep.name
