"""The collectives of the compiled train step per mesh kind: what sharding the activations buys.

Each test compiles the ``mini`` train step (global batch 8 x 256 tokens) for a mesh and reads
its collective inventory (:mod:`gptjax.collectives`): on 4 or 8 fake CPU devices, and with
libtpu's compiler on ``v5e:2x2`` / ``v5e:2x4`` topologies (skipped without libtpu).
"""

import jax
import jax.numpy as jnp
import pytest

from gptjax import collectives, sharding
from gptjax.config import load_config
from gptjax.preflight import for_tpu
from gptjax.targets import GENERATIONS, Target, libtpu_available, tpu_devices
from gptjax.train import build

pytestmark = pytest.mark.multidevice  # CPU meshes of up to 8 devices

BATCH = 8
MESHES = {"dp": (4, 1, 1), "fsdp": (1, 4, 1), "tp": (2, 1, 2), "2x2x2": (2, 2, 2)}
needs_libtpu = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]')"
)


def compile_step(kind: str, platform: str):
    data, fsdp, tensor = MESHES[kind]
    overrides = [
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}",
        f"train.batch_size={BATCH}",
    ]
    config = load_config("mini", [*overrides, "model.dtype=bfloat16"])
    n = data * fsdp * tensor
    if platform == "tpu":
        config = for_tpu(config)
        devices = tpu_devices(Target(f"v5e-{n}", GENERATIONS["v5e"], n, {4: "v5e:2x2", 8: "v5e:2x4"}[n]))
    else:
        devices = jax.devices()[:n]
    setup = build(config, sharding.make_mesh(config.mesh, devices))
    batch = jax.ShapeDtypeStruct(
        (BATCH, config.model.block_size + 1), jnp.int32, sharding=sharding.batch_sharding(setup.mesh)
    )
    compiled = setup.train_step.lower(setup.abstract_state, batch).compile()
    return config.model, collectives.inventory(compiled.as_text()), compiled.memory_analysis()


_CACHE: dict = {}


def step(kind: str, platform: str):
    if (kind, platform) not in _CACHE:
        _CACHE[kind, platform] = compile_step(kind, platform)
    return _CACHE[kind, platform]


def global_batch_collectives(inventory, model):
    """Collectives on an activation of the whole global batch: (B, T, ...) shapes."""
    return [c for c in inventory if any(d[:2] == (BATCH, model.block_size) for d in c.dims)]


def activation_all_reduces(inventory, rows, model):
    """All-reduces of per-device hidden states (rows, T, D): Megatron's per-sublayer sums."""
    shape = (rows, model.block_size, model.n_embd)
    return sum(c.count for c in inventory if c.kind == "all-reduce" and shape in c.dims)


PLATFORMS = ["cpu", pytest.param("tpu", marks=needs_libtpu)]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind", ["dp", "fsdp", "tp", "2x2x2"])
def test_no_collective_carries_the_global_batch(kind, platform):
    model, inventory, _ = step(kind, platform)
    assert global_batch_collectives(inventory, model) == []


@pytest.mark.parametrize("platform", PLATFORMS)
def test_fsdp_gathers_weights_and_moves_no_activations(platform):
    model, fsdp, _ = step("fsdp", platform)
    _, dp, _ = step("dp", platform)
    kinds = collectives.totals(fsdp)
    d, f = model.n_embd, model.mlp_ratio * model.n_embd
    gathered = {s for c in fsdp if c.kind == "all-gather" for s in c.dims}
    assert {(d, f), (f, d)} & {s[-2:] for s in gathered}, "the MLP weights are all-gathered"
    # Gradients are summed once each (reduce-scatter, or all-reduce + slice on CPU); nothing
    # else is reduced, so FSDP reduces no more bytes than data parallelism does.
    reduced = sum(kinds.get(k, {"bytes": 0})["bytes"] for k in ("all-reduce", "reduce-scatter"))
    assert reduced <= 1.1 * collectives.totals(dp)["all-reduce"]["bytes"]
    assert activation_all_reduces(fsdp, BATCH // 4, model) == 0


@needs_libtpu
def test_fsdp_reduce_scatters_gradients_on_tpu():
    model, fsdp, _ = step("fsdp", "tpu")
    d, f = model.n_embd, model.mlp_ratio * model.n_embd
    scattered = [c for c in fsdp if c.kind == "reduce-scatter"]
    assert any({(d, f), (f, d)} & set(c.dims) for c in scattered), collectives.format_inventory(fsdp)
    # Every layer's MLP gradients: once per layer per step.
    assert sum(c.count for c in scattered if (d, f) in c.dims) == model.n_layer


def test_fsdp_temporaries_are_within_data_parallels():
    """mini on 4 devices: FSDP's per-device temporaries within 1.2x of pure data parallelism's."""
    fsdp = step("fsdp", "cpu")[2].temp_size_in_bytes
    dp = step("dp", "cpu")[2].temp_size_in_bytes
    assert fsdp <= 1.2 * dp, (fsdp / 2**20, dp / 2**20)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(("kind", "rows"), [("tp", BATCH // 2), ("2x2x2", BATCH // 4)])
def test_tensor_parallel_has_megatrons_pattern(kind, rows, platform):
    """One all-reduce of the per-device hidden states after attention and one after the MLP,
    per block, forward; the same two in the backward pass."""
    model, inventory, _ = step(kind, platform)
    assert activation_all_reduces(inventory, rows, model) == 4 * model.n_layer


def test_inventory_counts_loop_trips_and_tpu_reduce_scatter():
    hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %g = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %g), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %c = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%all-reduce-scatter.1 (x: bf16[16,4]) -> bf16[4,4] {
  %x = bf16[16,4]{1,0} parameter(0)
  %a = bf16[16,4]{1,0} all-reduce(%x), to_apply=%add
  ROOT %s = bf16[4,4]{1,0} dynamic-slice(%a, %o, %o), dynamic_slice_sizes={4,4}
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %w = (s32[], f32[4,8]) while(%t0), condition=%cond, body=%body
  %f = bf16[4,4]{1,0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
  %ag = f32[16,8]{1,0} all-gather(f32[4,8]{1,0} %a), dimensions={0}
}
"""
    by_kind = {c.kind: c for c in collectives.inventory(hlo)}
    assert by_kind["all-reduce"].count == 12 and by_kind["all-reduce"].bytes == 4 * 8 * 4
    assert by_kind["reduce-scatter"].count == 1 and by_kind["reduce-scatter"].bytes == 16 * 4 * 2
    assert by_kind["all-gather"].bytes == 16 * 8 * 4
    assert collectives.total_bytes(list(by_kind.values())) == 12 * 128 + 128 + 512
