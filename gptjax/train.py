"""Training: the loop every task runs (language modelling here, fine-tuning through a
:class:`~gptjax.steps.Task`), its setup, and validation.

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
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import data as data_lib
from gptjax import resume, sharding, validate
from gptjax.checkpoint import Checkpointer
from gptjax.config import Config, flops_per_token
from gptjax.errors import GptjaxError
from gptjax.metrics import MetricsLogger, StepTimer, interval_mean, peak_flops, peak_memory
from gptjax.model import GPT
from gptjax.model import abstract as model_abstract
from gptjax.optim import keep_moments, lr_schedule, make_optimizer, weight_decay_mask  # noqa: F401
from gptjax.preemption import StopRequest
from gptjax.runs import RunLock, prepare_run_dir
from gptjax.steps import Task, TrainState, lm_loss, make_eval_step, make_grad_fn, make_train_step  # noqa: F401


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the run, its last metrics and its final state."""

    run_dir: Path
    step: int
    metrics: dict[str, float]
    samples: list[str]
    state: TrainState
    interrupted: bool = False


def language_model(config: Config, dataset: data_lib.Dataset | None = None) -> Task:
    """Next-token prediction on ``dataset`` (its data hooks are None without one)."""
    task = Task(
        loss=lm_loss,
        init_head=lambda key: (),
        optimizer=lambda params, head, total: make_optimizer(config.optim, total, params),
        lr=lr_schedule(config.optim, config.train.steps),
        initialise=(lambda state, setup: resume.init_from(config, setup, state))
        if config.train.init_from
        else None,
        setup_key="language model",  # loss, head and optimizer follow from the config
    )
    if dataset is None:
        return task
    tc, seq = config.train, config.model.block_size
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
    # Per predicted token: N tokens hold N - 1 predictions (as evaluate.lm_metrics counts).
    bytes_per_token = val_bytes / max(len(dataset.val) - 1, 1) if val_bytes else None
    return task._replace(
        batches=batches,
        evaluate=lambda setup, params, head, final=False: _evaluate_sources(
            setup, params, dataset, config, bytes_per_token, full=final
        ),
        tokens_per_step=tc.batch_size * seq,
        meta={"tokenizer": dataset.tokenizer.name},
        tokenizer=dataset.tokenizer,
    )


# --------------------------------------------------------------------------------------
# Setup


class Setup(NamedTuple):
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs carrying the target shardings
    init: Any  # jitted: () -> TrainState
    train_step: Any  # jitted
    eval_step: Any  # jitted


_SETUPS: dict[Any, Setup] = {}  # the last few setups of tasks with a setup_key
_SETUPS_KEPT = 4


def build(config: Config, mesh: jax.sharding.Mesh | None = None, task: Task | None = None) -> Setup:
    """Mesh, shardings, the jitted init/train/eval functions; no arrays are allocated.

    ``task`` gives the loss, the head and the optimizer (default: language modelling).
    A task with a ``setup_key`` gets the setup built last time for the same key, model,
    optimizer, steps, seed and mesh: its functions are already traced and compiled.
    """
    task = task or language_model(config)
    mesh = mesh or sharding.make_mesh(config.mesh)
    _check_divisible(config, mesh)
    key = task.setup_key
    if key is not None:
        key = (key, config.model, config.optim, config.train.steps, config.train.seed, mesh)
        if key in _SETUPS:
            return _SETUPS[key]
    setup = _build(config, mesh, task)
    if key is not None:
        _SETUPS[key] = setup
        while len(_SETUPS) > _SETUPS_KEPT:
            del _SETUPS[next(iter(_SETUPS))]
    return setup


def _check_divisible(config: Config, mesh: jax.sharding.Mesh) -> None:
    dp = sharding.data_parallel_size(mesh)
    micro = config.train.batch_size // config.optim.accum_steps
    if micro % dp:
        fits = -(-micro // dp) * dp * config.optim.accum_steps  # the next batch size that divides
        raise GptjaxError(
            f"batch size per micro-batch ({micro} = train.batch_size {config.train.batch_size} / "
            f"optim.accum_steps {config.optim.accum_steps}) must be divisible by data x fsdp = {dp}: "
            f"set train.batch_size={fits}, or use fewer devices"
        )
    if config.model.n_head % mesh.shape["tensor"]:
        raise GptjaxError(
            f"model.n_head ({config.model.n_head}) must be divisible by mesh.tensor ({mesh.shape['tensor']})"
        )


def _build(config: Config, mesh: jax.sharding.Mesh, task: Task) -> Setup:
    root = jax.random.key(config.train.seed)
    init_key, _, train_key = jax.random.split(root, 3)
    head_key = jax.random.fold_in(init_key, 1)
    graphdef, abstract_params = model_abstract(config.model)
    abstract_head = jax.eval_shape(task.init_head, head_key)
    optimizer = task.optimizer(abstract_params, abstract_head, config.train.steps)
    param_sh = sharding.param_shardings(abstract_params, mesh)
    replicated = sharding.replicated(mesh)
    head_sh = jax.tree.map(lambda _: replicated, abstract_head)

    def opt_sharding(x):
        if isinstance(x, nnx.Variable):
            return x.replace(
                sharding.NamedSharding(mesh, sharding.spec_for(x.get_metadata()["axes"], x.shape, mesh))
            )
        return replicated

    abstract_opt = jax.eval_shape(optimizer.init, (abstract_params, abstract_head))
    opt_sh = jax.tree.map(opt_sharding, abstract_opt, is_leaf=lambda x: isinstance(x, nnx.Variable))
    state_sh = TrainState(replicated, param_sh, opt_sh, replicated, head_sh)

    def init():
        params = nnx.split(GPT(config.model, key=init_key))[1]
        head = task.init_head(head_key)
        opt_state = optimizer.init((params, head))
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.key_data(train_key), head)

    abstract_state = jax.eval_shape(init)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh
    )
    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        sharding.under_mesh(mesh, make_train_step(graphdef, optimizer, config, task.loss, task.lr)),
        in_shardings=(state_sh, None),  # the batch arrives placed (sharding.global_batch)
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        sharding.under_mesh(mesh, make_eval_step(graphdef)),
        in_shardings=(param_sh, batch_sh, batch_sh),
        out_shardings=replicated,
    )
    return Setup(mesh, graphdef, abstract_state, jax.jit(init, out_shardings=state_sh), train_step, eval_step)


def evaluate(
    setup: Setup,
    params,
    val_tokens: np.ndarray,
    config: Config,
    bytes_per_token: float | None,
    *,
    full: bool = False,
):
    """``eval_max_batches`` batches of the validation tokens, or a full pass (``full`` or 0).

    ``val_tokens`` in the result counts the tokens scored and ``val_full_pass`` says
    whether they were all of them.
    """
    from gptjax.evaluate import nll_sum

    total, count = nll_sum(
        setup.eval_step,
        params,
        val_tokens,
        seq_len=config.model.block_size,
        batch_size=config.train.batch_size // config.optim.accum_steps,
        max_batches=0 if full else config.train.eval_max_batches,
        mesh=setup.mesh,
    )
    loss = total / max(count, 1.0)
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 80.0)), "val_tokens": int(count)}
    out["val_full_pass"] = int(count) >= len(val_tokens) - 1
    if bytes_per_token:
        out["val_bits_per_byte"] = total / (math.log(2) * count * bytes_per_token)
    return out


def _evaluate_sources(
    setup: Setup, params, dataset, config: Config, bytes_per_token: float | None, *, full: bool = False
):
    """``evaluate`` on the validation tokens, and for a mixture on each source's (``val_loss_NAME``)."""
    out = evaluate(setup, params, dataset.val, config, bytes_per_token, full=full)
    for name, (_, part) in dataset.parts.items():
        out[f"val_loss_{name}"] = evaluate(setup, params, part.val, config, None, full=full)["val_loss"]
    return out


# --------------------------------------------------------------------------------------
# The loop


def train(
    config: Config,
    *,
    mesh: jax.sharding.Mesh | None = None,
    stop_at: int | None = None,
    batch_hook: Callable[[int, np.ndarray], np.ndarray] | None = None,
    task: Task | None = None,
) -> TrainResult:
    """Train (or resume) the run described by ``config``.

    Args:
        config: The run. Its run directory is resumed if it holds a checkpoint.
        mesh: Devices to train on (default: every device, shaped by ``config.mesh``).
        batch_hook: ``(step, local_batch) -> local_batch`` applied before each step (for
            fault-injection tests and data surgery).
        stop_at: Stop after this step as if preempted (save, return): for jobs that run a
            long schedule a slice at a time.
        task: What to optimise (default: next-token prediction on ``config.data``);
            :func:`gptjax.finetune.finetune` passes its own.
    """
    sharding.initialize_distributed()
    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(config)
    # SIGTERM from here on (compile, loop, final evaluation and save, samples) saves and exits.
    with RunLock(run_dir, enabled=is_main), StopRequest() as stop:
        validate.attention_kernel(config.model.attention)
        if task is None:
            dataset = data_lib.load_dataset(
                config.data, seq_len=config.model.block_size, vocab_size=config.model.vocab_size
            )
            validate.train_batch(
                config.train.batch_size, config.model.block_size, len(dataset.train), config.data.source
            )
            task = language_model(config, dataset)
        setup = build(config, mesh, task)
        ckpt = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints, best=task.best)
        logger = MetricsLogger(
            run_dir,
            enabled=is_main,
            total_steps=config.train.steps,
            wandb_project=config.train.wandb_project,
            config=config.to_dict(),
        )
        try:
            return _run(config, run_dir, task, setup, ckpt, logger, stop_at, batch_hook, stop)
        finally:
            try:
                ckpt.close()
            finally:
                logger.close()


def _run(config, run_dir, task: Task, setup, ckpt, logger, stop_at, batch_hook, stop) -> TrainResult:
    tc = config.train
    meta = {"config": config.to_dict(), **task.meta}
    state = resume.restore_or_init(config, setup, ckpt, logger, task)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(config.to_json())

    batches, seq = task.batches, config.model.block_size
    flops = flops_per_token(config.model, seq)["total"]
    peak, peak_source = peak_flops(config.model.dtype, tc.peak_flops)
    n_devices = setup.mesh.devices.size
    start = int(state.step)
    metrics: dict[str, float] = {}
    interrupted = stop_at is not None and start >= stop_at < tc.steps
    finished_early = False
    last_eval = None  # the step of the last validation
    if interrupted:  # a retried slice job: its slice is done
        logger.print(f"gptjax: step {start} already reached --stop-at {stop_at}; nothing to do")
    elif start < tc.steps:  # a finished run only evaluates
        logger.print(f"gptjax: MFU against {peak / 1e12:.3g} TFLOP/s per device, {peak_source}")
        t_compile = time.perf_counter()
        compiled = setup.train_step.lower(state, _global_batch(batches.batch(start), setup.mesh)).compile()
        compile_time = time.perf_counter() - t_compile
        logger.print(f"gptjax: train step compiled in {compile_time:.1f}s")
        logger.write(start, {"compile_time": compile_time, "peak_flops": peak})  # the MFUs' denominator
        timer = StepTimer()
        bad_run = skipped_total = 0
        pending = None  # the previous step's metrics: read one step late to keep a step in flight
        interval_losses = []  # this logging interval's losses (device scalars), averaged when logged
        logger.begin(start)
        stream = batches.prefetch(start, tc.steps, config.data.prefetch)
        with stop:  # held since train() started; entering again changes nothing
            for step, local in timer.wait(stream):
                if batch_hook is not None:
                    local = batch_hook(step, local)
                state, step_metrics = compiled(state, _global_batch(local, setup.mesh))
                if pending is not None:
                    bad = int(pending["skipped"])
                    bad_run, skipped_total = (bad_run + 1 if bad else 0), skipped_total + bad
                    if bad_run > tc.max_bad_steps:
                        raise GptjaxError(
                            f"{bad_run} consecutive steps (up to step {step - 1}) had a non-finite loss, "
                            "gradient or update and were skipped; stopped, keeping the last checkpoint. "
                            "Lower optim.lr, check the data, or raise train.max_bad_steps"
                        )
                pending = step_metrics
                done = step + 1
                interval_losses.append(step_metrics["loss"])
                logger.advance(done)
                if done % tc.log_every == 0 or done == tc.steps:
                    metrics = {k: float(v) for k, v in step_metrics.items()}  # waits for the step
                    metrics["loss"], interval_losses = interval_mean(interval_losses), []
                    metrics.update(timer.rates(done - start, task.tokens_per_step, flops, peak * n_devices))
                    metrics["skipped_total"] = skipped_total + int(metrics["skipped"])
                    logger.write(done, metrics)
                    logger.progress(done, metrics)
                eval_now = tc.eval_every and done % tc.eval_every == 0 and done != tc.steps
                if eval_now:
                    with timer.pause():
                        ev = task.evaluate(setup, state.params, state.head)
                    logger.write(done, ev)
                    logger.progress(done, ev)
                    metrics.update(ev)
                    last_eval = done
                    finished_early = task.after_eval is not None and task.after_eval(done, ev)
                if tc.sample_every and done % tc.sample_every == 0 and done != tc.steps:
                    with timer.pause():
                        _samples(config, setup, state.params, task.tokenizer, logger)
                stopping = stop.at(done) or done == stop_at
                every = tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != tc.steps
                if stopping or finished_early or every:
                    with timer.pause(stall=True):
                        ckpt.save(
                            done, state, {**meta, "step": done}, metrics=_eval_only(ev) if eval_now else None
                        )
                if stopping:
                    interrupted = True
                    logger.print(f"gptjax: stop requested; saved step {done}, exiting")
                    break
                if finished_early:
                    logger.print(f"gptjax: {task.meta.get('task', 'the task')} stopped early at step {done}")
                    break
        stream.close()  # stops the prefetch thread
        logger.write(int(state.step), peak_memory())
    final_step = int(state.step)
    if not interrupted:
        if last_eval != final_step:  # the run's final number is a full pass, as `gptjax eval`'s
            ev = task.evaluate(setup, state.params, state.head, final=True)
            metrics.update(ev)
            logger.write(final_step, ev)
            logger.progress(final_step, ev)
            if task.after_eval is not None:
                task.after_eval(final_step, ev)
        if final_step not in ckpt.all_steps():
            ckpt.save(final_step, state, {**meta, "step": final_step}, metrics=_eval_only(ev))
    ckpt.wait()
    samples = (
        []
        if interrupted or stop.requested or not config.sample.num_samples
        else _samples(config, setup, state.params, task.tokenizer, logger)
    )
    if jax.process_index() == 0:
        (run_dir / "result.json").write_text(json.dumps({"step": final_step, **metrics}, indent=2))
    return TrainResult(run_dir, final_step, metrics, samples, state, interrupted)


def _global_batch(local, mesh):
    """This process's batch (an array or a pytree of arrays) as global, batch-sharded arrays."""
    return jax.tree.map(lambda x: sharding.global_batch(x, mesh), local)


def _eval_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("val_")}


def _samples(config: Config, setup: Setup, params, tokenizer, logger) -> list[str]:
    """Print a few samples from the trained model (the sampler issue's generate)."""
    from gptjax.sample import generate

    sc = config.sample
    if not sc.num_samples:
        return []
    model = nnx.merge(setup.graphdef, params)
    max_new = min(sc.max_new_tokens, config.model.block_size - max(1, len(tokenizer.encode(sc.prompt))))
    out = generate(
        model,
        [sc.prompt] * sc.num_samples,
        max_new_tokens=max_new,
        params=sc.sampling_params,
        seed=sc.seed,
        tokenizer=tokenizer,
        eot_id=tokenizer.eot_id,
    )
    for i, text in enumerate(out.texts):
        logger.print(f"--- sample {i} ---\n{sc.prompt}{text}")
    return list(out.texts)


class _CallableModule(types.ModuleType):
    """``gptjax.train`` is this module, and calling it runs :func:`train`.

    So ``gptjax.train(config)`` trains, while ``gptjax.train.build`` and
    ``import gptjax.train`` reach the module instead of a function that shadows it.
    """

    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
