"""Batched sampling from a GPT: one prefill pass, then ``lax.scan`` decode chunks over a KV cache.

Prompts are left-padded into one block whose length is bucketed (a power of two, at least
8), so a call compiles one prefill and one decode-chunk program per (batch size, bucket,
cache length, sampling flags) and later calls with the same shapes compile nothing. Every
prompt but its last token is written into the cache in one forward pass; each decode step
then feeds one token per row, samples the next and carries the cache. Rows stop at
end-of-text or a stop token; generation ends early once every row has stopped.

Randomness is per row: row r draws step t's sample with ``fold_in(fold_in(key(seed), r), t)``,
so a row's output does not depend on the other rows in the batch.

Log-probabilities are those of the *unmodified* model distribution (temperature 1, no
top-k/top-p/min-p filtering): they score the text itself, so they are comparable across
sampling settings and sum to the sequence's log-likelihood under the model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import cpu_decode
from gptjax.config import SamplingParams  # noqa: F401  (defined with the other configs)
from gptjax.errors import GptjaxError
from gptjax.model import GPT

_GENERATE_CHUNK = 64  # the most decode steps per compiled call in generate()
_MIN_BUCKET = 8  # the shortest prompt block, so that short prompts share one program
_DEFAULT_PARAMS = SamplingParams()


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns; lists are per prompt (row).

    Attributes:
        tokens: The generated tokens, without the stop token that ended a row.
        logprobs: Each generated token's log-probability under the unmodified model.
        texts: The decoded tokens, when a tokenizer was given.
        prompt_tokens: The prompts as token ids (an empty prompt is ``[eot_id]``).
        finish_reasons: ``stop`` (end-of-text or a stop token) or ``length`` (max_new_tokens).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str] | None
    prompt_tokens: list[list[int]]
    finish_reasons: list[str]


@dataclass(frozen=True)
class StreamChunk:
    """What :func:`stream` yields: the new part of every row; empty lists for stopped rows.

    Attributes:
        tokens: New tokens per row (without a stop token).
        logprobs: Their log-probabilities under the unmodified model.
        texts: New text per row when a tokenizer was given; an unfinished UTF-8
            character is held back until the token that completes it arrives.
        finish_reasons: ``stop``, ``length``, or None for a row still running.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str] | None
    finish_reasons: list[str | None]


def _sample(logits, keys, knobs, *, greedy: bool, top_k: int, nucleus: bool) -> jax.Array:
    """Next tokens (B,) from logits (B, V) with per-row keys (B,); knobs = (temperature, top_p, min_p)."""
    if greedy:
        return jnp.argmax(logits, -1)
    temperature, top_p, min_p = knobs[0], knobs[1], knobs[2]
    # Subtracting the max first keeps a tiny temperature finite: the top token scores 0, others -inf.
    scores = (logits - logits.max(-1, keepdims=True)) / temperature  # (B, V)
    ids = None
    if top_k or nucleus:
        scores, ids = jax.lax.top_k(scores, top_k or scores.shape[-1])  # (B, K), descending
        if nucleus:
            probs = jax.nn.softmax(scores, -1)
            mass_before = jnp.cumsum(probs, -1) - probs  # 0 for the top token, so it always stays
            scores = jnp.where(mass_before < top_p, scores, -jnp.inf)
    # p / p_max >= min_p  <=>  score >= log(min_p), as the top score is 0; log(0) keeps all.
    scores = jnp.where(scores >= jnp.log(min_p), scores, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, scores)  # (B,)
    return choice if ids is None else jnp.take_along_axis(ids, choice[:, None], -1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "per_layer"))
def _prefill(graphdef, state, prompts, start, seed, *, cache_len: int, per_layer: bool):
    """Write prompts (B, P) into a fresh cache of cache_len slots; derive the row keys (B,)."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompts.shape[0], cache_len, start)
    if prompts.shape[1]:
        _, cache = model.decode(prompts, cache)  # the unused logits are dead code under jit
    if per_layer:
        cache = cpu_decode.per_layer(cache)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(prompts.shape[0]))
    return cache, row_keys


@functools.partial(jax.jit, static_argnames="graphdef")
def _layer_states(graphdef, state):
    return cpu_decode.layer_states(nnx.merge(graphdef, state))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "n_steps", "greedy", "top_k", "nucleus"), donate_argnames="carry"
)
def _decode_chunk(graphdef, state, layers, carry, row_keys, knobs, *, n_steps, greedy, top_k, nucleus):
    """Advance n_steps tokens; returns the carry (cache, tokens (B,), step) and (B, n_steps) outputs."""
    model = nnx.merge(graphdef, state)

    def step(carry, _):
        cache, tokens, t = carry
        logits, cache = model.decode(tokens[:, None], cache, layers)
        logits = logits[:, 0]  # (B, V) float32
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
        tokens = _sample(logits, keys, knobs, greedy=greedy, top_k=top_k, nucleus=nucleus)
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], -1)[:, 0]
        return (cache, tokens, t + 1), (tokens, logprobs)

    carry, (tokens, logprobs) = jax.lax.scan(step, carry, length=n_steps)
    return carry, tokens.T, logprobs.T


def _prompt_tokens(prompts, tokenizer, eot_id: int | None, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, str) or len(prompts) == 0:
        raise GptjaxError("prompts must be a non-empty list of strings or of token-id lists")
    rows = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise GptjaxError("text prompts need a tokenizer: pass tokenizer= or give token ids")
            prompt = tokenizer.encode(prompt)
        row = [int(t) for t in prompt]
        if not row:
            if eot_id is None:
                raise GptjaxError("an empty prompt starts from end-of-text: pass eot_id= or a tokenizer")
            row = [eot_id]
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise GptjaxError(f"token {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
        rows.append(row)
    return rows


def _start(model: GPT, prompts, max_new_tokens, params, seed, tokenizer, stop_tokens, eot_id, chunk_size):
    """Validate, prefill, and return the prompt tokens and an iterator of decoded chunks."""
    cfg = model.config
    vocab, block_size = cfg.vocab_size, cfg.block_size
    eot_id = tokenizer.eot_id if eot_id is None and tokenizer is not None else eot_id
    rows = _prompt_tokens(prompts, tokenizer, eot_id, vocab)
    if max_new_tokens < 1:
        raise GptjaxError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    if chunk_size < 1:
        raise GptjaxError(f"chunk_size ({chunk_size}) must be >= 1")
    if params.top_k > vocab:
        raise GptjaxError(f"top_k ({params.top_k}) exceeds the vocabulary ({vocab}); use 0 to disable it")
    longest = max(map(len, rows))
    if longest + max_new_tokens > block_size:
        raise GptjaxError(
            f"prompt length ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"block_size ({block_size}): shorten the prompt or ask for fewer tokens"
        )
    stops = [int(t) for t in (*stop_tokens, *([] if eot_id is None else [eot_id]))]
    if any(not 0 <= t < vocab for t in stops):
        raise GptjaxError(f"stop tokens and eot_id {stops} must lie in the vocabulary [0, {vocab})")
    is_stop = np.zeros(vocab, bool)
    is_stop[stops] = True

    batch = len(rows)
    bucket = min(max(_MIN_BUCKET, 1 << (longest - 1).bit_length()), block_size - max_new_tokens)
    block = np.full((batch, bucket), rows[0][0], np.int32)  # (B, P); the padding is never attended to
    for r, row in enumerate(rows):
        block[r, bucket - len(row) :] = row
    n_chunks = math.ceil(max_new_tokens / chunk_size)
    # Steps of the last chunk past max_new_tokens are computed and discarded; slots past the
    # cache's end are clamped by dynamic_update_slice and only those discarded steps see them.
    cache_len = min(bucket - 1 + n_chunks * chunk_size, block_size)

    graphdef, state = nnx.split(model)
    start = np.asarray([bucket - len(row) for row in rows], np.int32)
    seed_u32 = np.uint32(seed % 2**32)
    per_layer = cpu_decode.enabled()  # per-layer copies on CPU: see gptjax.cpu_decode
    cache, row_keys = _prefill(
        graphdef, state, block[:, :-1], start, seed_u32, cache_len=cache_len, per_layer=per_layer
    )
    layers = _layer_states(graphdef, state) if per_layer else None
    knobs = np.asarray([max(params.temperature, 1e-30), params.top_p, params.min_p], np.float32)
    flags = dict(greedy=params.temperature == 0, top_k=params.top_k, nucleus=params.top_p < 1)

    def chunks() -> Iterator[tuple[list[list[int]], list[list[float]], list[str | None]]]:
        carry = (cache, block[:, -1], np.int32(0))
        reasons: list[str | None] = [None] * batch
        done = 0
        while done < max_new_tokens and None in reasons:
            carry, tokens, logprobs = _decode_chunk(
                graphdef, state, layers, carry, row_keys, knobs, n_steps=chunk_size, **flags
            )
            n = min(chunk_size, max_new_tokens - done)
            tokens, logprobs = np.asarray(tokens)[:, :n], np.asarray(logprobs)[:, :n]
            done += n
            new_tokens, new_logprobs = [[] for _ in rows], [[] for _ in rows]
            for r in range(batch):
                if reasons[r] is not None:
                    continue
                hits = np.flatnonzero(is_stop[tokens[r]])
                cut = int(hits[0]) if hits.size else n
                new_tokens[r], new_logprobs[r] = tokens[r, :cut].tolist(), logprobs[r, :cut].tolist()
                reasons[r] = "stop" if hits.size else "length" if done == max_new_tokens else None
            yield new_tokens, new_logprobs, list(reasons)

    return rows, chunks()


def generate(
    model: GPT,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams = _DEFAULT_PARAMS,
    seed: int = 0,
    tokenizer=None,
    stop_tokens: Sequence[int] = (),
    eot_id: int | None = None,
) -> Generation:
    """Continue every prompt by up to max_new_tokens tokens.

    Args:
        model: A :class:`gptjax.model.GPT`; its parameters may be sharded over a mesh.
        prompts: Strings (encoded with ``tokenizer``) or lists of token ids, of any lengths.
        max_new_tokens: The most tokens generated per row; prompt + this <= block_size.
        params: Temperature, top-k, top-p and min-p.
        seed: Row r's samples depend only on (seed, r, its prompt).
        tokenizer: Encodes text prompts, decodes the outputs, supplies end-of-text.
        stop_tokens: Tokens that end a row besides end-of-text (not included in the output).
        eot_id: End-of-text: starts empty prompts and stops rows (default: the tokenizer's).

    Returns:
        A :class:`Generation`.
    """
    n = max(max_new_tokens, 1)
    chunk = math.ceil(n / math.ceil(n / _GENERATE_CHUNK))  # e.g. 256 -> 4 x 64, 100 -> 2 x 50
    rows, chunks = _start(model, prompts, max_new_tokens, params, seed, tokenizer, stop_tokens, eot_id, chunk)
    tokens: list[list[int]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    reasons: list = []
    for new_tokens, new_logprobs, finish in chunks:
        for r in range(len(rows)):
            tokens[r] += new_tokens[r]
            logprobs[r] += new_logprobs[r]
        reasons = finish
    texts = None if tokenizer is None else [tokenizer.decode(row) for row in tokens]
    return Generation(tokens, logprobs, texts, rows, reasons)


def stream(
    model: GPT,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams = _DEFAULT_PARAMS,
    seed: int = 0,
    tokenizer=None,
    stop_tokens: Sequence[int] = (),
    eot_id: int | None = None,
    chunk_size: int = 16,
) -> Iterator[StreamChunk]:
    """Like :func:`generate`, but yields each chunk_size-step chunk as soon as it is decoded.

    Every chunk runs the same compiled program with the cache carried across, and the
    samples equal :func:`generate`'s for the same arguments. Bad input raises here, at the
    call, not at the first ``next``.
    """
    rows, chunks = _start(
        model, prompts, max_new_tokens, params, seed, tokenizer, stop_tokens, eot_id, chunk_size
    )

    def with_text() -> Iterator[StreamChunk]:
        so_far: list[list[int]] = [[] for _ in rows]
        shown = [""] * len(rows)
        for new_tokens, new_logprobs, reasons in chunks:
            texts = None
            if tokenizer is not None:
                texts = []
                for r, new in enumerate(new_tokens):
                    so_far[r] += new
                    text = tokenizer.decode(so_far[r])
                    text = text if reasons[r] else text.rstrip("\ufffd")  # hold a partial character
                    texts.append(text[len(shown[r]) :])
                    shown[r] = max(shown[r], text, key=len)
            yield StreamChunk(new_tokens, new_logprobs, texts, reasons)

    return with_text()
