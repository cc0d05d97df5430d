"""Splash attention (the Pallas TPU kernel) against the XLA path, run in Pallas interpret mode on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptjax.config import MODEL_PRESETS, load_config
from gptjax.model import GPT
from gptjax.train import build

pytestmark = pytest.mark.multidevice  # CPU meshes of up to 8 devices

# One 128-token tile (the kernel's block), two heads, one layer: interpret mode is slow.
TINY = dataclasses.replace(MODEL_PRESETS["nano"], block_size=128, n_layer=1, n_head=2, n_embd=32)


def loss_and_grads(attention: str):
    model = GPT(dataclasses.replace(TINY, attention=attention), key=jax.random.key(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 129), 0, TINY.vocab_size)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
def test_splash_forward_and_gradients_match_xla():
    splash_loss, splash_grads = loss_and_grads("splash")
    xla_loss, xla_grads = loss_and_grads("xla")
    np.testing.assert_allclose(splash_loss, xla_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(xla_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_splash_runs_per_shard_of_batch_and_heads():
    """On a data x tensor mesh the kernel runs under shard_map: the train step's loss is XLA's."""

    def first_loss(attention: str) -> float:
        config = load_config("nano", ["mesh.data=2", "mesh.tensor=2", "train.batch_size=2"])
        config = dataclasses.replace(config, model=dataclasses.replace(TINY, attention=attention))
        devices = np.asarray(jax.devices()[:4]).reshape(2, 1, 2)
        setup = build(config, jax.sharding.Mesh(devices, ("data", "fsdp", "tensor")))
        tokens = jax.random.randint(jax.random.key(1), (2, 129), 0, TINY.vocab_size)
        return float(setup.train_step(setup.init(), jnp.asarray(tokens))[1]["loss"])

    np.testing.assert_allclose(first_loss("splash"), first_loss("xla"), rtol=1e-5)
