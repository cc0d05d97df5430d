"""Checkpoints: every orbax call in gptjax lives in this file.

A checkpoint is one orbax step directory holding two items:

* ``state``: the train state (params, optimizer state, step, base key) as a nested dict
  of arrays keyed by the pytree's own path names, restored straight into whatever
  shardings the caller asks for (so a run saved on 8 devices resumes on 4);
* ``meta``: JSON with the resolved config, the step and the metrics at save time.

Saves are asynchronous; orbax writes into a temporary directory and renames it when
complete, so an interrupted save is never mistaken for a checkpoint. The last
``keep`` checkpoints are kept, plus the best one by validation loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gptjax.errors import GptjaxError


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


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

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=_val_loss, reverse=False, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise GptjaxError(f"cannot create checkpoint directory {str(self.directory)!r}: {e.strerror}") from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Start an asynchronous save of ``state`` at ``step`` (``wait`` to block)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(to_nested(state)), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore ``step`` into the structure, dtypes and shardings of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
        """
        target = to_nested(abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return from_nested(abstract_state, restored["state"]), dict(restored["meta"])

    def read_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
