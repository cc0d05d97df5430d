"""Checkpoints: every orbax call in gptjax lives in this file.

A checkpoint is one orbax step directory holding up to three items:

* ``params``: the model parameters, as a nested dict of arrays keyed by the pytree's own
  path names (``h/attn/c_attn/value``), restored straight into whatever shardings the
  caller asks for (so a run saved on 8 devices resumes on 4);
* ``train``: everything else that decides the run's future: optimizer state, step and
  the base key (absent in a checkpoint written by ``import-hf``, which holds weights only);
* ``meta``: JSON with the resolved config, the tokenizer, the step and ``checksums``: a
  fingerprint of every array (:func:`fingerprints`), verified at restore, so a file whose
  bytes changed after the commit (a flipped bit, a bad disk) is refused like an unreadable one.

Saves are asynchronous; orbax writes into a temporary directory and renames it when
complete, so an interrupted save is never mistaken for a checkpoint. The last
``keep`` checkpoints are kept, plus the best one by validation loss. A state holding a
non-finite value is never saved, so retention never deletes a good checkpoint to make
room for a diverged one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gptjax.errors import GptjaxError
from gptjax.tree import key_name as _key_name


# Not nnx.to_pure_dict: on optax state, AttributeError: 'tuple' object has no attribute '_mapping'; no /value
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


def _fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A uint32 checksum of an array's bits, and whether all its values are finite.

    The sum of ``bits[i] * (2 i + 1)`` (``i`` the flat index) wraps modulo 2**32; integer
    addition is associative, so the value does not depend on how the array is sharded or
    how XLA orders the sum. No reshape: a sharded array is never gathered to compute it.
    """
    bits = x
    if jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize == 8:
        unsigned = {8: jnp.uint32, 4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned)  # 8-byte values: a trailing axis of 2
    bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32), finite


@jax.jit
def _fingerprints(nested: dict) -> Any:
    return jax.tree.map(_fingerprint, nested)


def fingerprints(nested: dict) -> tuple[dict, list[str]]:
    """``({path: checksum}, [paths of leaves holding NaN or inf])`` of a nested dict of arrays."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_fingerprints(nested)), is_leaf=_is_pair)
    sums, bad = {}, []
    for path, (checksum, finite) in flat[0]:
        name = "/".join(_key_name(k) for k in path)
        sums[name] = int(checksum)
        if not finite:
            bad.append(name)
    return sums, bad


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and not isinstance(x[0], tuple | dict)


class ChecksumError(Exception):
    """A restored checkpoint's arrays do not match the checksums written with it."""


def _verify(step: int, item: str, nested: dict, meta: dict) -> None:
    expected = meta.get("checksums", {}).get(item)
    if expected is None:  # written before checksums existed: nothing to compare against
        return
    actual, _ = fingerprints(nested)
    changed = sorted(k for k in expected if actual.get(k) != expected[k])
    if changed:
        raise ChecksumError(
            f"{item} content differs from its checksum at step {step} ({', '.join(changed[:3])})"
        )


def _val_loss(metrics: Any) -> float:
    value = (metrics or {}).get("val_loss")
    return float(value) if value is not None and math.isfinite(value) else float("inf")


def steps(directory: str | Path) -> list[int]:
    """The finished checkpoint steps in ``directory``, oldest first ([] if there is none).

    Orbax decides what a step is: set-aside (``5.unreadable``) and temporary
    (``.orbax-checkpoint-tmp``) directories are not steps.
    """
    return sorted(ocp.utils.checkpoint_steps(directory)) if Path(directory).is_dir() else []


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
        self._pending: int | None = None  # the step of the save in flight
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
        items = {
            "params": to_nested(state.params),
            "train": to_nested({k: v for k, v in state._asdict().items() if k != "params"}),
        }
        self._save(step, items, meta, metrics)

    def _save(self, step: int, items: dict, meta: dict, metrics: dict | None = None) -> None:
        checksums = {}
        for item, nested in items.items():
            checksums[item], bad = fingerprints(nested)
            if bad:
                raise GptjaxError(
                    f"the state at step {step} holds NaN or inf ({item}: {', '.join(bad[:3])}); it was "
                    f"not saved, so the checkpoints in {self.directory} stay good: lower optim.lr or "
                    "check the data, then re-run"
                )
        args = ocp.args.Composite(
            **{item: ocp.args.StandardSave(nested) for item, nested in items.items()},
            meta=ocp.args.JsonSave({**meta, "checksums": checksums}),
        )
        try:
            self.wait()  # an earlier save's failure is reported under its own step
            self._pending = step
            self._manager.save(step, args=args, metrics=metrics, force=True)
        except GptjaxError:
            raise
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
        self._save(step, {"params": to_nested(params)}, meta)

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
        meta = self.read_meta(step)
        for item in ("params", "train"):
            _verify(step, item, restored[item], meta)
        params = from_nested(abstract_state.params, restored["params"])
        rest = from_nested(rest, restored["train"])
        return type(abstract_state)(params=params, **rest)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restore only the parameters (for sampling, evaluation or initialising a new run)."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(to_nested(abstract_params)))
        nested = self._manager.restore(step, args=args)["params"]
        _verify(step, "params", nested, self.read_meta(step))
        return from_nested(abstract_params, nested)

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

    def set_aside_steps(self) -> list[str]:
        """The names of steps earlier runs set aside as unreadable."""
        return sorted(p.name for p in self.directory.glob("*.unreadable*")) if self.directory.is_dir() else []

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._pending, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
