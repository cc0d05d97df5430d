"""The jitted train step: sharded == single device, accumulation, schedule, decay mask."""

import importlib
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import sharding
from gptjax.config import MeshConfig, load_config
from gptjax.errors import GptjaxError

# gptjax.train is the train() function; the module holds the step builders.
train_lib = importlib.import_module("gptjax.train")

BASE = [
    "model.n_embd=32",
    "model.n_head=4",
    "model.n_layer=2",
    "model.block_size=16",
    "train.steps=10",
    "train.batch_size=8",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
]


def _config(*overrides):
    return load_config("nano", [*BASE, *overrides])


def _batches(n, batch=8, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 257, (batch, seq + 1)).astype(np.int32) for _ in range(n)]


def _run(config, mesh, batches):
    setup = train_lib.build(config, mesh)
    state = setup.init()
    losses = []
    for batch in batches:
        state, metrics = setup.train_step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single_device_losses():
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return _run(_config(), mesh, _batches(5))[0]


MESHES = {
    "dp8": MeshConfig(data=8, fsdp=1, tensor=1),
    "fsdp8": MeshConfig(data=1, fsdp=8, tensor=1),
    "tp2_dp4": MeshConfig(data=4, fsdp=1, tensor=2),
    "2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
}


@pytest.mark.multidevice
@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_losses_equal_single_device(name, single_device_losses):
    mesh = sharding.make_mesh(MESHES[name])
    losses, state = _run(_config(), mesh, _batches(5))
    np.testing.assert_allclose(losses, single_device_losses, atol=1e-5, rtol=0)
    specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
    fsdp = "fsdp" if mesh.shape["fsdp"] > 1 else None
    tensor = "tensor" if mesh.shape["tensor"] > 1 else None
    assert specs["h"]["attn"]["c_attn"].get_value() == P(None, fsdp, None, tensor, None)
    assert specs["h"]["attn"]["c_proj"].get_value() == P(None, tensor, None, fsdp)
    assert specs["h"]["mlp"]["c_fc"].get_value() == P(None, fsdp, tensor)
    assert specs["h"]["mlp"]["c_proj"].get_value() == P(None, tensor, fsdp)
    assert specs["wte"].get_value() == P(None, fsdp)  # 257 rows: not divisible, so not split
    # AdamW moments are sharded like their parameters.
    mu = state.opt_state[1][0].mu
    assert mu["h"]["mlp"]["c_fc"].get_value().sharding.spec == P(None, fsdp, tensor)


@pytest.mark.multidevice
def test_accumulation_equals_big_batch():
    """4 micro-batches of 2 give the loss and gradients (hence the update) of one batch of 8.

    Gradients are compared rather than post-Adam parameters: Adam divides by sqrt(v), so
    a parameter whose true gradient is zero (e.g. the key bias, to which softmax is
    invariant) turns float noise of 1e-9 into a full +-lr step in either run.
    """
    mesh = sharding.make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    batch = sharding.global_batch(_batches(1)[0], mesh)
    results = []
    for accum in (1, 4):
        config = _config(f"optim.accum_steps={accum}")
        setup = train_lib.build(config, mesh)
        params = setup.init().params
        grad_fn = jax.jit(train_lib.make_grad_fn(setup.graphdef, config))
        (loss, _), (grads, _) = grad_fn((params, ()), batch, jax.random.key(0))  # (params, head)
        results.append((loss, grads))
    (loss_big, grads_big), (loss_acc, grads_acc) = results
    assert abs(float(loss_big) - float(loss_acc)) <= 1e-6
    for a, b in zip(jax.tree.leaves(grads_big), jax.tree.leaves(grads_acc), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


@pytest.mark.multidevice
def test_accumulated_train_step_updates_like_big_batch():
    mesh = sharding.make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    batches = _batches(3)
    big, _ = _run(_config(), mesh, batches)
    accumulated, _ = _run(_config("optim.accum_steps=4"), mesh, batches)
    np.testing.assert_allclose(big, accumulated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_schedule_matches_formula(schedule):
    config = load_config(
        "nano",
        [
            "train.steps=101",
            "optim.warmup_steps=10",
            "optim.lr=1.0",
            "optim.min_lr=0.1",
            f"optim.schedule={schedule}",
        ],
    )
    lr = train_lib.lr_schedule(config.optim, config.train.steps)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    if schedule == "cosine":
        # Midpoint of the decay (steps 10..100): halfway between peak and floor.
        assert float(lr(55)) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
        assert float(lr(55)) == pytest.approx(0.55)
        assert float(lr(100)) == pytest.approx(0.1)
    elif schedule == "constant":
        assert float(lr(55)) == pytest.approx(1.0)
        assert float(lr(100)) == pytest.approx(1.0)
    else:  # decay over the last 20% of 101 steps: from step 81 to step 100
        assert float(lr(60)) == pytest.approx(1.0)
        assert float(lr(81)) == pytest.approx(1.0)
        assert float(lr(100)) == pytest.approx(0.1)


def test_weight_decay_mask_covers_exactly_the_matrices():
    from flax import nnx

    from gptjax.model import GPT

    config = load_config("nano", ["model.tie_embeddings=false"])
    params = nnx.state(nnx.eval_shape(lambda: GPT(config.model, key=jax.random.key(0))))
    mask = train_lib.weight_decay_mask(params)
    paths = jax.tree_util.tree_flatten_with_path(mask)[0]
    flat = {"/".join(str(getattr(k, "key", k)) for k in path[:-1]): v for path, v in paths}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == ["h/attn/c_attn", "h/attn/c_proj", "h/mlp/c_fc", "h/mlp/c_proj", "lm_head"]
    with_embeddings = train_lib.weight_decay_mask(params, decay_embeddings=True)
    assert sum(jax.tree.leaves(with_embeddings)) == len(decayed) + 2  # + wte, wpe


@pytest.mark.multidevice
@pytest.mark.parametrize(
    ("overrides", "mesh", "message"),
    [
        (["train.batch_size=6"], MeshConfig(data=8), "divisible by data x fsdp = 8"),
        (["model.n_head=2"], MeshConfig(data=2, tensor=4), "n_head (2) must be divisible by mesh.tensor (4)"),
    ],
)
def test_bad_mesh_inputs(overrides, mesh, message):
    with pytest.raises(GptjaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_lib.build(_config(*overrides), sharding.make_mesh(mesh))


@pytest.mark.multidevice
def test_mesh_product_must_match_device_count():
    with pytest.raises(GptjaxError, match="= 6 but there are 8 devices"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=2, tensor=1))
    with pytest.raises(GptjaxError, match="cannot be split"):
        sharding.make_mesh(MeshConfig(data=-1, fsdp=3))
