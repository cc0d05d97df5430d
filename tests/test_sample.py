"""The sampler's contracts: cached decode == recomputing loop, filters, seeds, no recompiles."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import MODEL_PRESETS
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.sample import Generation, SamplingParams, generate, stream
from gptjax.tokenizer import ByteTokenizer

NANO = MODEL_PRESETS["nano"]
CONFIGS = {
    "nano": NANO,
    "rope-untied-unrolled": dataclasses.replace(
        NANO, position="rope", bias=False, tie_embeddings=False, scan_layers=False
    ),
    "deeper-exact-gelu": dataclasses.replace(
        NANO, n_layer=3, n_head=4, mlp_ratio=2, activation="gelu", block_size=48
    ),
}
PROMPTS = [[5, 17, 200, 3, 99, 42, 7], [64], [1, 2, 3, 250, 11]]  # ragged: 7, 1 and 5 tokens


@functools.cache
def make_model(name: str = "nano", seed: int = 0) -> GPT:
    """A random model with token embeddings scaled up, so logits are peaked (gaps >> 1e-6)."""
    model = GPT(CONFIGS[name], key=jax.random.key(seed))
    model.wte[...] = model.wte[...] * 8.0
    return model


@functools.cache
def _jitted_forward(model: GPT):
    graphdef, state = nnx.split(model)
    return functools.partial(jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)), state)


def full_forward(model: GPT, tokens: list[int]) -> np.ndarray:
    """Logits (T, V) of the full forward pass; right-padded to 32 (harmless: causal), one compile."""
    block = np.zeros((1, 32), np.int32)
    block[0, : len(tokens)] = tokens
    return np.asarray(_jitted_forward(model)(block)[0, : len(tokens)])


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Recompute the whole forward for every token."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(full_forward(model, tokens)[-1])))
    return tokens[len(prompt) :]


def last_probs(model: GPT, prompt: list[int]) -> np.ndarray:
    from scipy import special  # here, not at collection: scipy takes ~0.5 CPU-s to import

    return special.softmax(full_forward(model, prompt)[-1].astype(np.float64))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_recomputing_loop(name):
    model = make_model(name)
    out = generate(model, PROMPTS, max_new_tokens=12, params=SamplingParams(temperature=0))
    assert isinstance(out, Generation) and out.finish_reasons == ["length"] * 3
    for prompt, tokens in zip(PROMPTS, out.tokens, strict=True):
        assert tokens == naive_greedy(model, prompt, 12)
    # Log-probs are the unmodified model's: check the first token of each row.
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs, strict=True):
        np.testing.assert_allclose(logprobs[0], np.log(last_probs(model, prompt)[tokens[0]]), atol=1e-5)


def test_stacked_decode_path_samples_like_the_cpu_path(monkeypatch):
    """The stacked-cache scan (what TPU and GPU run) against the CPU's per-layer copies."""
    model = make_model("nano")
    params = SamplingParams(temperature=1.0, top_p=0.9)
    per_layer = generate(model, PROMPTS, max_new_tokens=12, params=params, seed=3)
    monkeypatch.setenv("GPTJAX_DECODE", "stacked")
    stacked = generate(model, PROMPTS, max_new_tokens=12, params=params, seed=3)
    assert stacked.tokens == per_layer.tokens
    np.testing.assert_allclose(stacked.logprobs, per_layer.logprobs, atol=1e-5)
    greedy = generate(model, PROMPTS, max_new_tokens=12, params=SamplingParams(temperature=0))
    assert greedy.tokens == [naive_greedy(model, prompt, 12) for prompt in PROMPTS]


@pytest.mark.parametrize("name", ["nano", "rope-untied-unrolled"])
def test_cached_decode_logits_equal_full_forward(name):
    model = make_model(name)
    rows = [[5, 17, 200, 3, 99, 42, 7, 8, 9, 10], [64, 65, 66, 67, 68, 69], [1, 2, 3, 250, 11, 12, 13, 14]]
    n_steps = 4  # prefill all but the last n_steps tokens of each row, then one token per step
    width = max(len(r) for r in rows) - n_steps
    start = [width - (len(r) - n_steps) for r in rows]  # left padding
    block = np.zeros((3, width), np.int32)
    for b, r in enumerate(rows):
        block[b, start[b] :] = r[:-n_steps]
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state).decode(tokens, cache))
    logits, cache = decode(state, block, model.init_cache(3, 16, start=np.asarray(start)))
    steps = [logits]
    for i in range(n_steps):
        tokens = np.asarray([[r[len(r) - n_steps + i]] for r in rows], np.int32)
        logits, cache = decode(state, tokens, cache)
        steps.append(logits)
    cached = np.concatenate(steps, 1)  # (B, slots used, V)
    for b, r in enumerate(rows):
        np.testing.assert_allclose(cached[b, start[b] :], full_forward(model, r), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(temperature=1e-9)]
)
def test_limits_reproduce_greedy(params):
    model = make_model()
    greedy = generate(model, PROMPTS, max_new_tokens=12, params=SamplingParams(temperature=0))
    assert generate(model, PROMPTS, max_new_tokens=12, params=params, seed=3).tokens == greedy.tokens


def first_samples(params: SamplingParams, draws: int, prompt=(5, 17, 200)) -> np.ndarray:
    """The first sampled token of ``draws`` rows with one prompt (each row has its own key)."""
    out = generate(make_model(), [list(prompt)] * draws, max_new_tokens=1, params=params, seed=11)
    return np.asarray([t[0] for t in out.tokens])


def test_temperature_one_matches_softmax_chi_square():
    from scipy import stats

    draws = 6000
    probs = last_probs(make_model(), [5, 17, 200])
    counts = np.bincount(first_samples(SamplingParams(temperature=1.0), draws), minlength=probs.size)
    expected = probs * draws
    big = expected >= 5  # chi-square needs expected counts >= 5: pool the rest into one bin
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    assert big.sum() >= 10, "the test distribution should have many well-populated tokens"
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # The test has power: the same draws reject a uniform distribution.
    assert stats.chisquare(counts, np.full(probs.size, draws / probs.size)).pvalue < 1e-6


def test_filters_stay_in_their_sets():
    probs = last_probs(make_model(), [5, 17, 200])
    order = np.argsort(-probs)
    top5 = set(order[:5])
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < 0.5])
    above_min_p = set(np.flatnonzero(probs >= 0.05 * probs.max()))
    assert len(nucleus) > 1 and len(above_min_p) > 1
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=5), top5),
        (SamplingParams(temperature=1.0, top_p=0.5), nucleus),
        (SamplingParams(temperature=1.0, min_p=0.05), above_min_p),
        (SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05), top5 & above_min_p),
    ]:
        seen = set(first_samples(params, 1000).tolist())
        assert seen <= allowed, params
        assert len(seen) > 1, params  # sampling happened, not argmax


def test_seeds_and_batch_independence():
    model, params = make_model(), SamplingParams(temperature=1.0, top_p=0.95)
    a = generate(model, PROMPTS, max_new_tokens=12, params=params, seed=7)
    assert generate(model, PROMPTS, max_new_tokens=12, params=params, seed=7).tokens == a.tokens
    assert generate(model, PROMPTS, max_new_tokens=12, params=params, seed=8).tokens != a.tokens
    more = generate(model, [*PROMPTS, [9, 9, 9], [1, 2]], max_new_tokens=12, params=params, seed=7)
    assert more.tokens[:3] == a.tokens
    alone = generate(model, PROMPTS[:1], max_new_tokens=12, params=params, seed=7)
    assert alone.tokens == a.tokens[:1]


@pytest.fixture
def compilations():
    events = []
    listener = lambda event, *_, **__: events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    yield lambda: sum(e == "/jax/core/compile/backend_compile_duration" for e in events)
    jax.monitoring.unregister_event_duration_listener(listener)


def test_second_call_compiles_nothing(compilations):
    model = make_model()
    generate(model, PROMPTS, max_new_tokens=12, params=SamplingParams(temperature=0.7, top_k=3), seed=1)
    first = compilations()
    other_prompts = [[1, 2, 3], [4] * 8, [250]]  # same batch size and length bucket
    generate(model, other_prompts, max_new_tokens=12, params=SamplingParams(temperature=1.3, top_k=3), seed=2)
    assert compilations() == first
    chunks = list(stream(model, PROMPTS, max_new_tokens=20, chunk_size=4))  # five chunks
    after_stream = compilations()
    assert len(chunks) == 5 and after_stream - first <= 2  # one prefill and one chunk program
    list(stream(model, other_prompts, max_new_tokens=20, chunk_size=4, seed=5))
    assert compilations() == after_stream


def test_stream_equals_generate_and_text_deltas_add_up():
    model, tok = make_model(), ByteTokenizer()
    params = SamplingParams(temperature=1.0, top_k=40)
    prompts = ["def ", "", "import numpy"]
    whole = generate(model, prompts, max_new_tokens=13, params=params, seed=4, tokenizer=tok)
    chunks = list(
        stream(model, prompts, max_new_tokens=13, params=params, seed=4, tokenizer=tok, chunk_size=5)
    )
    assert [sum((c.tokens[r] for c in chunks), []) for r in range(3)] == whole.tokens
    assert ["".join(c.texts[r] for c in chunks) for r in range(3)] == whole.texts
    assert whole.prompt_tokens[1] == [tok.eot_id] and chunks[-1].finish_reasons == whole.finish_reasons
    np.testing.assert_allclose(
        [sum((c.logprobs[r] for c in chunks), []) for r in range(3)], whole.logprobs, atol=1e-6
    )


def test_stop_tokens_end_rows():
    model = make_model()
    greedy = SamplingParams(temperature=0)
    free = generate(model, PROMPTS, max_new_tokens=12, params=greedy)
    stop = free.tokens[0][4]
    cut = [row.index(stop) if stop in row else len(row) for row in free.tokens]
    out = generate(model, PROMPTS, max_new_tokens=12, params=greedy, stop_tokens=[stop])
    assert out.tokens == [row[:c] for row, c in zip(free.tokens, cut, strict=True)]
    assert out.finish_reasons == ["stop" if c < 12 else "length" for c in cut]
    assert [len(lp) for lp in out.logprobs] == cut
    # End-of-text stops rows too; all rows stopping ends generation early.
    assert generate(model, PROMPTS, max_new_tokens=12, params=greedy, eot_id=stop).tokens == out.tokens


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_params_give_the_same_samples():
    model = make_model()
    graphdef, state = nnx.split(model)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("x",))

    def spec(leaf):  # shard the last axis where it divides, as a tensor-parallel layout would
        return P(*[None] * (leaf.ndim - 1), "x") if leaf.shape[-1] % 8 == 0 else P()

    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    sharded = jax.device_put(state, jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), state))
    assert any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(sharded))
    for params in [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9)]:
        want = generate(model, PROMPTS, max_new_tokens=12, params=params, seed=2)
        for placed in (replicated, sharded):
            got = generate(nnx.merge(graphdef, placed), PROMPTS, max_new_tokens=12, params=params, seed=2)
            assert got.tokens == want.tokens
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(params=dict(temperature=-0.1)), "temperature"),
        (dict(params=dict(top_k=-1)), "top_k"),
        (dict(params=dict(top_k=258)), r"top_k \(258\) exceeds the vocabulary \(257\)"),
        (dict(params=dict(top_p=0.0)), "top_p"),
        (dict(params=dict(top_p=1.5)), "top_p"),
        (dict(params=dict(min_p=1.0)), "min_p"),
        (dict(prompts=[[]]), "empty prompt"),
        (dict(prompts=[[1, 257]]), r"token 257 is outside the model's vocabulary \[0, 257\)"),
        (dict(prompts=[[-1]]), "outside the model's vocabulary"),
        (dict(prompts=[[1] * 60]), r"length \(60\) \+ max_new_tokens \(8\) exceeds .* block_size \(64\)"),
        (dict(prompts=[[1] * 70]), "exceeds the model's block_size"),
        (dict(prompts=["text"]), "need a tokenizer"),
        (dict(prompts=[]), "non-empty list"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_tokens=[300]), "stop tokens"),
        (dict(eot_id=257), "eot_id"),
    ],
)
def test_bad_input_is_one_line_error(kwargs, match):
    args = dict(prompts=[[1, 2]], max_new_tokens=8)
    args.update(kwargs)
    with pytest.raises(GptjaxError, match=match) as info:
        params = SamplingParams(**args.pop("params", {}))
        generate(make_model(), args.pop("prompts"), params=params, **args)
    assert "\n" not in str(info.value)


def test_sampling_params_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 2.0  # type: ignore[misc]
