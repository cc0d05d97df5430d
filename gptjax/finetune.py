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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import finetune_data as fdata
from gptjax.checkpoint import Checkpointer
from gptjax.config import Config, _parse_value, load_recipe
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.train import weight_decay_mask

SPECIAL_TOKENS = ("start", "delim", "extract")
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
        body_lr: Peak learning rate of the pretrained parameters (GPT-1: 6.25e-5).
        head_lr: Peak learning rate of the head and the special-token embeddings.
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


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """A ``.py`` file's ``get_config()`` plus ``field=value`` overrides, type-checked."""
    config = load_recipe(path, "get_config", FinetuneConfig, "fine-tune config")
    return apply_overrides(config, overrides)


def apply_overrides(config: FinetuneConfig, overrides: list[str] | tuple[str, ...]) -> FinetuneConfig:
    """Apply ``field=value`` (or ``finetune.field=value``); unknown keys and bad types are errors."""
    hints = typing.get_type_hints(FinetuneConfig)
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("finetune.")
        if not sep:
            raise GptjaxError(f"override {item!r} must look like field=value")
        if key not in hints:
            raise GptjaxError(f"unknown fine-tune config key {key!r}; fields: {', '.join(hints)}")
        changes[key] = _parse_value(key, raw, hints[key])
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------------------
# Model: the grown GPT and the head


class FinetuneState(NamedTuple):
    step: jax.Array  # () int32
    params: nnx.State  # the grown GPT
    head: dict  # {"w": (D, n_out), "b": (n_out,)}
    opt_state: optax.OptState
    rng: jax.Array  # (2,) uint32 key data


def grow_vocab(model: GPT, n_new: int, key: jax.Array) -> GPT:
    """The model with ``n_new`` embedding rows appended, initialised normal(0, 0.02)."""
    cfg = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + n_new)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(cfg, key=jax.random.key(0))))
    state = jax.tree.map(lambda x: x, nnx.state(model))  # a copy: the source model is untouched
    for name, k in zip(("wte", "lm_head"), jax.random.split(key), strict=True):
        if name in state:
            table = state[name][...]
            rows = 0.02 * jax.random.normal(k, (n_new, table.shape[1]), table.dtype)
            state[name] = state[name].replace(jnp.concatenate([table, rows]))
    return nnx.merge(graphdef, state)


def init_head(n_embd: int, n_out: int, key: jax.Array) -> dict:
    """The task head ``W (D, n_out)``, normal(0, 0.02), and zero bias ``b (n_out,)``."""
    return {"w": 0.02 * jax.random.normal(key, (n_embd, n_out), jnp.float32), "b": jnp.zeros((n_out,))}


def head_logits(model: GPT, head: dict, tokens: jax.Array, extract_at: jax.Array, task: str):
    """Task logits and hidden states.

    Args:
        tokens: (B, K, T) sequences: K = 1 (classification, entailment), 2 (similarity,
            both orders) or C choices.
        extract_at: (B, K) position of each sequence's extract token.

    Returns:
        ``(logits, hidden)``: logits (B, n_classes), or (B, C) choice scores for multiple
        choice; hidden (B * K, T, D).
    """
    b, k, t = tokens.shape
    hidden = model.hidden(tokens.reshape(b * k, t))  # (BK, T, D)
    at = jnp.take_along_axis(hidden, extract_at.reshape(b * k, 1, 1), axis=1)[:, 0]  # (BK, D)
    at = at.reshape(b, k, -1).astype(jnp.float32)
    if task == "similarity":
        at = at.sum(1, keepdims=True)
    scores = jnp.einsum("BKD,DO->BKO", at, head["w"]) + head["b"]
    logits = scores[..., 0] if task == "multiple_choice" else scores[:, 0]
    return logits, hidden


def make_loss_fn(graphdef: nnx.GraphDef, task: str, aux_lm_weight: float):
    """``(params, head, batch) -> (L3, (L2, L1, logits))``; L1 is 0 (not computed) when lambda is 0."""

    def loss_fn(params, head, batch):
        model = nnx.merge(graphdef, params)
        tokens, lengths, valid = batch["tokens"], batch["lengths"], batch["valid"]  # (B, K, T), (B, K) x2
        logits, hidden = head_logits(model, head, tokens, jnp.maximum(lengths - 1, 0), task)
        if task == "multiple_choice":
            logits = jnp.where(valid, logits, -1e9)
        task_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        lm_loss = jnp.zeros(())
        if aux_lm_weight > 0:
            t = tokens.shape[-1]
            lm_logits = model.logits(hidden[:, :-1])  # (BK, T-1, V)
            targets = tokens.reshape(-1, t)[:, 1:]
            weights = (jnp.arange(1, t)[None, :] < lengths.reshape(-1, 1)) & valid.reshape(-1, 1)
            nll = optax.softmax_cross_entropy_with_integer_labels(lm_logits, targets)
            lm_loss = (nll * weights).sum() / jnp.maximum(weights.sum(), 1)
        return task_loss + aux_lm_weight * lm_loss, (task_loss, lm_loss, logits)

    return loss_fn


def trainable_mask(params: nnx.State, step: jax.Array, cfg: FinetuneConfig, n_layer: int, base_vocab: int):
    """Which body entries may change at ``step`` (booleans broadcastable to each parameter).

    Frozen body: only the special-token rows. Gradual unfreezing: layer ``i`` trains once
    ``1 + step // unfreeze_every > n_layer - 1 - i`` (top first, with ln_f and an untied
    LM head); the embeddings once every layer does. The special-token rows always train.
    """
    if cfg.freeze_body:
        n_open = jnp.zeros((), jnp.int32)
    elif cfg.unfreeze_every:
        n_open = jnp.minimum(n_layer, 1 + step // cfg.unfreeze_every)
    else:
        n_open = jnp.full((), n_layer, jnp.int32)
    layer_open = jnp.arange(n_layer) >= n_layer - n_open  # (L,)

    def decide(path, leaf):
        name = str(getattr(path[0], "key", path[0]))
        if name == "h":
            return layer_open.reshape((n_layer,) + (1,) * (leaf.ndim - 1))
        if name in ("ln_f", "lm_head"):
            top = n_open > 0
            if name == "lm_head":
                return top | (jnp.arange(leaf.shape[0]) >= base_vocab)[:, None]
            return top
        all_open = n_open == n_layer
        if name == "wte":
            return all_open | (jnp.arange(leaf.shape[0]) >= base_vocab)[:, None]
        return all_open  # wpe

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: FinetuneConfig, total_steps: int, params: nnx.State, head: dict):
    """AdamW with its own schedule per group ("body", "head"), via ``optax.multi_transform``.

    Each schedule warms up linearly over 0.2% of the steps and decays linearly to 0 (GPT-1).
    """

    def adamw(peak, mask):
        warmup = max(1, round(0.002 * total_steps))
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup),
                optax.linear_schedule(peak, 0.0, total_steps - warmup),
            ],
            [warmup],
        )
        return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay, mask=mask)

    labels = {"body": jax.tree.map(lambda _: "body", params), "head": jax.tree.map(lambda _: "head", head)}
    decay = {"body": weight_decay_mask(params), "head": {"w": True, "b": False}}
    return optax.multi_transform(
        {"body": adamw(cfg.body_lr, decay), "head": adamw(cfg.head_lr, decay)}, labels
    )


def make_train_step(graphdef, optimizer, cfg: FinetuneConfig, n_layer: int, base_vocab: int, task: str):
    """``(state, batch) -> (state, metrics)``: a pure function, jitted by the caller."""
    loss_fn = make_loss_fn(graphdef, task, cfg.aux_lm_weight)
    grad_fn = jax.value_and_grad(lambda tr, batch: loss_fn(tr["body"], tr["head"], batch), has_aux=True)

    def train_step(state: FinetuneState, batch):
        trainable = {"body": state.params, "head": state.head}
        (loss, (task_loss, lm_loss, logits)), grads = grad_fn(trainable, batch)
        mask = trainable_mask(state.params, state.step, cfg, n_layer, base_vocab)
        grads["body"] = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads["body"], mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        # Frozen entries keep their exact bits (weight decay would move them otherwise).
        body = jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new["body"], state.params, mask)
        accuracy = (logits.argmax(-1) == batch["labels"]).mean()
        metrics = {"loss": loss, "task_loss": task_loss, "lm_loss": lm_loss, "accuracy": accuracy}
        return FinetuneState(state.step + 1, body, new["head"], opt_state, state.rng), metrics

    return train_step


def make_eval_step(graphdef, task: str):
    """``(params, head, batch) -> (summed task loss, correct count, predictions)`` over real rows."""
    loss_fn = make_loss_fn(graphdef, task, 0.0)

    def eval_step(params, head, batch):
        logits = loss_fn(params, head, batch)[1][2]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        w = batch["weight"]
        predictions = logits.argmax(-1)
        return (nll * w).sum(), ((predictions == batch["labels"]) * w).sum(), predictions

    return eval_step


# --------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    run_dir: Path
    best: dict[str, float]  # the kept checkpoint's validation metrics and step
    history: list[dict[str, float]]  # every validation
    steps: int
    seconds: float
    label_names: list[str]


def _evaluate(eval_step, params, head, arrays: dict, batch_size: int) -> dict[str, float]:
    total_nll = correct = 0.0
    n = len(arrays["labels"])
    for batch in fdata.batches(arrays, np.arange(n), batch_size, pad=True):
        nll, right, _ = eval_step(params, head, batch)
        total_nll, correct = total_nll + float(nll), correct + float(right)
    return {"val_loss": total_nll / n, "val_accuracy": correct / n}


def finetune(cfg: FinetuneConfig, *, log=print) -> FinetuneResult:
    """Fine-tune ``cfg.init_from`` on the task and keep the best checkpoint in ``cfg.run_dir``."""
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

    init_key, head_key, data_key, train_key = jax.random.split(jax.random.key(cfg.seed), 4)
    model = grow_vocab(pretrained, len(SPECIAL_TOKENS), init_key)
    model_config = dataclasses.replace(pre_config, model=model.config)
    n_out = 1 if cfg.task == "multiple_choice" else len(label_names)
    head = init_head(model.config.n_embd, n_out, head_key)
    graphdef, params = nnx.split(model)
    n_train = len(train_arrays["labels"])
    batch_size = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    total = (
        cfg.epochs * steps_per_epoch
        if not cfg.max_steps
        else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    )
    optimizer = make_optimizer(cfg, total, params, head)
    state = FinetuneState(
        jnp.zeros((), jnp.int32), params, head, optimizer.init({"body": params, "head": head}),
        jax.random.key_data(train_key),
    )  # fmt: skip
    n_layer = model.config.n_layer
    train_step = jax.jit(
        make_train_step(graphdef, optimizer, cfg, n_layer, base_vocab, cfg.task), donate_argnums=0
    )
    eval_step = jax.jit(make_eval_step(graphdef, cfg.task))

    run_dir = Path(cfg.run_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise GptjaxError(f"{str(run_dir)!r} already holds a fine-tune run: set run_dir= to a new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "finetune": dataclasses.asdict(cfg),
        "task": cfg.task,
        "special_tokens": special,
        "label_names": label_names,
        "seq_len": seq_len,
        "init_from": str(cfg.init_from),
    }
    meta = {"config": model_config.to_dict(), "tokenizer": tokenizer.name, **record}
    (run_dir / "config.json").write_text(model_config.to_json())
    ckpt = Checkpointer(run_dir / "checkpoints", keep=1)
    eval_every = cfg.eval_every or steps_per_epoch
    best, history, stale = {"score": (-math.inf,)}, [], 0
    data_rng = np.random.default_rng(int(jax.random.randint(data_key, (), 0, 2**31 - 1)))
    log(f"gptjax finetune: {cfg.task}, {n_train} train / {len(val_arrays['labels'])} val examples, "
        f"{total} steps, labels {label_names}")  # fmt: skip
    try:
        step = 0
        while step < total:
            order = data_rng.permutation(n_train)
            for batch in fdata.batches(train_arrays, order[: steps_per_epoch * batch_size], batch_size):
                state, metrics = train_step(state, batch)
                step += 1
                if step % eval_every and step != total:
                    continue
                ev = _evaluate(eval_step, state.params, state.head, val_arrays, batch_size)
                ev.update(step=step, train_loss=float(metrics["loss"]))
                history.append(ev)
                log("gptjax finetune: " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                # Ties in accuracy go to the lower loss.
                score = (
                    (ev["val_accuracy"], -ev["val_loss"]) if cfg.metric == "accuracy" else (-ev["val_loss"],)
                )
                if score > best["score"]:
                    best, stale = {**ev, "score": score}, 0
                    ckpt.save(step, state, {**meta, "step": step, "best": ev})
                else:
                    stale += 1
                if (cfg.patience and stale >= cfg.patience) or step >= total:
                    total = step  # early stop (or done)
                    break
        ckpt.wait()
    finally:
        ckpt.close()
    best.pop("score")
    seconds = time.perf_counter() - start
    (run_dir / "finetune.json").write_text(
        json.dumps({**record, "best": best, "history": history, "seconds": seconds}, indent=2)
    )
    return FinetuneResult(run_dir, best, history, step, seconds, label_names)


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
    """Load the kept (best) checkpoint of a fine-tune run."""
    from gptjax.runs import locate
    from gptjax.tokenizer import get_tokenizer

    directory, step = locate(run_dir)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        if "finetune" not in meta:
            raise GptjaxError(
                f"{str(run_dir)!r} is not a fine-tune run (no finetune record): use gptjax.load"
            )
        cfg = FinetuneConfig(**meta["finetune"])
        model_cfg = Config.from_dict(meta["config"]).model
        graphdef, params = nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, key=jax.random.key(0))))
        n_out = 1 if cfg.task == "multiple_choice" else len(meta["label_names"])
        head = jax.eval_shape(lambda: init_head(model_cfg.n_embd, n_out, jax.random.key(0)))
        optimizer = make_optimizer(cfg, 1, params, head)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        opt_state = jax.eval_shape(optimizer.init, {"body": params, "head": head})
        abstract = FinetuneState(
            jnp.zeros((), jnp.int32), params, head, opt_state, jnp.zeros((2,), jnp.uint32)
        )
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        state = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return Finetuned(
        nnx.merge(graphdef, state.params), state.head, cfg, meta, get_tokenizer(meta["tokenizer"])
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
