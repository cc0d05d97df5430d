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

TPU targets (``--target v5e-16``, see :mod:`gptjax.targets`): the step is compiled by
libtpu's XLA:TPU compiler for the target's abstract chips, in a subprocess with
``JAX_PLATFORMS=cpu``. ``auto`` settings resolve as on that TPU (``model.remat=auto`` is
``none``). The report adds the generation's HBM per chip, FLOPs per step and the
collective inventory (:mod:`gptjax.collectives`); the compiler's ``CompileTimeHbmOom``
becomes ``fits: false`` with the compiler's own numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import collectives, sharding
from gptjax.config import Config, flops_per_token
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


def _analyse(config: Config, devices=None) -> dict[str, Any]:
    """Build, lower and compile the train step on ``devices`` (default: visible); sizes per device."""
    from gptjax.train import build

    setup = build(config, sharding.make_mesh(config.mesh, devices) if devices is not None else None)
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
        "device_kind": setup.mesh.devices.flat[0].device_kind,
        **sizes,
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
    }
    start = time.perf_counter()
    try:
        compiled = setup.train_step.lower(state, batch).compile()
        report["compile_s"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
    except Exception as e:  # an XLA failure (e.g. out of host memory) falls back to the estimate
        report["compile_s"] = time.perf_counter() - start
        oom = _hbm_oom(str(e), report)
        if oom:  # XLA:TPU stops at its memory limit: that is the answer, not a failure
            return {**report, **oom}
        report["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        memory = None
    else:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        # XLA's cost analysis counts a scanned loop's body once: kept for reference only.
        report["xla_flops_per_step"] = float((cost or {}).get("flops", 0.0))
        report["flops_per_step"] = step_flops(config, setup.mesh.devices.size)
        inventory = collectives.inventory(compiled.as_text())
        report["collectives"] = collectives.totals(inventory)
        report["collective_bytes"] = collectives.total_bytes(inventory)
        report["collective_top"] = [dataclasses.asdict(c) for c in inventory[:8]]
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


# Recomputation as a fraction of a step's FLOPs: full remat reruns the forward pass (1/3
# of forward + backward); dots reruns only the elementwise work between matmuls.
REMAT_FLOPS = {"none": 0.0, "dots": 0.05, "full": 1 / 3}


def step_flops(config: Config, n_devices: int) -> float:
    """Training FLOPs per step and device: the model's (:func:`flops_per_token`) plus recomputation."""
    m = config.model
    tokens = config.train.batch_size * m.block_size
    return flops_per_token(m)["total"] * tokens * (1 + REMAT_FLOPS[remat_policy(m)]) / n_devices


def _hbm_oom(message: str, report: dict[str, Any]) -> dict[str, Any] | None:
    """XLA:TPU's compile-time HBM OOM as a report (its numbers), or None for any other error.

    The compiler says e.g. "the total memory required for HLO temporaries (52.58G) exceeds
    available HBM (15.75G)"; the total adds the sharded state and batch to those temporaries.
    """
    if "RESOURCE_EXHAUSTED" not in message or "HBM" not in message:
        return None
    sizes = dict(re.findall(r"(temporaries|HBM)\s*\(([\d.]+[KMGT])\)", message))
    temp = _to_bytes(sizes["temporaries"]) if "temporaries" in sizes else 0
    state = report["params_bytes"] + report["opt_state_bytes"] + report["batch_bytes"]
    return {
        "method": "compiled: XLA:TPU stopped at its HBM limit (CompileTimeHbmOom)",
        "temp_bytes": temp,
        "total_bytes": state + temp,
        "compiler_limit_bytes": _to_bytes(sizes["HBM"]) if "HBM" in sizes else None,
        "hbm_oom": next(line for line in message.splitlines() if "HBM" in line).strip()[:400],
        "fits": False,
    }


def _to_bytes(size: str) -> int:
    """``52.58G`` -> bytes (XLA prints binary units)."""
    return int(float(size[:-1]) * 2 ** (10 * " KMGT".index(size[-1])))


def dry_run(
    config: Config, *, n_devices: int = 0, device_memory: float = 0, target: str = ""
) -> dict[str, Any]:
    """Compile ``config``'s train step without running it and report per-device memory.

    Args:
        config: The run.
        n_devices: Devices of the target mesh (0: those visible). More than are visible
            compiles against that many fake CPU devices in a subprocess (CPU backend).
        device_memory: Bytes per target device; 0 reads it from the device (see
            :func:`target_memory`).
        target: A TPU slice (``v5e-16``, see :mod:`gptjax.targets`) to compile for with
            libtpu instead of the visible devices.

    Returns:
        The report: mesh, method, byte counts, ``target_bytes`` and ``fits``.
    """
    if target:
        return tpu_dry_run(config, target, device_memory=device_memory)
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


def tpu_dry_run(config: Config, target: str, *, device_memory: float = 0) -> dict[str, Any]:
    """:func:`dry_run` for a TPU slice: compiled by libtpu in a subprocess (see the module doc)."""
    from gptjax import targets

    slice_ = targets.parse_target(target)
    if not targets.libtpu_available():
        raise GptjaxError("--target needs libtpu to compile for TPU: pip install -e '.[tpu]'")
    report = _in_subprocess(for_tpu(config), 0, target=target)
    report["target"] = target
    report["topology"] = f"{slice_.topology}" + (
        f" x {slice_.num_slices} slices" if slice_.num_slices > 1 else ""
    )
    if device_memory > 0:
        report["target_bytes"], report["target_source"] = int(device_memory), "given (--device-memory)"
    else:
        hbm = slice_.generation.hbm_bytes
        report["target_bytes"], report["target_source"] = hbm, f"{slice_.generation.name} HBM per chip"
    report.setdefault("fits", report["total_bytes"] <= report["target_bytes"])
    return report


def for_tpu(config: Config) -> Config:
    """``config`` with its ``auto`` model settings resolved as on a TPU."""
    m = config.model
    remat = "none" if m.remat == "auto" else m.remat
    return dataclasses.replace(config, model=dataclasses.replace(m, remat=remat))


def _in_subprocess(config: Config, n_devices: int, target: str = "") -> dict[str, Any]:
    from gptjax.launch import with_cpu_devices

    if target:
        from gptjax.targets import tpu_env

        env = tpu_env()
        argv = ["--target", target]
    else:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), n_devices)
        argv = []
    out = subprocess.run(
        [sys.executable, "-m", "gptjax.preflight", *argv],
        input=config.to_json(),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode:
        where = target or f"{n_devices} fake devices"
        raise GptjaxError(f"dry run on {where} failed:\n{out.stderr[-2000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if "error" in report:
        raise GptjaxError(report["error"])
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table ``gptjax train --dry-run`` prints."""

    def mib(n):
        return f"{n / 2**20:,.1f} MiB"

    rows = [("target", f"{report['target']} ({report['topology']})")] if "target" in report else []
    rows += [
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
    rows.append(("memory", f"{mib(report['target_bytes'])} ({report['target_source']}): {verdict}"))
    if "hbm_oom" in report:
        rows.append(("compiler", report["hbm_oom"]))
    if "compile_s" in report:
        rows.append(("compile time", f"{report['compile_s']:.1f} s"))
    if report.get("flops_per_step"):
        rows.append(("FLOPs per step", f"{report['flops_per_step']:.3e} per device (model + remat)"))
    for kind, t in report.get("collectives", {}).items():
        rows.append((kind, f"{t['count']} per step, {mib(t['bytes'])} per device"))
    if "compile_error" in report:
        rows.append(("compile error", report["compile_error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _main(argv: list[str]) -> dict[str, Any]:
    """The subprocess of a dry run on more devices than are visible, or on a TPU target.

    A user error (the config does not suit the mesh) comes back as ``{"error": message}``.
    """
    try:
        config = Config.from_dict(json.loads(sys.stdin.read()))
        if argv[:1] != ["--target"]:
            return _analyse(config)
        from gptjax import targets

        return _analyse(config, targets.tpu_devices(targets.parse_target(argv[1])))
    except GptjaxError as e:
        return {"error": str(e)}


if __name__ == "__main__":
    print(json.dumps(_main(sys.argv[1:])))
