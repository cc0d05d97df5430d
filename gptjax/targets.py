"""TPU targets one can compile for without a TPU: names, topologies, memory and peak tables.

``libtpu`` (``pip install -e '.[tpu]'``) carries XLA's TPU compiler. With
``jax.experimental.topologies.get_topology_desc`` it describes the chips of a TPU slice
as abstract devices; a :class:`~jax.sharding.Mesh` over them lowers and compiles a
program exactly as on the slice itself, here on the CPU. :func:`tpu_devices` does that in
a process started with ``JAX_PLATFORMS=cpu`` (see :func:`tpu_env`), so libtpu does not
look for hardware.

Targets use Cloud TPU's names: ``v5e-16`` / ``v5litepod-16`` and ``v6e-8`` count chips;
``v4-32`` and ``v5p-128`` count TensorCores, two per chip (one megacore device each).
``x2`` at the end (``v5e-16x2``) asks for several slices joined over the data-centre
network.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from gptjax.errors import GptjaxError


@dataclass(frozen=True)
class Generation:
    """One TPU generation's per-chip figures.

    Attributes:
        name: Short name (``v5e``).
        hbm_bytes: HBM per chip.
        peak_flops: Dense bf16 peak FLOP/s per chip.
        ici_bytes_per_s: Inter-chip interconnect bandwidth per chip, bytes/s (all links).
        dims: 2 for a 2-D torus (v5e, v6e), 3 for 3-D (v4, v5p).
        cores_per_chip: TensorCores a Cloud name counts per chip (2 for v4/v5p, 1 else).
        max_chips: The largest single slice.
    """

    name: str
    hbm_bytes: int
    peak_flops: float
    ici_bytes_per_s: float
    dims: int
    cores_per_chip: int
    max_chips: int


# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e), "chip specifications" tables: HBM capacity, peak bf16 compute, ICI bandwidth per
# chip (Gbps / 8 = bytes/s): v4 2400 Gbps, v5e 1600 Gbps, v5p 4800 Gbps, v6e 3584 Gbps.
GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 32 * 2**30, 275e12, 2400e9 / 8, 3, 2, 4096),
    "v5e": Generation("v5e", 16 * 2**30, 197e12, 1600e9 / 8, 2, 1, 256),
    "v5p": Generation("v5p", 95 * 2**30, 459e12, 4800e9 / 8, 3, 2, 8960),
    "v6e": Generation("v6e", 32 * 2**30, 918e12, 3584e9 / 8, 2, 1, 256),
}
_ALIASES = {"v5litepod": "v5e", "v6lite": "v6e", "v5lite": "v5e"}
_NAME = re.compile(r"^(v4|v5e|v5litepod|v5lite|v5p|v6e|v6lite)-(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class Target:
    """A TPU slice (or several) to compile for.

    Attributes:
        name: As given (``v5e-16``).
        generation: Its :class:`Generation`.
        chips: Chips per slice.
        topology: ``get_topology_desc``'s name, e.g. ``v5e:4x4``.
        num_slices: Slices (data-centre network between them).
    """

    name: str
    generation: Generation
    chips: int
    topology: str
    num_slices: int = 1

    @property
    def devices(self) -> int:
        return self.chips * self.num_slices


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The most nearly cubic (square) power-of-two torus shape of ``chips`` chips, ascending."""
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    return tuple(sorted(shape))


def parse_target(name: str) -> Target:
    """``v5e-16`` -> a Target of 16 v5e chips on a 4x4 torus; a clear error otherwise."""
    match = _NAME.match(name.strip().lower())
    known = "v4-N, v5e-N (v5litepod-N), v5p-N, v6e-N, optionally xS for S slices (v5e-16x2)"
    if not match:
        raise GptjaxError(f"unknown target {name!r}: expected a Cloud TPU name, {known}")
    gen = GENERATIONS[_ALIASES.get(match.group(1), match.group(1))]
    count, slices = int(match.group(2)), int(match.group(3) or 1)
    chips = count // gen.cores_per_chip
    if chips < 1 or chips & (chips - 1) or count % gen.cores_per_chip or chips > gen.max_chips:
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip == 2 else "chips"
        raise GptjaxError(
            f"target {name!r}: {gen.name} slices come in powers of two {unit}, "
            f"from {gen.cores_per_chip} to {gen.max_chips * gen.cores_per_chip}; got {count}"
        )
    shape = _torus(chips, gen.dims)
    if gen.dims == 3 and chips < 8:
        shape = (*_torus(chips, 2), 1)
    return Target(name, gen, chips, f"{gen.name}:{'x'.join(map(str, shape))}", slices)


def tpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a process that compiles for TPU on the CPU (libtpu must not probe hardware)."""
    env = dict(os.environ if env is None else env)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Several compiling processes at once (tests, a plan) may each load libtpu.
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return env


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(target: Target) -> list:
    """The target's abstract TPU devices (call in a process set up by :func:`tpu_env`)."""
    if not libtpu_available():
        raise GptjaxError("compiling for TPU needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    for name, value in tpu_env({}).items():  # read when libtpu loads, in this process too
        if name != "JAX_PLATFORMS":
            os.environ.setdefault(name, value)
    bounds = (2, 2, 1) if target.chips >= 4 else (target.chips, 1, 1)
    try:
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=target.topology,
            chip_config_name="default",
            chips_per_host_bounds=bounds,
            num_slices=target.num_slices,
        )
    except Exception as e:  # libtpu reports an unsupported topology as a bare RuntimeError
        raise GptjaxError(f"libtpu cannot describe {target.name} ({target.topology}): {e}") from e
    return list(topology.devices)
