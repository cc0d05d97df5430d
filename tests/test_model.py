"""Contracts of the GPT model: sizes, causality, dropout, scan/remat equivalence, KV-cache decode.

Models are tiny, their weights are drawn with numpy (no compiled initialiser), and every
forward runs through one jitted function per graph and shape, shared across tests where
the shapes agree: compiling is what costs time here. The variants marked slow repeat a
contract with scan_layers off (or rope) and run in CI.
"""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import cpu_decode
from gptjax.config import MODEL_PRESETS, ModelConfig, param_counts
from gptjax.errors import GptjaxError
from gptjax.model import GPT, count_params, remat_policy

VOCAB = 67


def tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=2, n_embd=16)
    return ModelConfig(**{**fields, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model with random weights, without compiling the initialiser.

    XLA takes seconds to compile a random init; these tests need weights, not GPT-2's
    init (test_gpt2_initialisation_statistics checks that), so the abstract model is
    filled with numpy draws. Biases and LayerNorm parameters are random too, so their
    code paths matter. Configs that differ only in how the model runs (dropout,
    scan_layers, remat, dtype) get the same weights from the same seed.
    """
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(abstract_model(cfg))

    def fill(path, leaf):
        noise = rng.normal(0.0, 0.1, leaf.shape)
        is_scale = "['scale']" in jax.tree_util.keystr(path)
        return jnp.asarray(noise + (1.0 if is_scale else 0.0), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def random_tokens(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, dropout_key):
    return nnx.merge(graphdef, state)(tokens, dropout_key=dropout_key)


def forward(model: GPT, tokens: jax.Array, dropout_key: jax.Array | None = None) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, tokens, dropout_key))


@partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, cache, layers=None):
    return nnx.merge(graphdef, state).decode(tokens, cache, layers)


@partial(jax.jit, static_argnums=0)
def _grads(graphdef, state, tokens):
    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    return jax.grad(loss)(state)


def abstract_model(cfg: ModelConfig) -> GPT:
    return nnx.eval_shape(lambda: GPT(cfg, key=jax.random.key(0)))


# --------------------------------------------------------------------------------------
# Sizes and initialisation

COUNT_CONFIGS = {
    "learned-tied-bias": tiny(),
    "untied": tiny(tie_embeddings=False),
    "no-bias": tiny(bias=False),
    "rope": tiny(position="rope"),
    "rope-untied-nobias-mlp2": tiny(
        position="rope", tie_embeddings=False, bias=False, mlp_ratio=2, n_layer=3
    ),
    "gpt2": MODEL_PRESETS["gpt2"],
    "gpt2-medium": MODEL_PRESETS["gpt2-medium"],
    "gpt2-xl": MODEL_PRESETS["gpt2-xl"],
}


@pytest.mark.parametrize("name", COUNT_CONFIGS)
def test_param_counts_match_the_model(name):
    cfg = COUNT_CONFIGS[name]
    model = abstract_model(cfg)  # shapes only: gpt2-xl's 6 GB are never allocated
    counts = param_counts(cfg)
    assert count_params(model) == counts["total"]
    embedding = model.wte.size + (0 if model.wpe is None else model.wpe.size)
    assert embedding == counts["embedding"]
    assert counts["non_embedding"] == counts["total"] - embedding


def test_param_count_of_a_real_model():
    cfg = tiny(tie_embeddings=False, position="rope")
    assert count_params(build(cfg)) == param_counts(cfg)["total"]


@pytest.mark.parametrize("cfg", [tiny(), tiny(position="rope", bias=False, tie_embeddings=False)], ids=str)
def test_every_param_has_logical_axes(cfg):
    model = abstract_model(cfg)
    params = [(path, v) for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    assert len(params) >= 8
    for path, variable in params:
        axes = variable.get_metadata().get("axes")
        assert isinstance(axes, tuple), path
        assert len(axes) == variable.ndim, (path, axes, variable.shape)
        if path[0] == "h":
            assert axes[0] == "layers" and variable.shape[0] == cfg.n_layer, (path, axes)
        else:
            assert "layers" not in axes, (path, axes)


def test_gpt2_initialisation_statistics():
    cfg = ModelConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg, key=jax.random.key(0))
    assert count_params(model) == param_counts(cfg)["total"]
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    expected_std = {
        ("wte",): 0.02,
        ("wpe",): 0.02,
        ("h", "attn", "c_attn"): 0.02,
        ("h", "mlp", "c_fc"): 0.02,
        ("h", "attn", "c_proj"): proj_std,
        ("h", "mlp", "c_proj"): proj_std,
    }
    params = {path: np.asarray(v[...]) for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    for path, std in expected_std.items():
        w = params[path]
        # At >= 262k samples the sample std is within 0.3% of the true one.
        assert abs(w.std() / std - 1) < 0.02, (path, w.std(), std)
        assert abs(w.mean()) < 0.05 * std, (path, w.mean())
    for path, w in params.items():
        if path[-1].endswith("bias"):
            assert np.all(w == 0), path
        if path[-1] == "scale":
            assert np.all(w == 1), path
    # Bias and LayerNorm parameters were found at all (a renamed field would skip the checks).
    assert sum(p[-1].endswith("bias") for p in params) == 7
    assert sum(p[-1] == "scale" for p in params) == 3
    # Each layer is initialised from its own key, not a copy of layer 0.
    c_attn = params[("h", "attn", "c_attn")]
    assert not np.allclose(c_attn[0], c_attn[1])


# --------------------------------------------------------------------------------------
# The full forward pass


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_causality(position):
    model = build(tiny(position=position))
    tokens = random_tokens(1, (2, 16))
    logits = forward(model, tokens)
    assert logits.dtype == np.float32 and logits.shape == (2, 16, VOCAB)
    for t in (0, 6, 14):
        changed = tokens.at[:, t + 1 :].set(random_tokens(2, (2, 16 - t - 1)))
        assert not np.array_equal(changed, tokens)
        new_logits = forward(model, changed)
        np.testing.assert_array_equal(new_logits[:, : t + 1], logits[:, : t + 1])
        assert not np.allclose(new_logits[:, t + 1], logits[:, t + 1])  # the change is seen


def test_sequence_longer_than_block_size():
    model = build(tiny())
    with pytest.raises(GptjaxError, match=r"sequence length 25 exceeds the model's block_size \(24\)"):
        model(jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(GptjaxError, match="block_size"):
        model.init_cache(1, 25)


@pytest.mark.parametrize(("position", "scan_layers"), [("learned", True), ("rope", False)])
def test_attention_probabilities_are_the_softmax_of_the_models_own_scores(position, scan_layers):
    model = build(tiny(position=position, scan_layers=scan_layers))
    cfg, tokens = model.config, random_tokens(1, (2, 12))
    logits, probs = model(tokens, attention=True)
    assert probs.shape == (cfg.n_layer, 2, cfg.n_head, 12, 12) and probs.dtype == jnp.float32
    np.testing.assert_array_equal(logits, model(tokens))  # asking for the maps changes nothing else
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.triu(np.asarray(probs), k=1) == 0)  # causal
    # By hand, layer by layer: softmax(q k^T / sqrt(H)) under the causal mask.
    graphdef, stacked = nnx.split(model.h)
    positions = jnp.arange(12)[None]
    x = model.embed(tokens, positions)
    for layer in range(cfg.n_layer):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], stacked))
        q, k, _ = block.attn.qkv(block.ln_1(x), positions)  # (B, T, N, H)
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(cfg.head_dim)
        expected = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((12, 12), bool)), scores, -jnp.inf), -1)
        np.testing.assert_allclose(probs[layer], expected, rtol=1e-5, atol=1e-6)
        x = block(x, positions, None)[0]


def test_bfloat16_compute_gives_float32_logits():
    model = build(tiny(dtype="bfloat16"))
    tokens = random_tokens(1, (2, 16))
    assert nnx.eval_shape(lambda m: m.hidden(tokens), model).dtype == jnp.bfloat16
    logits = forward(model, tokens)
    assert logits.dtype == np.float32
    reference = forward(build(tiny()), tokens)  # same weights in fp32
    # bfloat16 keeps 8 bits of mantissa: the logits (range about +-1.5 here) move by ~1e-2.
    np.testing.assert_allclose(logits, reference, atol=0.05)
    assert not np.array_equal(logits, reference)  # bf16 really was used


@pytest.mark.parametrize("site", ["embd_dropout", "attn_dropout", "resid_dropout"])
def test_dropout(site):
    tokens = random_tokens(1, (2, 16))
    k1, k2 = jax.random.key(10), jax.random.key(11)
    plain = build(tiny())
    with_dropout = build(tiny(**{site: 0.3}))  # same key, so the same weights
    eval_logits = forward(plain, tokens)
    # Rates of 0: a dropout key changes nothing.
    np.testing.assert_array_equal(forward(plain, tokens, k1), eval_logits)
    # No key: eval mode, deterministic and equal to the dropout-free model.
    np.testing.assert_array_equal(forward(with_dropout, tokens), eval_logits)
    np.testing.assert_array_equal(forward(with_dropout, tokens), forward(with_dropout, tokens))
    # A key turns this one dropout site on: reproducible per key, different across keys.
    train_1 = forward(with_dropout, tokens, k1)
    np.testing.assert_array_equal(forward(with_dropout, tokens, k1), train_1)
    assert not np.allclose(train_1, eval_logits)
    assert not np.allclose(train_1, forward(with_dropout, tokens, k2))


# --------------------------------------------------------------------------------------
# scan_layers and remat change how the model runs, never what it computes


@pytest.mark.parametrize(
    ("position", "with_dropout"), [("learned", False), pytest.param("rope", True, marks=pytest.mark.slow)]
)
def test_scan_layers_on_and_off_agree(position, with_dropout):
    cfg = tiny(position=position, resid_dropout=0.1 if with_dropout else 0.0)
    # Parameters are stacked over layers either way: GPT builds the same state for both...
    _, abstract_scanned = nnx.split(abstract_model(cfg))
    graphdef_looped, abstract_looped = nnx.split(abstract_model(dataclasses.replace(cfg, scan_layers=False)))
    assert jax.tree.structure(abstract_scanned) == jax.tree.structure(abstract_looped)
    assert jax.tree.leaves(abstract_scanned) == jax.tree.leaves(abstract_looped)
    # ...so one model's state merges into the other graph and computes the same logits.
    graphdef_scanned, state = nnx.split(build(cfg))
    tokens = random_tokens(1, (2, 16))
    # With dropout, each layer must also draw the same mask in both graphs.
    for key in (None, jax.random.key(3)) if with_dropout else (None,):
        scanned = np.asarray(_forward(graphdef_scanned, state, tokens, key))
        looped = np.asarray(_forward(graphdef_looped, state, tokens, key))
        np.testing.assert_allclose(looped, scanned, rtol=1e-5, atol=1e-5)


def test_remat_auto_is_dots_on_cpu_and_explicit_choices_stand():
    assert jax.default_backend() == "cpu"
    assert remat_policy(tiny()) == "dots"  # the default, "auto"
    for choice in ("none", "full", "dots"):
        assert remat_policy(tiny(remat=choice)) == choice


REMAT_CASES = [
    ("auto", True),
    ("full", True),
    ("dots", True),
    pytest.param("full", False, marks=pytest.mark.slow),
    pytest.param("dots", False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("remat", "scan_layers"), REMAT_CASES)
def test_remat_gives_the_same_gradients(remat, scan_layers):
    cfg = tiny(scan_layers=scan_layers, remat="none")
    tokens = random_tokens(1, (2, 17))
    graphdef, state = nnx.split(build(cfg))
    graphdef_remat, _ = nnx.split(abstract_model(dataclasses.replace(cfg, remat=remat)))
    expected = _grads(graphdef, state, tokens)
    got = _grads(graphdef_remat, state, tokens)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        scale = float(np.abs(e).max())
        assert scale > 0
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------
# KV-cache decoding

DECODE_CASES = [
    ("learned", True),
    ("rope", True),
    pytest.param("learned", False, marks=pytest.mark.slow),
    pytest.param("rope", False, marks=pytest.mark.slow),
]
# Three rows of prompts up to 7 tokens, then 4 tokens decoded one at a time. Both tests
# use these shapes so that they share compiled functions.
PROMPT_LENGTHS = [5, 2, 7]
WIDTH, NEW = 7, 4


def decode_all(model: GPT, prompts: jax.Array, continuation: jax.Array, cache, layers=None) -> np.ndarray:
    """Prefill ``prompts`` then feed ``continuation`` one token at a time; all logits."""
    graphdef, state = nnx.split(model)
    logits, cache = _decode(graphdef, state, prompts, cache, layers)
    steps = [logits]
    for i in range(continuation.shape[1]):
        logits, cache = _decode(graphdef, state, continuation[:, i : i + 1], cache, layers)
        steps.append(logits)
    assert int(cache.index) == prompts.shape[1] + continuation.shape[1]
    assert isinstance(cache.k, tuple) == (layers is not None)
    return np.asarray(jnp.concatenate(steps, axis=1))


@pytest.mark.parametrize(("position", "scan_layers"), DECODE_CASES)
def test_cached_decode_matches_full_forward(position, scan_layers):
    model = build(tiny(position=position, scan_layers=scan_layers))
    tokens = random_tokens(1, (3, WIDTH + NEW))
    cache = model.init_cache(3, WIDTH + NEW + 2)  # spare slots stay unused
    decoded = decode_all(model, tokens[:, :WIDTH], tokens[:, WIDTH:], cache)
    np.testing.assert_allclose(decoded, forward(model, tokens), rtol=0, atol=1e-5)


def test_decode_over_layer_copies_matches_the_scan():
    """The CPU sampler's unrolled decode over per-layer weight copies computes the same."""
    model = build(tiny())
    layers = cpu_decode.layer_states(model)
    assert len(layers) == model.config.n_layer
    stacked = nnx.state(model.h)
    # Kernels are stored outputs-first: (D, 3, N, H) -> (3, N, H, D), (N, H, D) -> (D, N, H).
    qkv, proj = layers[1]["attn"]["c_attn"], layers[1]["attn"]["c_proj"]
    assert qkv.get_metadata()["rows_first"]
    assert qkv.get_metadata()["axes"] == ("embed", None, "heads", "head_dim")
    np.testing.assert_array_equal(qkv[...], np.moveaxis(stacked["attn"]["c_attn"][1], 0, -1))
    np.testing.assert_array_equal(proj[...], np.moveaxis(stacked["attn"]["c_proj"][1], -1, 0))
    np.testing.assert_array_equal(layers[1]["ln_1"]["scale"][...], stacked["ln_1"]["scale"][1])
    tokens = random_tokens(1, (3, WIDTH + NEW))
    cache = model.init_cache(3, WIDTH + NEW + 2, start=jnp.array([2, 0, 1]))
    scanned = decode_all(model, tokens[:, :WIDTH], tokens[:, WIDTH:], cache)
    cfg = model.config
    per_layer = cpu_decode.per_layer(cache)
    assert per_layer.k[0].shape == (3 * cfg.n_head, WIDTH + NEW + 2, cfg.head_dim)  # (B*N, S, H)
    unrolled = decode_all(model, tokens[:, :WIDTH], tokens[:, WIDTH:], per_layer, layers)
    np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=1e-6)
    with pytest.raises(GptjaxError, match="per-layer cache"):
        model.decode(tokens[:, :1], cache, layers)


@pytest.mark.parametrize(("position", "scan_layers"), DECODE_CASES)
def test_cached_decode_with_left_padding(position, scan_layers):
    model = build(tiny(position=position, scan_layers=scan_layers))
    pad = [WIDTH - n for n in PROMPT_LENGTHS]
    # Padding slots hold random tokens: a leak into real rows would show in their logits.
    padded = random_tokens(7, (3, WIDTH))
    continuation = random_tokens(8, (3, NEW))
    cache = model.init_cache(3, WIDTH + NEW + 2, start=jnp.array(pad))
    decoded = decode_all(model, padded, continuation, cache)
    # Reference: each row's unpadded sequence, right-padded into one batch (causality,
    # tested above, makes the right padding invisible to the positions compared).
    unpadded = np.array(random_tokens(9, (3, WIDTH + NEW)))
    for row, p in enumerate(pad):
        sequence = np.concatenate([padded[row, p:], continuation[row]])
        unpadded[row, : len(sequence)] = sequence
    expected = forward(model, jnp.asarray(unpadded))
    for row, (n, p) in enumerate(zip(PROMPT_LENGTHS, pad, strict=True)):
        np.testing.assert_allclose(
            decoded[row, p:], expected[row, : n + NEW], rtol=0, atol=1e-5, err_msg=f"row {row}"
        )
