"""Training: the train state, the jitted train and eval steps, and the loop.

The train step is a pure function ``(state, batch) -> (state, metrics)``, jitted once with
explicit shardings over the mesh from :mod:`gptjax.sharding` and with the state donated.
Batches are a pure function of (seed, step) (:mod:`gptjax.data`), dropout keys are
``fold_in(train_key, step)``, and the checkpoint holds params, optimizer state, step and
the base key, so a resumed run is bitwise the run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import data as data_lib
from gptjax import sharding
from gptjax.checkpoint import Checkpointer
from gptjax.config import Config, OptimConfig, flops_per_token
from gptjax.errors import GptjaxError
from gptjax.host import keep_freed_memory
from gptjax.metrics import MetricsLogger, StepTimer, peak_flops, peak_memory
from gptjax.model import GPT
from gptjax.preemption import StopRequest
from gptjax.runs import check_compatible, load_params, prepare_run_dir, read_config

# Parameters that weight decay applies to: the weight matrices. Embeddings join them when
# ``optim.decay_embeddings`` is set; biases and LayerNorm parameters never do.
_MATRICES = ("c_attn", "c_proj", "c_fc", "lm_head")
_EMBEDDINGS = ("wte", "wpe")


class TrainState(NamedTuple):
    step: jax.Array  # () int32: updates applied so far
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # (2,) uint32: key data of the base dropout key


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the run, its last metrics and its final state."""

    run_dir: Path
    step: int
    metrics: dict[str, float]
    samples: list[str]
    state: TrainState
    interrupted: bool = False


# --------------------------------------------------------------------------------------
# Optimisation


def lr_schedule(optim: OptimConfig, total_steps: int):
    """The learning rate at each step (0-based), as a jittable function.

    Linear warmup from 0 at step 0 to ``lr`` at step ``warmup_steps``; then ``cosine``
    decays to ``min_lr`` at the last step (``total_steps - 1``), ``constant`` stays at
    ``lr``, and ``wsd`` holds ``lr`` until the last ``decay_fraction`` of the steps and
    decays linearly to ``min_lr`` at the last step.
    """
    lr, floor, warmup = optim.lr, optim.min_lr, optim.warmup_steps
    last = max(total_steps - 1, 1)
    decay_start = max(warmup, round(total_steps * (1 - optim.decay_fraction)))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup, 1)
        if optim.schedule == "cosine":
            progress = jnp.clip((step - warmup) / max(last - warmup, 1), 0.0, 1.0)
            after = floor + 0.5 * (1 + jnp.cos(jnp.pi * progress)) * (lr - floor)
        elif optim.schedule == "constant":
            after = jnp.asarray(lr, jnp.float32)
        else:  # wsd
            progress = jnp.clip((step - decay_start) / max(last - decay_start, 1), 0.0, 1.0)
            after = lr + progress * (floor - lr)
        return jnp.where(step < warmup, warm, after)

    return schedule


def weight_decay_mask(params: nnx.State, decay_embeddings: bool = False):
    """True for the parameters weight decay applies to (see ``_MATRICES``)."""
    names = _MATRICES + (_EMBEDDINGS if decay_embeddings else ())

    def decide(path, _):
        return _key(path[-2] if _key(path[-1]) == "value" else path[-1]) in names

    return jax.tree_util.tree_map_with_path(decide, params)


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def make_optimizer(optim: OptimConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(optim, total_steps),
        b1=optim.beta1,
        b2=optim.beta2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=weight_decay_mask(params, optim.decay_embeddings),
    )
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw


# --------------------------------------------------------------------------------------
# Steps


def make_loss_fn(graphdef: nnx.GraphDef):
    def loss_fn(params, tokens, dropout_key=None):  # tokens (B, T+1)
        logits = nnx.merge(graphdef, params)(tokens[:, :-1], dropout_key=dropout_key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss_fn


def make_grad_fn(graphdef: nnx.GraphDef, config: Config):
    """``(params, batch (B, T+1), key) -> (mean loss, mean gradients)`` over the whole batch.

    With ``optim.accum_steps = k`` the batch runs as k micro-batches in a ``lax.scan``
    whose summed gradients, divided by k, are the big batch's (equal-size micro-batches).
    """
    loss_and_grad = jax.value_and_grad(make_loss_fn(graphdef))
    m = config.model
    uses_dropout = max(m.embd_dropout, m.attn_dropout, m.resid_dropout) > 0
    k = config.optim.accum_steps

    def grad_fn(params, batch, key):
        if k == 1:
            return loss_and_grad(params, batch, key if uses_dropout else None)
        # Row j*k + i goes to micro-batch i, so each micro-batch stays spread over every
        # data-parallel device.
        micro = batch.reshape(batch.shape[0] // k, k, -1).swapaxes(0, 1)  # (k, B/k, T+1)

        def accumulate(carry, xs):
            tokens, i = xs
            result = loss_and_grad(params, tokens, jax.random.fold_in(key, i) if uses_dropout else None)
            return jax.tree.map(jnp.add, carry, result), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        total = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(k)))[0]
        return jax.tree.map(lambda x: x / k, total)

    return grad_fn


def make_train_step(graphdef: nnx.GraphDef, optimizer, config: Config):
    """``(state, batch (B, T+1)) -> (state, metrics)``.

    A non-finite loss or gradient skips the update: parameters and optimizer state stay
    as they were, the step still advances (it indexes the data and the schedule), and
    ``metrics["skipped"]`` is 1.
    """
    grad_fn = make_grad_fn(graphdef, config)
    schedule = lr_schedule(config.optim, config.train.steps)

    def train_step(state: TrainState, batch: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, grads = grad_fn(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "skipped": 1 - finite}
        new_state = TrainState(
            state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), state.rng
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    """``(params, tokens (B, T+1), weights (B, T)) -> (sum of weighted NLL, sum of weights)``."""

    def eval_step(params, tokens, weights):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return (nll * weights).sum(), weights.sum()

    return eval_step


# --------------------------------------------------------------------------------------
# Setup


class Setup(NamedTuple):
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs carrying the target shardings
    init: Any  # jitted: () -> TrainState
    train_step: Any  # jitted
    eval_step: Any  # jitted


def build(config: Config, mesh: jax.sharding.Mesh | None = None) -> Setup:
    """Mesh, shardings, the jitted init/train/eval functions; no arrays are allocated."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    dp = sharding.data_parallel_size(mesh)
    micro = config.train.batch_size // config.optim.accum_steps
    if micro % dp:
        raise GptjaxError(
            f"batch size per micro-batch ({micro} = train.batch_size {config.train.batch_size} / "
            f"optim.accum_steps {config.optim.accum_steps}) must be divisible by data x fsdp = {dp}"
        )
    if config.model.n_head % mesh.shape["tensor"]:
        raise GptjaxError(
            f"model.n_head ({config.model.n_head}) must be divisible by mesh.tensor ({mesh.shape['tensor']})"
        )
    root = jax.random.key(config.train.seed)
    init_key, _, train_key = jax.random.split(root, 3)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: GPT(config.model, key=init_key)))
    optimizer = make_optimizer(config.optim, config.train.steps, abstract_params)
    param_sh = sharding.param_shardings(abstract_params, mesh)
    replicated = sharding.replicated(mesh)

    def opt_sharding(x):
        if isinstance(x, nnx.Variable):
            return x.replace(
                sharding.NamedSharding(mesh, sharding.spec_for(x.get_metadata()["axes"], x.shape, mesh))
            )
        return replicated

    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = jax.tree.map(opt_sharding, abstract_opt, is_leaf=lambda x: isinstance(x, nnx.Variable))
    state_sh = TrainState(replicated, param_sh, opt_sh, replicated)

    def init():
        params = nnx.split(GPT(config.model, key=init_key))[1]
        return TrainState(
            jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.random.key_data(train_key)
        )

    abstract_state = jax.eval_shape(init)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh
    )
    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphdef, optimizer, config),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(graphdef), in_shardings=(param_sh, batch_sh, batch_sh), out_shardings=replicated
    )
    return Setup(mesh, graphdef, abstract_state, jax.jit(init, out_shardings=state_sh), train_step, eval_step)


def evaluate(setup: Setup, params, val_tokens: np.ndarray, config: Config, bytes_per_token: float | None):
    """A full pass (or ``eval_max_batches`` batches) over the validation tokens."""
    total, count = 0.0, 0.0
    for tokens, weights in data_lib.eval_batches(
        val_tokens,
        seq_len=config.model.block_size,
        batch_size=config.train.batch_size // config.optim.accum_steps,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_batches=config.train.eval_max_batches,
    ):
        nll, n = setup.eval_step(
            params, sharding.global_batch(tokens, setup.mesh), sharding.global_batch(weights, setup.mesh)
        )
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 80.0))}
    if bytes_per_token:
        out["val_bits_per_byte"] = total / (math.log(2) * count * bytes_per_token)
    return out


def _evaluate_sources(setup: Setup, params, dataset, config: Config, bytes_per_token: float | None):
    """``evaluate`` on the validation tokens, and for a mixture on each source's (``val_loss_NAME``)."""
    out = evaluate(setup, params, dataset.val, config, bytes_per_token)
    for name, (_, part) in dataset.parts.items():
        out[f"val_loss_{name}"] = evaluate(setup, params, part.val, config, None)["val_loss"]
    return out


def _init_from(config: Config, setup: Setup, state: TrainState) -> TrainState:

    source, _ = read_config(config.train.init_from)
    check_compatible({"config": source.to_dict()}, config, 0, Path(config.train.init_from))
    params, _ = load_params(config.train.init_from, setup.abstract_state.params)
    # AdamW's initial state (zero moments, count 0) does not depend on the values.
    return state._replace(params=params)


# --------------------------------------------------------------------------------------
# The loop


def train(
    config: Config,
    *,
    mesh: jax.sharding.Mesh | None = None,
    stop_at: int | None = None,
    batch_hook: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> TrainResult:
    """Train (or resume) the run described by ``config``.

    Args:
        config: The run. Its run directory is resumed if it holds a checkpoint.
        mesh: Devices to train on (default: every device, shaped by ``config.mesh``).
        batch_hook: ``(step, local_batch) -> local_batch`` applied before each step (for
            fault-injection tests and data surgery).
        stop_at: Stop after this step as if preempted (save, return): for jobs that run a
            long schedule a slice at a time.
    """
    keep_freed_memory()
    sharding.initialize_distributed()
    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(config)
    dataset = data_lib.load_dataset(
        config.data, seq_len=config.model.block_size, vocab_size=config.model.vocab_size
    )
    setup = build(config, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    logger = MetricsLogger(run_dir, enabled=is_main, total_steps=config.train.steps)
    try:
        return _run(config, run_dir, dataset, setup, ckpt, logger, stop_at, batch_hook)
    finally:
        ckpt.close()
        logger.close()


def _restore_or_init(config: Config, setup: Setup, ckpt: Checkpointer, logger: MetricsLogger) -> TrainState:
    """The newest readable checkpoint's state; a fresh (or ``init_from``) state if none.

    An unreadable checkpoint (a truncated or missing array file) is reported by step and
    the previous one is tried; the run never silently restarts from scratch.
    """
    steps = sorted(ckpt.all_steps(), reverse=True)
    for step in steps:
        if not ckpt.has_train_state(step) and (ckpt.directory / str(step)).is_dir():
            raise GptjaxError(
                f"{ckpt.directory.parent} holds model weights only (an import), not a run to resume: "
                f"train from it with train.init_from={ckpt.directory.parent} and another run directory"
            )
        try:
            meta = ckpt.read_meta(step)
            check_compatible(meta, config, step, ckpt.directory)
            state = ckpt.restore(step, setup.abstract_state)
        except GptjaxError:
            raise
        except Exception as e:  # orbax raises many types for a damaged directory
            moved = ckpt.set_aside(step) if jax.process_index() == 0 else None
            logger.warn(
                f"checkpoint at step {step} is unreadable ({type(e).__name__}: {str(e)[:160]}); "
                f"moved to {moved}, trying the previous one"
            )
            continue
        logger.print(f"gptjax: resuming {ckpt.directory.parent} from step {step}")
        logger.truncate(step)  # rows after the checkpoint are logged again as they are redone
        return state
    if steps:
        raise GptjaxError(
            f"no checkpoint in {ckpt.directory} is readable (steps {steps}): "
            "move the directory away to start over"
        )
    state = setup.init()
    logger.truncate(0)  # rows of an earlier attempt that was killed before its first checkpoint
    if config.train.init_from:
        state = _init_from(config, setup, state)
        logger.print(f"gptjax: parameters initialised from {config.train.init_from}")
    shape = dict(setup.mesh.shape)
    logger.print(f"gptjax: new run in {ckpt.directory.parent} on {setup.mesh.devices.size} device(s) {shape}")
    return state


def _run(config, run_dir, dataset, setup, ckpt, logger, stop_at, batch_hook) -> TrainResult:
    tc = config.train
    meta = {"config": config.to_dict(), "tokenizer": dataset.tokenizer.name}
    state = _restore_or_init(config, setup, ckpt, logger)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(config.to_json())

    seq = config.model.block_size
    _, data_seed, _ = jax.random.split(jax.random.key(tc.seed), 3)
    batches = data_lib.train_batches(
        dataset,
        seq_len=seq,
        global_batch=tc.batch_size,
        seed=int(jax.random.randint(data_seed, (), 0, 2**31 - 1)),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    val_bytes = dataset.meta.get("bytes", {}).get("val")
    bytes_per_token = val_bytes / len(dataset.val) if val_bytes else None
    flops = flops_per_token(config.model, seq)["total"]
    peak, peak_source = peak_flops(config.model.dtype, tc.peak_flops)
    n_devices = setup.mesh.devices.size
    start = int(state.step)
    metrics: dict[str, float] = {}
    interrupted = False
    if start < tc.steps:  # a finished run only evaluates
        logger.print(f"gptjax: MFU against {peak / 1e12:.3g} TFLOP/s per device, {peak_source}")
        t_compile = time.perf_counter()
        compiled = setup.train_step.lower(
            state, sharding.global_batch(batches.batch(start), setup.mesh)
        ).compile()
        compile_time = time.perf_counter() - t_compile
        logger.print(f"gptjax: train step compiled in {compile_time:.1f}s")
        logger.write(start, {"compile_time": compile_time})
        timer = StepTimer()
        bad_run = skipped_total = 0
        pending = None  # the previous step's metrics: read one step late to keep a step in flight
        stream = batches.prefetch(start, tc.steps, config.data.prefetch)
        with StopRequest() as stop:
            for step, local in timer.wait(stream):
                if batch_hook is not None:
                    local = batch_hook(step, local)
                state, step_metrics = compiled(state, sharding.global_batch(local, setup.mesh))
                if pending is not None:
                    bad = int(pending["skipped"])
                    bad_run, skipped_total = (bad_run + 1 if bad else 0), skipped_total + bad
                    if bad_run > tc.max_bad_steps:
                        raise GptjaxError(
                            f"{bad_run} consecutive steps (up to step {step - 1}) had a non-finite loss "
                            "or gradient and were skipped; stopped, keeping the last checkpoint. Lower "
                            "optim.lr, check the data, or raise train.max_bad_steps"
                        )
                pending = step_metrics
                done = step + 1
                if done % tc.log_every == 0 or done == tc.steps:
                    metrics = {k: float(v) for k, v in step_metrics.items()}  # waits for the step
                    metrics.update(timer.rates(done - start, tc.batch_size * seq, flops, peak * n_devices))
                    metrics["skipped_total"] = skipped_total + int(metrics["skipped"])
                    logger.write(done, metrics)
                    logger.progress(done, metrics)
                eval_now = tc.eval_every and done % tc.eval_every == 0 and done != tc.steps
                if eval_now:
                    with timer.pause():
                        ev = _evaluate_sources(setup, state.params, dataset, config, bytes_per_token)
                    logger.write(done, ev)
                    logger.progress(done, ev)
                    metrics.update(ev)
                if tc.sample_every and done % tc.sample_every == 0 and done != tc.steps:
                    with timer.pause():
                        _samples(config, setup, state.params, dataset.tokenizer, logger)
                stopping = stop.at(done) or done == stop_at
                if stopping or (tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.steps):
                    with timer.pause(stall=True):
                        ckpt.save(
                            done, state, {**meta, "step": done}, metrics=_eval_only(ev) if eval_now else None
                        )
                if stopping:
                    interrupted = True
                    logger.print(f"gptjax: stop requested; saved step {done}, exiting")
                    break
        stream.close()  # stops the prefetch thread
        logger.write(int(state.step), peak_memory())
    final_step = int(state.step)
    if not interrupted:
        ev = _evaluate_sources(setup, state.params, dataset, config, bytes_per_token)
        metrics.update(ev)
        logger.write(final_step, ev)
        logger.progress(final_step, ev)
        if final_step not in ckpt.all_steps():
            ckpt.save(final_step, state, {**meta, "step": final_step}, metrics=_eval_only(ev))
    ckpt.wait()
    samples = (
        []
        if interrupted or not config.sample.num_samples
        else _samples(config, setup, state.params, dataset.tokenizer, logger)
    )
    if jax.process_index() == 0:
        (run_dir / "result.json").write_text(json.dumps({"step": final_step, **metrics}, indent=2))
    return TrainResult(run_dir, final_step, metrics, samples, state, interrupted)


def _eval_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("val_")}


def _samples(config: Config, setup: Setup, params, tokenizer, logger) -> list[str]:
    """Print a few samples from the trained model (the sampler issue's generate)."""
    from gptjax.sample import SamplingParams, generate

    sc = config.sample
    if not sc.num_samples:
        return []
    model = nnx.merge(setup.graphdef, params)
    max_new = min(sc.max_new_tokens, config.model.block_size - max(1, len(tokenizer.encode(sc.prompt))))
    out = generate(
        model,
        [sc.prompt] * sc.num_samples,
        max_new_tokens=max_new,
        params=SamplingParams(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p, min_p=sc.min_p),
        seed=sc.seed,
        tokenizer=tokenizer,
        eot_id=tokenizer.eot_id,
    )
    for i, text in enumerate(out.texts):
        logger.print(f"--- sample {i} ---\n{sc.prompt}{text}")
    return list(out.texts)
