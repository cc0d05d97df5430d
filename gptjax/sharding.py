"""Device meshes and logical-axis rules: every mesh and PartitionSpec decision lives here.

The model names each parameter axis logically (``vocab``, ``embed``, ``heads``, ``mlp``,
``layers``...). :data:`RULES` maps logical names to mesh axes:

* data parallel: nothing maps to ``data``, so parameters are replicated over it;
* FSDP: ``embed`` maps to ``fsdp``, so every matrix (and its AdamW moments) is split
  along its model dimension over the ``fsdp`` devices;
* tensor parallel (Megatron): ``heads`` and ``mlp`` map to ``tensor``: QKV and the first
  MLP matmul are split by output, the projections by input, so each block needs one
  all-reduce per sublayer. The vocabulary is split over ``tensor`` too.

The batch is split over (``data``, ``fsdp``). A dimension that a mesh axis does not
divide is left unsplit on that axis rather than padded.

Activations are named too (:func:`constrain`): the model pins its hidden states to
``batch`` over (``data``, ``fsdp``) with the model dimension whole, and its heads and MLP
hidden units over ``tensor``. Without that, XLA propagates the parameters' ``embed``
sharding into the activations and an FSDP step computes the whole global batch on a slice
of the model dimension (all-reducing global-batch activations). Each weight is pinned to
its own sharding where it is used (:func:`constrain_param`), so its gradient keeps that
sharding: FSDP all-gathers weights in the forward pass and reduce-scatters gradients.
The constraints act while a step is traced under :func:`under_mesh`; elsewhere (the
sampler, a single device) they are no-ops.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptjax import peers, quiet
from gptjax.config import MeshConfig
from gptjax.errors import GptjaxError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: dict[str | None, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    None: None,
}


# Activation axes: the batch over every data-parallel axis, the model dimension whole.
ACTIVATION_RULES: dict[str | None, str | tuple[str, ...] | None] = {
    **RULES,
    "batch": BATCH_AXES,
    "embed": None,
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve -1 to "the rest of the devices" and check the product is the device count."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for name, value in sizes.items():
        if value == -1:
            if n_devices % fixed:
                raise GptjaxError(
                    f"mesh: {n_devices} devices cannot be split into {fixed} x the rest "
                    f"(mesh.{name}=-1 needs the other axes' product to divide the device count)"
                )
            sizes[name] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise GptjaxError(
            f"mesh data x fsdp x tensor = {sizes['data']} x {sizes['fsdp']} x {sizes['tensor']} = "
            f"{math.prod(sizes.values())} but there are {n_devices} devices; set one axis to -1"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``data x fsdp x tensor`` mesh over ``devices`` (default: all, on every host)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    # Auto axes: shardings are given at jit boundaries and XLA's partitioner propagates
    # them through the step (rather than JAX's explicit sharding-in-types mode).
    axis_types = (AxisType.Auto,) * len(AXES)
    if devices == list(jax.devices()):
        # Topology-aware ordering on real hardware (ICI/NVLink neighbours on inner axes).
        return jax.make_mesh(shape, AXES, devices=devices, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh, rules=None) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have logical names ``axes``.

    ``rules`` maps names to a mesh axis or a tuple of them (default :data:`RULES`); mesh
    axes of size 1, already used, or not dividing the dimension are dropped.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        target = rules.get(name)
        kept = []
        for mesh_axis in (target,) if isinstance(target, str) else (target or ()):
            size = mesh.shape[mesh_axis] * math.prod(mesh.shape[a] for a in kept)
            if mesh_axis not in used and mesh.shape[mesh_axis] > 1 and dim % size == 0:
                kept.append(mesh_axis)
                used.add(mesh_axis)
        spec.append(None if not kept else kept[0] if isinstance(target, str) else tuple(kept))
    return PartitionSpec(*spec)


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """``fn`` traced with ``mesh`` as the abstract mesh, so that :func:`constrain` acts in it."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def current_platform() -> str:
    """The platform a step is being traced for: the mesh's devices' (a TPU topology compiled
    on a CPU host says ``tpu``), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def map_shards(fn: Callable, axes: Sequence[str | None], *args: jax.Array) -> jax.Array:
    """``fn(*args)`` run on each device's shards (``shard_map``), for kernels XLA cannot partition.

    Every argument and the result have dimensions named ``axes`` (:data:`ACTIVATION_RULES`);
    without a mesh, ``fn`` sees the whole arrays.
    """
    mesh = _current_mesh()
    if mesh is None:
        return fn(*args)
    specs = tuple(spec_for(axes, a.shape, mesh, ACTIVATION_RULES) for a in args)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin activation ``x`` (dimensions named ``axes``, see :data:`ACTIVATION_RULES`) to the mesh."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh, ACTIVATION_RULES))


def constrain_param(value: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin a parameter's value where it is used to its stored sharding (its gradient follows).

    ``axes`` may still carry the leading ``layers`` of a stacked parameter that a scan has
    sliced; it is dropped then.
    """
    mesh = _current_mesh()
    if mesh is None:
        return value
    axes = tuple(axes)[len(axes) - value.ndim :]
    spec = spec_for(axes, value.shape, mesh)
    if all(p is None for p in spec):  # replicated: leave XLA free to sum micro-batches locally
        return value
    return jax.lax.with_sharding_constraint(value, spec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> nnx.State:
    """A tree like ``abstract_params`` whose leaves are the NamedShardings of each Param."""

    def one(variable):
        spec = spec_for(variable.get_metadata()["axes"], variable.shape, mesh)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch dimension split over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble this process's rows into the global, batch-sharded array."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local_batch.ndim), local_batch)


# --------------------------------------------------------------------------------------
# Multi-host


def initialize_distributed() -> bool:
    """Start JAX's multi-controller runtime if this process is one of several; idempotent.

    Sources, in order: JAX's own variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what ``gptjax launch`` sets); else a
    cluster JAX detects itself — SLURM with more than one task, Open MPI with more than one
    rank, or any cluster (TPU pod slices included) when ``GPTJAX_DISTRIBUTED=1``. Nothing
    in the training config changes between 1 and N processes. Returns whether more than
    one process is running.

    Must run before anything touches a JAX device; :func:`gptjax.train` calls it first.
    """
    from jax._src import distributed

    if distributed.global_state.client is not None:
        return jax.process_count() > 1
    env = os.environ
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    detected = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or env.get("GPTJAX_DISTRIBUTED") == "1"
    )
    if not (explicit or detected):
        return False
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if quiet.is_quiet():  # not under --debug, which shows the runtime's own lines
        peers.filter_native_output()
    timeouts = {"heartbeat_timeout_seconds": peers.heartbeat_timeout(env)}
    try:
        if explicit:
            jax.distributed.initialize(
                coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"]),
                **timeouts,
            )
        else:
            jax.distributed.initialize(**timeouts)
    except KeyError as e:
        raise GptjaxError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not: set both") from e
    except RuntimeError as e:
        raise GptjaxError(f"jax.distributed could not start ({e}): check the coordinator address") from e
    return jax.process_count() > 1
