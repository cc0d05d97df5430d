"""Where a run's train state starts: its newest readable checkpoint, else a fresh (or ``init_from``) state."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax

from gptjax.checkpoint import Checkpointer
from gptjax.config import Config
from gptjax.errors import GptjaxError
from gptjax.metrics import MetricsLogger
from gptjax.runs import check_compatible, load_params, read_config
from gptjax.steps import Task, TrainState

if TYPE_CHECKING:
    from gptjax.train import Setup


def restore_or_init(config: Config, setup: Setup, ckpt: Checkpointer, logger: MetricsLogger, task: Task):
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
            check_same_data(meta, config, step, ckpt.directory)
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
        # Rows after the checkpoint are logged again as they are redone (a finished run's
        # final evaluation too).
        logger.truncate(step, redo_eval=step >= config.train.steps)
        return state
    if steps or ckpt.set_aside_steps():
        raise GptjaxError(
            f"no checkpoint in {ckpt.directory} is readable (steps {steps or ckpt.set_aside_steps()}): "
            "move the directory away to start over"
        )
    state = setup.init()
    logger.truncate(0)  # rows of an earlier attempt that was killed before its first checkpoint
    if task.initialise is not None:
        state = task.initialise(state, setup)
        logger.print(f"gptjax: parameters initialised from {config.train.init_from or 'the task'}")
    shape = dict(setup.mesh.shape)
    logger.print(f"gptjax: new run in {ckpt.directory.parent} on {setup.mesh.devices.size} device(s) {shape}")
    return state


def init_from(config: Config, setup: Setup, state: TrainState) -> TrainState:
    """``state`` with the parameters of the run at ``config.train.init_from`` (same model)."""
    source, _ = read_config(config.train.init_from)
    check_compatible({"config": source.to_dict()}, config, 0, Path(config.train.init_from))
    params, _ = load_params(config.train.init_from, setup.abstract_state.params)
    # AdamW's initial state (zero moments, count 0) does not depend on the values.
    return state._replace(params=params)


def check_same_data(saved: dict, config: Config, step: int, directory: Path) -> None:
    """Raise if a checkpoint to resume was trained on another ``data.source`` or tokenizer."""
    saved_data = saved.get("config", {}).get("data", {})
    diffs = [
        f"data.{k} {saved_data[k]!r} != {getattr(config.data, k)!r}"
        for k in ("source", "tokenizer")
        if k in saved_data and saved_data[k] != getattr(config.data, k)
    ]
    if diffs:
        raise GptjaxError(
            f"the checkpoint at step {step} in {directory} was trained on other data ({'; '.join(diffs)}): "
            f"resume with its data, or start a new train.run_dir with train.init_from={directory.parent}"
        )
