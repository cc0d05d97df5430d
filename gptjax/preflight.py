"""``gptjax train CONFIG --dry-run``: compile the train step ahead of time and report its memory.

Nothing is allocated: the step from :func:`gptjax.train.build` is lowered against
``setup.abstract_state`` (ShapeDtypeStructs carrying the target shardings) and a batch
ShapeDtypeStruct, compiled, and XLA's ``memory_analysis()`` gives per-device sizes:

- arguments (parameters, optimizer state, batch), outputs and the bytes aliased between
  them (the state is donated, so its outputs reuse its arguments' buffers);
- temporaries: activations kept for the backward pass plus the step's working buffers;
- generated code.

Per-device total = arguments + outputs - aliased + temporaries + generated code. It is
compared with the target device's memory: ``--device-memory`` if given, else the device's
``memory_stats()["bytes_limit"]`` (GPU, TPU), else the machine's RAM (CPU).

Meshes larger than this machine: JAX compiles only for devices it can see. On the CPU
backend the step is compiled in a subprocess with ``--xla_force_host_platform_device_count``
set to the mesh size, so XLA partitions it for the real mesh shape and the per-device sizes
are those of the sharded program (as the CPU compiler lays it out: a GPU or TPU compiler
fuses differently, so temporaries there differ). If that compile fails, an analytic
estimate is printed instead: exact sharded bytes of parameters, optimizer state and batch
from the abstract state, plus activations estimated as ``n_layer * B * T * (34 D + 5 N T)``
bytes per device (Korthikanti et al. 2022, fp16 formula scaled to the compute dtype's
width), divided by the data-parallel size. The report says which method produced it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import sharding
from gptjax.config import Config
from gptjax.errors import GptjaxError
from gptjax.model import remat_policy


def _sharded_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def target_memory(device_memory: float = 0) -> tuple[int, str]:
    """Bytes of memory per device to fit in, and where the number came from."""
    if device_memory > 0:
        return int(device_memory), "given (--device-memory)"
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats bytes_limit"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram, "this machine's RAM (CPU devices share it)"


def _analyse(config: Config) -> dict[str, Any]:
    """Build, lower and compile the train step on the visible devices; sizes per device."""
    from gptjax.train import build

    setup = build(config)
    state = setup.abstract_state
    batch = jax.ShapeDtypeStruct(
        (config.train.batch_size, config.model.block_size + 1),
        jnp.int32,
        sharding=sharding.batch_sharding(setup.mesh),
    )
    sizes = {
        "params_bytes": _sharded_bytes(state.params),
        "opt_state_bytes": _sharded_bytes(state.opt_state),
        "batch_bytes": _sharded_bytes(batch),
    }
    report: dict[str, Any] = {
        "mesh": dict(setup.mesh.shape),
        "devices": setup.mesh.devices.size,
        "device_kind": jax.devices()[0].device_kind,
        **sizes,
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
    }
    try:
        import time

        start = time.perf_counter()
        compiled = setup.train_step.lower(state, batch).compile()
        report["compile_s"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
    except Exception as e:  # an XLA failure (e.g. out of host memory) falls back to the estimate
        report["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        memory = None
    if memory is not None:
        report.update(
            method="compiled (XLA memory_analysis of the AOT-compiled train step)",
            argument_bytes=memory.argument_size_in_bytes,
            output_bytes=memory.output_size_in_bytes,
            alias_bytes=memory.alias_size_in_bytes,
            temp_bytes=memory.temp_size_in_bytes,
            generated_code_bytes=memory.generated_code_size_in_bytes,
        )
        report["total_bytes"] = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes
        )
    else:
        report.update(_analytic(config, report))
    return report


def _analytic(config: Config, sizes: dict[str, Any]) -> dict[str, Any]:
    m = config.model
    width = jnp.dtype(m.dtype).itemsize / 2  # the formula counts 2-byte activations
    dp = sizes["mesh"]["data"] * sizes["mesh"]["fsdp"]
    b, t = config.train.batch_size, m.block_size
    activations = m.n_layer * b * t * (34 * m.n_embd + 5 * m.n_head * t) * width / dp
    logits = b * t * m.vocab_size * 4 * 2 / dp  # float32 logits and their gradient
    if remat_policy(m) == "full":
        activations = m.n_layer * b * t * m.n_embd * jnp.dtype(m.dtype).itemsize / dp
    temp = int(activations + logits)
    grads = sizes["params_bytes"]
    return {
        "method": "analytic (sharded state bytes + Korthikanti et al. activation estimate)",
        "argument_bytes": sizes["params_bytes"] + sizes["opt_state_bytes"] + sizes["batch_bytes"],
        "temp_bytes": temp + grads,
        "total_bytes": sizes["params_bytes"] + sizes["opt_state_bytes"] + sizes["batch_bytes"] + temp + grads,
    }


def dry_run(config: Config, *, n_devices: int = 0, device_memory: float = 0) -> dict[str, Any]:
    """Compile ``config``'s train step without running it and report per-device memory.

    Args:
        config: The run.
        n_devices: Devices of the target mesh (0: those visible). More than are visible
            compiles against that many fake CPU devices in a subprocess (CPU backend).
        device_memory: Bytes per target device; 0 reads it from the device (see
            :func:`target_memory`).

    Returns:
        The report: mesh, method, byte counts, ``target_bytes`` and ``fits``.
    """
    visible = jax.device_count()
    if n_devices and n_devices != visible:
        if n_devices < visible:
            raise GptjaxError(f"--devices ({n_devices}) is fewer than the {visible} visible devices")
        report = _in_subprocess(config, n_devices)
        report["method"] += f"; {n_devices} fake CPU devices (--xla_force_host_platform_device_count)"
    else:
        report = _analyse(config)
    report["target_bytes"], report["target_source"] = target_memory(device_memory)
    report["fits"] = report["total_bytes"] <= report["target_bytes"]
    return report


def _in_subprocess(config: Config, n_devices: int) -> dict[str, Any]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n_devices}"])
    out = subprocess.run(
        [sys.executable, "-m", "gptjax.preflight"],
        input=config.to_json(),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode == _USER_ERROR:  # the config does not suit the mesh: its one-line reason
        raise GptjaxError(out.stderr.strip().splitlines()[-1])
    if out.returncode:
        raise GptjaxError(f"dry run on {n_devices} fake devices failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table ``gptjax train --dry-run`` prints."""

    def mib(n):
        return f"{n / 2**20:,.1f} MiB"

    rows = [
        ("mesh", f"{report['mesh']} on {report['devices']} x {report['device_kind']}"),
        ("method", report["method"]),
        ("parameters", f"{report['params']:,} ({mib(report['params_bytes'])} per device)"),
        ("optimizer state", mib(report["opt_state_bytes"])),
        ("batch", mib(report["batch_bytes"])),
    ]
    for key, label in (
        ("argument_bytes", "arguments"),
        ("output_bytes", "outputs"),
        ("alias_bytes", "aliased (donated state)"),
        ("temp_bytes", "activations + temporaries"),
        ("generated_code_bytes", "generated code"),
    ):
        if key in report:
            rows.append((label, mib(report[key])))
    rows.append(("total per device", mib(report["total_bytes"])))
    verdict = "fits" if report["fits"] else "does NOT fit"
    rows.append(("target", f"{mib(report['target_bytes'])} ({report['target_source']}): {verdict}"))
    if "compile_s" in report:
        rows.append(("compile time", f"{report['compile_s']:.1f} s"))
    if "compile_error" in report:
        rows.append(("compile error", report["compile_error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_USER_ERROR = 2  # the subprocess's exit code for a GptjaxError, whose message is its last line

if __name__ == "__main__":  # the subprocess of a dry run on more devices than are visible
    try:
        print(json.dumps(_analyse(Config.from_dict(json.loads(sys.stdin.read())))))
    except GptjaxError as e:
        print(e, file=sys.stderr)
        sys.exit(_USER_ERROR)
