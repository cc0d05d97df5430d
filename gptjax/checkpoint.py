"""Checkpoints: every orbax call in gptjax lives in this file.

A checkpoint is one orbax step directory holding up to three items:

* ``params``: the model parameters, as a nested dict of arrays keyed by the pytree's own
  path names (``h/attn/c_attn/value``), restored straight into whatever shardings the
  caller asks for (so a run saved on 8 devices resumes on 4);
* ``train``: everything else that decides the run's future: optimizer state, step and
  the base key (absent in a checkpoint written by ``import-hf``, which holds weights only);
* ``meta``: JSON with the resolved config, the tokenizer and the step.

Saves are asynchronous; orbax writes into a temporary directory and renames it when
complete, so an interrupted save is never mistaken for a checkpoint. The last
``keep`` checkpoints are kept, plus the best one by validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gptjax.errors import GptjaxError
from gptjax.tree import key_name as _key_name


def to_nested(tree: Any) -> dict:
    """A pytree as nested dicts of its leaves, keyed by path names (orbax-friendly)."""
    nested: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = nested
        keys = [_key_name(k) for k in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return nested


def from_nested(template: Any, nested: dict) -> Any:
    """Inverse of :func:`to_nested`: rebuild ``template``'s structure from ``nested``."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, _ in paths:
        node = nested
        for k in path:
            node = node[_key_name(k)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _val_loss(metrics: Any) -> float:
    value = (metrics or {}).get("val_loss")
    return float(value) if value is not None and math.isfinite(value) else float("inf")


class Checkpointer:
    """Saves and restores train states under ``directory`` (one orbax CheckpointManager)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 2,
        async_save: bool = True,
        read_only: bool = False,
        best: Callable[[dict], Any] | None = None,
    ):
        """``best``: the sort key (lowest is best) of a checkpoint's metrics; default val_loss."""
        self.directory = Path(directory).absolute()
        self._best = best or _val_loss
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                # BestN keeps the *last* n of its sorted order: sorted high to low, that is
                # the lowest key (reverse=False kept the worst checkpoint).
                policies.BestN(
                    get_metric_fn=self._best, reverse=True, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise GptjaxError(
                f"cannot create checkpoint directory {str(self.directory)!r}: {e.strerror}"
            ) from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Start an asynchronous save of a train state at ``step`` (``wait`` to block).

        ``state`` has a ``params`` field; its other fields are saved as the ``train`` item.
        """
        rest = {k: v for k, v in state._asdict().items() if k != "params"}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(to_nested(state.params)),
            train=ocp.args.StandardSave(to_nested(rest)),
            meta=ocp.args.JsonSave(meta),
        )
        self._save(step, args, metrics)

    def _save(self, step: int, args: Any, metrics: dict | None = None) -> None:
        try:
            self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # I/O failures surface as many types, some from the async thread
            raise self._save_error(step, e) from e

    def _save_error(self, step: int | str, e: Exception) -> GptjaxError:
        return GptjaxError(
            f"saving the checkpoint at step {step} in {self.directory} failed ({type(e).__name__}: "
            f"{str(e)[:200]}); earlier checkpoints are intact: free disk space or fix permissions, "
            "then re-run"
        )

    def save_params(self, step: int, params: Any, meta: dict) -> None:
        """Save parameters alone (an imported model): loadable, not resumable."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(to_nested(params)), meta=ocp.args.JsonSave(meta)
        )
        self._save(step, args)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restore a train state into the structure, dtypes and shardings of ``abstract_state``.

        ``abstract_state`` is a NamedTuple with a ``params`` field, whose leaves are
        ``jax.ShapeDtypeStruct`` with ``sharding`` set.
        """
        rest = {k: v for k, v in abstract_state._asdict().items() if k != "params"}
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(to_nested(abstract_state.params)),
            train=ocp.args.StandardRestore(to_nested(rest)),
        )
        restored = self._manager.restore(step, args=args)
        params = from_nested(abstract_state.params, restored["params"])
        rest = from_nested(rest, restored["train"])
        return type(abstract_state)(params=params, **rest)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restore only the parameters (for sampling, evaluation or initialising a new run)."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(to_nested(abstract_params)))
        return from_nested(abstract_params, self._manager.restore(step, args=args)["params"])

    def set_aside(self, step: int) -> Path:
        """Rename an unreadable step out of orbax's way (kept for inspection, never deleted)."""
        target = self.directory / f"{step}.unreadable"
        n = 1
        while target.exists():
            target, n = self.directory / f"{step}.unreadable-{n}", n + 1
        (self.directory / str(step)).rename(target)
        self._manager.reload()
        return target

    def has_train_state(self, step: int) -> bool:
        return (self.directory / str(step) / "train").is_dir()

    def read_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error("(pending async save)", e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
