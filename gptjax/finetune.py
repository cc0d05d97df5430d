"""Fine-tuning a pretrained GPT on a supervised task, as GPT-1 (Radford et al. 2018) does it.

Every task becomes one or more token sequences framed by three new tokens, ``start``,
``delim`` and ``extract`` (rows ``V, V+1, V+2`` of the grown embedding, V being the
pretrained vocab_size), and a linear head reads the final hidden state at ``extract``:

* classification: ``start text extract``, softmax over the label names;
* entailment: ``start premise delim hypothesis extract``;
* similarity: both orders ``start a delim b extract`` and ``start b delim a extract``,
  the two extract hidden states summed before the head;
* multiple choice: ``start context delim choice extract`` per choice, the head gives
  one score per choice and the softmax runs over the choices.

The loss is ``L3 = L2 + aux_lm_weight * L1``: the task's cross-entropy plus the language
modelling loss on the task's own sequences (0 disables it). The pretrained body and the
new parameters (head, special-token rows) have their own learning rates; the body can be
frozen, or unfrozen gradually from the top layer down. Validation runs every
``eval_every`` steps; the best checkpoint by ``metric`` is the one kept, and training
stops after ``patience`` evaluations without improvement.

A fine-tune run directory holds ``config.json`` (the grown model), ``finetune.json``
(the fine-tune config, task, special-token ids, label names and best metrics) and
``checkpoints/<step>/`` whose ``params`` item is the grown GPT (so ``gptjax sample`` and
``gptjax attention`` accept the run) and whose ``train`` item holds the head, the
optimizer state, the step and the key. :func:`load_finetuned` loads both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from flax import nnx

from gptjax import checkpoint, fields, sharding
from gptjax import finetune_data as fdata
from gptjax import train as train_lib
from gptjax.checkpoint import Checkpointer
from gptjax.config import Config, MeshConfig, SampleConfig, TrainConfig
from gptjax.errors import GptjaxError
from gptjax.finetune_model import (  # noqa: F401  (the public names of fine-tuning)
    SPECIAL_TOKENS,
    _loss,
    _optim,
    grow_vocab,
    head_logits,
    init_head,
    make_eval_step,
    make_loss_fn,
    make_optimizer,
    peak_lrs,
    trainable_mask,
)
from gptjax.model import GPT
from gptjax.optim import lr_schedule
from gptjax.recipes import load_recipe

TASKS = ("classification", "entailment", "similarity", "multiple_choice")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A fine-tuning run.

    Attributes:
        init_from: The pretrained run directory (``gptjax train`` or ``gptjax import-hf``).
        task: ``classification``, ``entailment``, ``similarity`` or ``multiple_choice``.
        train_file: Training examples, ``.csv`` or ``.jsonl``.
        val_file: Validation examples (early stopping and the best checkpoint use them).
        text_column: The text (classification) or context (multiple choice) column.
        text_a_column: The premise / first text column (entailment, similarity).
        text_b_column: The hypothesis / second text column (entailment, similarity).
        choices_column: The list of choices (multiple choice; a JSON list in CSV cells).
        label_column: The label: a name (mapped to ids, sorted) or, for multiple choice,
            the index of the right choice.
        aux_lm_weight: lambda in ``L3 = L2 + lambda L1`` (GPT-1: 0.5); 0 disables L1.
        body_lr: Peak learning rate of the pretrained parameters (GPT-1: 6.25e-5); the top
            layer's when ``layer_lr_decay`` > 1.
        head_lr: Peak learning rate of the head and the special-token embedding rows.
        layer_lr_decay: Discriminative rates (ULMFiT: 2.6): each layer below the top
            trains at the rate of the one above divided by this; the embeddings below the
            first layer. 1 gives the whole body ``body_lr``.
        dropout: Dropout on the body (embeddings, attention, residuals) and on the
            classifier's input (GPT-1: 0.1).
        weight_decay: AdamW weight decay of the matrices (GPT-1: 0.01).
        epochs: Passes over the training set.
        max_steps: Stop after this many steps if sooner; 0: run the epochs.
        batch_size: Examples per step.
        freeze_body: Train only the head and special-token embeddings.
        unfreeze_every: Gradual unfreezing: the top layer (and ln_f) train from the start,
            one more layer every this many steps; embeddings once all layers do. 0: off.
        eval_every: Steps between validations; 0 validates once per epoch.
        metric: ``accuracy`` (higher is better) or ``loss`` (the task loss L2).
        patience: Validations without improvement before stopping; 0 never stops early.
        max_len: Sequence length; 0 uses the longest example. A longer example is an error.
        seed: Seeds the head init, the shuffling and dropout.
        run_dir: Where the run is written.
    """

    init_from: str = ""
    task: Literal["classification", "entailment", "similarity", "multiple_choice"] = "classification"
    train_file: str = ""
    val_file: str = ""
    text_column: str = "text"
    text_a_column: str = "text_a"
    text_b_column: str = "text_b"
    choices_column: str = "choices"
    label_column: str = "label"
    aux_lm_weight: float = 0.5
    body_lr: float = 6.25e-5
    head_lr: float = 1e-3
    layer_lr_decay: float = 1.0
    dropout: float = 0.1
    weight_decay: float = 0.01
    epochs: int = 3
    max_steps: int = 0
    batch_size: int = 32
    freeze_body: bool = False
    unfreeze_every: int = 0
    eval_every: int = 0
    metric: Literal["accuracy", "loss"] = "accuracy"
    patience: int = 0
    max_len: int = 0
    seed: int = 0
    run_dir: str = "runs/finetune"

    def __post_init__(self) -> None:
        for name, annotation in typing.get_type_hints(type(self)).items():
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None
            if choices and getattr(self, name) not in choices:
                raise GptjaxError(f"{name} ({getattr(self, name)!r}) must be one of {list(choices)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise GptjaxError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("max_steps", "unfreeze_every", "eval_every", "patience", "max_len", "aux_lm_weight"):
            if getattr(self, name) < 0:
                raise GptjaxError(f"{name} ({getattr(self, name)}) must be >= 0")
        for name in ("body_lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise GptjaxError(f"{name} ({getattr(self, name)}) must be > 0")
        if not self.layer_lr_decay >= 1:
            raise GptjaxError(f"layer_lr_decay ({self.layer_lr_decay}) must be >= 1 (1: one rate)")
        if not 0 <= self.dropout < 1:
            raise GptjaxError(f"dropout ({self.dropout}) must be in [0, 1)")


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """A ``.py`` file's ``get_config()`` plus ``field=value`` overrides, type-checked."""
    config = load_recipe(path, "get_config", FinetuneConfig, "fine-tune config")
    return apply_overrides(config, overrides)


def apply_overrides(config: FinetuneConfig, overrides: list[str] | tuple[str, ...]) -> FinetuneConfig:
    """Apply ``field=value`` (or ``finetune.field=value``); unknown keys and bad types are errors."""
    return fields.apply_overrides(config, overrides, what="fine-tune config key", strip="finetune.")


# --------------------------------------------------------------------------------------
# The run: a Task on gptjax.train's trainer


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    run_dir: Path
    best: dict[str, float]  # the kept checkpoint's validation metrics and step
    history: list[dict[str, float]]  # every validation
    steps: int
    seconds: float
    label_names: list[str]
    interrupted: bool = False  # stopped by SIGTERM or stop_at: run again to resume
    state: Any = None  # the final train state (gptjax.train.TrainState, head included)


class FinetuneBatches:
    """Training batches as a pure function of the step (so a resumed run is bitwise the
    same): epoch ``e`` visits the rows in ``default_rng([seed, e])``'s permutation."""

    def __init__(self, arrays: dict, batch_size: int, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(arrays["labels"])
        self.steps_per_epoch = self.n // batch_size
        self.rows = batch_size // jax.process_count()

    def batch(self, step: int) -> dict:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        lo = i * self.batch_size + jax.process_index() * self.rows
        return {k: v[order[lo : lo + self.rows]] for k, v in self.arrays.items()}

    def prefetch(self, start: int, stop: int, depth: int):
        return ((step, self.batch(step)) for step in range(start, stop))


def _best_key(metric: str):
    """The checkpoint sort key (lowest is best); ties in accuracy go to the lower loss."""

    def key(ev: dict):
        loss = ev.get("val_loss", math.inf)
        return (-ev.get("val_accuracy", -math.inf), loss) if metric == "accuracy" else (loss,)

    return key


def _task(cfg: FinetuneConfig, model_config, n_out: int, total_steps: int) -> train_lib.Task:
    """The hooks every fine-tune run and load share: loss, head and optimizer."""
    uses = (cfg.task, cfg.aux_lm_weight, cfg.dropout)

    def loss(model, head, batch, dropout_key):
        total, (task_loss, lm_loss, logits) = _loss(model, head, batch, dropout_key, *uses)
        accuracy = (logits.argmax(-1) == batch["labels"]).mean()
        return total, {"task_loss": task_loss, "lm_loss": lm_loss, "accuracy": accuracy}

    return train_lib.Task(
        loss=loss,
        init_head=lambda key: init_head(model_config.n_embd, n_out, key),
        optimizer=lambda params, head, total: make_optimizer(cfg, total, params, head),
        lr=lr_schedule(_optim(cfg, total_steps), total_steps),  # the top layer's
        best=_best_key(cfg.metric),
    )


def finetune(
    cfg: FinetuneConfig,
    *,
    log=print,
    mesh: jax.sharding.Mesh | None = None,
    stop_at: int | None = None,
    batch_hook=None,
) -> FinetuneResult:
    """Fine-tune ``cfg.init_from`` on the task with :func:`gptjax.train.train`'s trainer.

    The run is sharded like training (``mesh``, default every device as data parallel),
    resumes bitwise from its latest checkpoint when run again with the same config, saves
    and returns on SIGTERM (or after ``stop_at``), and skips non-finite steps. The best
    checkpoint by ``cfg.metric`` is kept with the latest.
    """
    from gptjax.runs import load

    if not cfg.init_from or not cfg.train_file or not cfg.val_file:
        raise GptjaxError(
            "init_from, train_file and val_file must all be set (e.g. init_from=runs/quickstart)"
        )
    start = time.perf_counter()
    pretrained, pre_config, tokenizer = load(cfg.init_from)
    base_vocab = pre_config.model.vocab_size
    special = {name: base_vocab + i for i, name in enumerate(SPECIAL_TOKENS)}
    train_rows = fdata.read_examples(cfg.train_file, cfg)
    val_rows = fdata.read_examples(cfg.val_file, cfg)
    label_names = fdata.label_names(train_rows, cfg)
    max_len = cfg.max_len or pre_config.model.block_size
    if max_len > pre_config.model.block_size:
        raise GptjaxError(
            f"max_len ({max_len}) exceeds the model's block_size ({pre_config.model.block_size})"
        )
    encoded = [
        fdata.encode(rows, cfg, tokenizer, special, label_names, max_len) for rows in (train_rows, val_rows)
    ]
    seq_len = cfg.max_len or max(e["tokens"].shape[-1] for e in encoded)
    n_choices = max(e["tokens"].shape[1] for e in encoded)
    train_arrays, val_arrays = (fdata.pad_choices(fdata.pad_to(e, seq_len), n_choices) for e in encoded)
    n_train = len(train_arrays["labels"])
    batch_size = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    total = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch
    drop = {f"{k}_dropout": cfg.dropout for k in ("embd", "attn", "resid")}
    model_config = dataclasses.replace(pre_config.model, vocab_size=base_vocab + len(SPECIAL_TOKENS), **drop)
    config = Config(
        name="finetune",
        model=model_config,
        data=pre_config.data,
        optim=_optim(cfg, total),
        train=TrainConfig(
            steps=total, batch_size=batch_size, seed=cfg.seed, log_every=min(10, eval_every),
            eval_every=eval_every, checkpoint_every=eval_every, keep_checkpoints=1, run_dir=cfg.run_dir,
        ),
        sample=SampleConfig(num_samples=0),
    )  # fmt: skip
    n_out = 1 if cfg.task == "multiple_choice" else len(label_names)
    record = {
        "finetune": dataclasses.asdict(cfg),
        "task": cfg.task,
        "special_tokens": special,
        "label_names": label_names,
        "seq_len": seq_len,
        "init_from": str(cfg.init_from),
    }
    run_dir = Path(cfg.run_dir)
    history = _start_record(run_dir, record)
    init_key, _, data_key, _ = jax.random.split(jax.random.key(cfg.seed), 4)
    eval_step = jax.jit(make_eval_step(nnx.graphdef(pretrained), cfg.task))
    best_key = _best_key(cfg.metric)

    def initialise(state, setup):
        grown = nnx.state(grow_vocab(pretrained, len(SPECIAL_TOKENS), init_key))
        shardings = jax.tree.map(lambda a: a.sharding, setup.abstract_state.params)
        return state._replace(params=jax.device_put(grown, shardings))

    def evaluate(setup, params, head, final=False):  # the whole validation split, always
        total_nll = correct = 0.0
        n = len(val_arrays["labels"])
        for batch in fdata.batches(val_arrays, np.arange(n), batch_size, pad=True):
            nll, right, _ = eval_step(params, head, batch)
            total_nll, correct = total_nll + float(nll), correct + float(right)
        return {"val_loss": total_nll / n, "val_accuracy": correct / n}

    def after_eval(step, ev):
        history[:] = [h for h in history if h["step"] < step] + [{**ev, "step": step}]
        log("gptjax finetune: " + " ".join(f"{k}={v:.4g}" for k, v in history[-1].items()))
        _write_record(run_dir, record, history)
        best_at = min(range(len(history)), key=lambda i: (best_key(history[i]), -i))
        return bool(cfg.patience) and len(history) - 1 - best_at >= cfg.patience

    task = _task(cfg, model_config, n_out, total)._replace(
        initialise=initialise,
        batches=FinetuneBatches(
            train_arrays, batch_size, int(jax.random.randint(data_key, (), 0, 2**31 - 1))
        ),
        evaluate=evaluate,
        after_eval=after_eval,
        tokens_per_step=batch_size * train_arrays["tokens"][0].size,
        meta={"tokenizer": tokenizer.name, **record},
        tokenizer=tokenizer,
    )
    log(f"gptjax finetune: {cfg.task}, {n_train} train / {len(val_arrays['labels'])} val examples, "
        f"{total} steps, labels {label_names}")  # fmt: skip
    result = train_lib.train(config, mesh=mesh, stop_at=stop_at, batch_hook=batch_hook, task=task)
    best = min(reversed(history), key=best_key) if history else {}
    seconds = time.perf_counter() - start
    _write_record(run_dir, record, history, best=best, seconds=seconds)
    return FinetuneResult(
        run_dir, best, history, result.step, seconds, label_names, result.interrupted, result.state
    )


def _start_record(run_dir: Path, record: dict) -> list[dict]:
    """The history of an earlier attempt of this same run (resumed), or [] for a new one."""
    path = run_dir / "finetune.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("finetune") != record["finetune"]:
            raise GptjaxError(
                f"{str(run_dir)!r} already holds a fine-tune run with another config: set run_dir= to a "
                "new directory (the same config resumes it)"
            )
        return list(previous.get("history", []))
    if checkpoint.steps(run_dir / "checkpoints"):
        raise GptjaxError(f"{str(run_dir)!r} already holds a run: set run_dir= to a new directory")
    _write_record(run_dir, record, [])
    return []


def _write_record(run_dir: Path, record: dict, history: list, **extra) -> None:
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**record, "history": history, **extra}, indent=2)
        (run_dir / "finetune.json").write_text(text)


# --------------------------------------------------------------------------------------
# Using a fine-tuned run


class Finetuned(NamedTuple):
    """A loaded fine-tune run: the grown GPT, the head and what the run recorded."""

    model: GPT
    head: dict
    config: FinetuneConfig
    record: dict  # meta: task, special_tokens, label_names, seq_len, best
    tokenizer: Any


def load_finetuned(run_dir: str | Path) -> Finetuned:
    """Load the kept best checkpoint of a fine-tune run (the latest if none is recorded)."""
    from gptjax.runs import locate
    from gptjax.tokenizer import get_tokenizer

    directory, step = locate(run_dir)
    record = Path(run_dir) / "finetune.json"
    best_step = json.loads(record.read_text()).get("best", {}).get("step") if record.is_file() else None
    ckpt = Checkpointer(directory, read_only=True)
    try:
        step = best_step if best_step in ckpt.all_steps() else step
        meta = ckpt.read_meta(step)
        if "finetune" not in meta:
            raise GptjaxError(
                f"{str(run_dir)!r} is not a fine-tune run (no finetune record): use gptjax.load"
            )
        cfg = FinetuneConfig(**meta["finetune"])
        config = Config.from_dict(meta["config"])
        n_out = 1 if cfg.task == "multiple_choice" else len(meta["label_names"])
        one_device = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
        task = _task(cfg, config.model, n_out, config.train.steps)
        setup = train_lib.build(
            dataclasses.replace(config, train=TrainConfig(batch_size=1)), one_device, task
        )
        state = ckpt.restore(step, setup.abstract_state)
    finally:
        ckpt.close()
    return Finetuned(
        nnx.merge(setup.graphdef, state.params), state.head, cfg, meta, get_tokenizer(meta["tokenizer"])
    )


def predict(finetuned: Finetuned, path: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """Predictions and accuracy of a fine-tuned run on a labelled CSV/JSONL file."""
    cfg, record = finetuned.config, finetuned.record
    rows = fdata.read_examples(path, cfg)
    arrays = fdata.pad_to(
        fdata.encode(rows, cfg, finetuned.tokenizer, record["special_tokens"], record["label_names"],
                     record["seq_len"]),
        record["seq_len"],
    )  # fmt: skip
    graphdef, params = nnx.split(finetuned.model)
    eval_step = jax.jit(make_eval_step(graphdef, cfg.task))
    predictions = []
    n = len(arrays["labels"])
    for batch in fdata.batches(arrays, np.arange(n), batch_size, pad=True):
        predictions.extend(
            np.asarray(eval_step(params, finetuned.head, batch)[2])[: int(batch["weight"].sum())]
        )
    accuracy = float(np.mean(np.asarray(predictions) == arrays["labels"]))
    names = record["label_names"]
    return {"predictions": [names[p] if names else int(p) for p in predictions], "accuracy": accuracy}
