"""GPT-1 fine-tuning from a pretrained run: the keyword tasks, freezing, L1, unfreezing, bad input."""

import dataclasses
import fcntl
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import load
from gptjax.cli import main
from gptjax.config import MODEL_PRESETS, MeshConfig, load_config
from gptjax.errors import GptjaxError
from gptjax.finetune import (
    FinetuneConfig,
    _optim,
    apply_overrides,
    finetune,
    grow_vocab,
    init_head,
    load_finetuned,
    make_loss_fn,
    make_optimizer,
    peak_lrs,
    predict,
    trainable_mask,
)
from gptjax.finetune_data import encode, pad_to, read_examples
from gptjax.launch import with_cpu_devices
from gptjax.model import GPT
from gptjax.optim import lr_schedule
from gptjax.sharding import make_mesh
from gptjax.tokenizer import ByteTokenizer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "finetune_keywords.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("finetune_keywords_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrained(suite_dir):
    """A nano byte-level model pretrained for 120 steps on text like the tasks' (~15 s),
    once per test run (the multidevice process reuses it)."""
    root = suite_dir / "finetune-pretrain"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # the multidevice process runs beside this one
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "run" / "result.json").is_file():
            _pretrain(root)
    return root / "run"


def _pretrain(root: Path) -> None:
    """``gptjax train`` in a process of its own on one CPU device: the weights do not depend on
    which pytest process got here first. (Trained in the 8-device process, the same run
    ends 3.6e-4 away, and the entailment test's seed-dependent plateau then ends elsewhere.)"""
    recipe = _recipe()
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        lines = [recipe._sentence(rng, str(rng.choice(["APPLE", "ZEBRA", "the"]))) for _ in range(200)]
        (corpus / f"{i}.txt").write_text("\n".join(lines))
    overrides = [f"data.source={corpus}", "data.val_fraction=0.1", "train.steps=120", "train.batch_size=16"]
    overrides += [
        "train.eval_every=0",
        "train.eval_max_batches=2",
        "optim.lr=3e-3",
        "train.checkpoint_every=0",
    ]
    overrides += ["optim.warmup_steps=10", "sample.num_samples=0", f"train.run_dir={root / 'run'}"]
    env = {
        **os.environ,
        "GPTJAX_CACHE_DIR": str(root / "cache"),
        "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1),
    }
    run = subprocess.run(
        [sys.executable, "-m", "gptjax.cli", "train", "nano", *overrides],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return _recipe().write_keyword_tasks(tmp_path_factory.mktemp("tasks"), n_train=400, n_val=100)


@pytest.fixture(scope="module")
def short_tasks(tmp_path_factory):
    """The same tasks with two random words beside the keyword instead of six."""
    return _recipe().write_keyword_tasks(tmp_path_factory.mktemp("short"), n_train=400, n_val=100, n_words=2)


def _config(pretrained, tasks, run_dir, files="cls", **fields):
    return FinetuneConfig(
        init_from=str(pretrained),
        train_file=str(tasks / f"{files}_train.jsonl"),
        val_file=str(tasks / f"{files}_val.jsonl"),
        batch_size=16,
        eval_every=25,
        run_dir=str(run_dir),
        **fields,
    )


def test_keyword_classification_reaches_95_percent(pretrained, tasks, tmp_path):
    cfg = _config(pretrained, tasks, tmp_path / "ft", body_lr=1e-3, head_lr=3e-3, epochs=2)
    result = finetune(cfg, log=lambda _: None)
    assert result.best["val_accuracy"] >= 0.95, result.history
    assert result.label_names == ["animal", "fruit"]
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["special_tokens"] == {"start": 257, "delim": 258, "extract": 259}
    assert record["label_names"] == ["animal", "fruit"]
    # The kept checkpoint is the best one, and it predicts as well as it validated.
    loaded = load_finetuned(tmp_path / "ft")
    assert loaded.model.config.vocab_size == 260
    assert predict(loaded, tasks / "cls_val.jsonl")["accuracy"] == pytest.approx(result.best["val_accuracy"])
    # The grown GPT alone is a run that gptjax.load (and so sample/eval/attention) accepts.
    model, config, _ = load(tmp_path / "ft")
    assert config.model.vocab_size == 260 and model.wte[...].shape == (260, 32)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "files", "body_lr", "epochs", "data"),
    [("multiple_choice", "mc", 3e-3, 6, "tasks"), ("entailment", "entail", 1e-2, 15, "short_tasks")],
)
def test_other_framings_train_well_above_chance(
    pretrained, tmp_path, request, task, files, body_lr, epochs, data
):
    """Entailment here is an XOR (keyword in the premise vs the claimed kind): the classifier
    needs both segments. On six-word premises the nano model leaves its chance plateau after
    a wait that depends on the seed and on the pretrained weights, which differ between
    machines' XLA builds (measured, 15 epochs, seeds 0-3: 1.0, 0.74, 0.99, 0.61 on one
    machine, seed 1 1.0 on another; 30 epochs: 2 of 4 seeds). On two-word premises seeds 0-7
    all reached 0.98-1.0, first >= 0.8 at steps 125-275 of 375; the test runs seed 0.
    Dropout is off as these numbers were measured without it: with GPT-1's 0.1 the nano
    model stays at chance for 6 multiple-choice epochs (measured: 0.5 after 150 steps; 1.0
    at step 125 without dropout)."""
    cfg = _config(
        pretrained, request.getfixturevalue(data), tmp_path / "ft", files, task=task, body_lr=body_lr,
        head_lr=1e-2, epochs=epochs, dropout=0.0,
    )  # fmt: skip
    result = finetune(cfg, log=lambda _: None)
    assert result.best["val_accuracy"] >= 0.8, result.history  # chance is 0.5


def test_frozen_body_is_bit_identical(pretrained, tasks, tmp_path):
    # Similarity (both orders summed) on the entailment pairs, body frozen.
    cfg = _config(pretrained, tasks, tmp_path / "ft", "entail", task="similarity", freeze_body=True)
    cfg = dataclasses.replace(cfg, max_steps=6, eval_every=3, head_lr=1e-2, body_lr=1e-2)
    finetune(cfg, log=lambda _: None)
    before = nnx.state(load(pretrained).model)
    tuned = load_finetuned(tmp_path / "ft")
    after = nnx.state(tuned.model)
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    flat_after = dict(jax.tree_util.tree_flatten_with_path(after)[0])
    assert flat_before.keys() == flat_after.keys()
    for path, old in flat_before.items():
        new = np.asarray(flat_after[path])
        if "wte" in jax.tree_util.keystr(path):
            assert new.shape[0] == old.shape[0] + 3
            new = new[: old.shape[0]]  # the special-token rows are new and train
        np.testing.assert_array_equal(new, np.asarray(old), err_msg=jax.tree_util.keystr(path))
    head0 = init_head(32, 2, jax.random.split(jax.random.key(cfg.seed), 4)[1])  # finetune's head key
    assert not np.array_equal(np.asarray(tuned.head["w"]), np.asarray(head0["w"]))


def _batch(cfg, n_layer=2):
    rows = read_examples(cfg.train_file, cfg)[:4]
    special = {"start": 257, "delim": 258, "extract": 259}
    arrays = pad_to(encode(rows, cfg, ByteTokenizer(), special, ["animal", "fruit"], 64), 64)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def test_aux_lm_loss_reaches_the_lm_head_only_when_lambda_is_positive(tasks, tmp_path):
    model_cfg = dataclasses.replace(MODEL_PRESETS["nano"], tie_embeddings=False)
    model = grow_vocab(GPT(model_cfg, key=jax.random.key(0)), 3, jax.random.key(1))
    graphdef, params = nnx.split(model)
    head = init_head(32, 2, jax.random.key(2))
    batch = _batch(_config("unused", tasks, tmp_path))
    results = {}
    for lam in (0.0, 0.5):
        loss_fn = make_loss_fn(graphdef, "classification", lam)
        (loss, (task_loss, lm_loss, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            params, head, batch
        )
        results[lam] = (loss, task_loss, lm_loss, np.asarray(grads["lm_head"][...]))
    loss, task_loss, lm_loss, lm_head_grad = results[0.0]
    assert float(lm_loss) == 0.0 and float(loss) == float(task_loss)
    assert not lm_head_grad.any()
    loss, task_loss, lm_loss, lm_head_grad = results[0.5]
    assert float(loss) == pytest.approx(float(task_loss) + 0.5 * float(lm_loss), rel=1e-6)
    assert 3.0 < float(lm_loss) < 8.0  # an untrained model's NLL over 260 tokens is near ln 260
    assert np.abs(lm_head_grad).sum() > 0


def test_gradual_unfreezing_opens_layers_from_the_top(tasks, tmp_path):
    model_cfg = dataclasses.replace(MODEL_PRESETS["nano"], n_layer=3, tie_embeddings=False, vocab_size=260)
    params = nnx.state(nnx.eval_shape(lambda: GPT(model_cfg, key=jax.random.key(0))))  # shapes suffice
    cfg = FinetuneConfig(unfreeze_every=10)

    def opened(step, config=cfg):
        mask = trainable_mask(params, jnp.asarray(step), config, 3, 257)
        layers = np.asarray(mask["h"]["attn"]["c_attn"][...]).ravel().tolist()
        wte = np.asarray(mask["wte"][...]).ravel()
        return layers, bool(mask["ln_f"]["scale"][...]), bool(wte[:257].all()), bool(wte[257:].all())

    assert opened(0) == ([False, False, True], True, False, True)
    assert opened(9) == ([False, False, True], True, False, True)
    assert opened(10) == ([False, True, True], True, False, True)
    assert opened(20) == ([True, True, True], True, True, True)
    frozen = FinetuneConfig(freeze_body=True)
    assert opened(100, frozen) == ([False, False, False], False, False, True)
    assert opened(0, FinetuneConfig()) == ([True, True, True], True, True, True)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("task", "train_rows", "val_rows", "message"),
    [
        ("classification", [{"text": "a b", "kind": "x"}], None,
         r"cls_train.jsonl line 1 has no column 'label'"),
        ("classification", None, [{"text": "a", "label": "fruit"}, {"text": "b", "label": "vegetable"}],
         r"bad_val.jsonl line 2: unknown label 'vegetable'"),
        ("multiple_choice", [{"text": "a", "choices": ["x", "y"], "label": 0},
                             {"text": "b", "choices": ["only"], "label": 0}], None,
         r"bad_train.jsonl line 2: a multiple-choice row needs a list of at least 2 choices"),
        ("classification", [{"text": "a", "label": "fruit"}, {"text": "b", "label": "animal"},
                            {"text": "c" * 70, "label": "fruit"}], None,
         r"bad_train.jsonl line 3: the framed sequence has 72 tokens, more than the context \(64\)"),
    ],
)  # fmt: skip
def test_bad_input_is_reported_with_its_row(pretrained, tasks, tmp_path, task, train_rows, val_rows, message):
    train = (
        tasks / "cls_train.jsonl" if train_rows is None else _write(tmp_path / "bad_train.jsonl", train_rows)
    )
    if train_rows and "kind" in train_rows[0]:
        train = _write(tmp_path / "cls_train.jsonl", train_rows)
    val = tasks / "cls_val.jsonl" if val_rows is None else _write(tmp_path / "bad_val.jsonl", val_rows)
    cfg = FinetuneConfig(
        init_from=str(pretrained),
        task=task,
        train_file=str(train),
        val_file=str(val),
        run_dir=str(tmp_path / "ft"),
    )
    with pytest.raises(GptjaxError, match=message):
        finetune(cfg, log=lambda _: None)


def test_overrides_are_type_checked():
    cfg = apply_overrides(FinetuneConfig(), ["body_lr=1e-4", "freeze_body=true", "finetune.task=similarity"])
    assert (cfg.body_lr, cfg.freeze_body, cfg.task) == (1e-4, True, "similarity")
    with pytest.raises(GptjaxError, match="unknown fine-tune config key 'lamda'"):
        apply_overrides(FinetuneConfig(), ["lamda=0.5"])
    with pytest.raises(GptjaxError, match="epochs='two' is not an integer"):
        apply_overrides(FinetuneConfig(), ["epochs=two"])
    with pytest.raises(GptjaxError, match="task"):
        apply_overrides(FinetuneConfig(), ["task=regression"])


def test_cli_runs_the_recipe(pretrained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe writes data/keywords here
    args = ["finetune", str(RECIPE), f"init_from={pretrained}", "max_steps=4", "eval_every=2", "run_dir=ft"]
    assert main(args) == 0
    assert "gptjax finetune: best val_loss=" in capsys.readouterr().out
    assert (tmp_path / "data" / "keywords" / "cls_train.jsonl").exists()
    assert main(["finetune", str(RECIPE), "bogus=1"]) == 2
    assert "unknown fine-tune config key 'bogus'" in capsys.readouterr().err
    assert main(["finetune", str(RECIPE), f"init_from={pretrained}", "run_dir=ft"]) == 2  # no overwriting


# --------------------------------------------------------------------------------------
# The recipe: rates, Adam counts, dropout, the gpt1 preset (unit level: no training)


def _grown_params(n_layer=3):
    nano = MODEL_PRESETS["nano"]
    model_cfg = dataclasses.replace(nano, n_layer=n_layer, tie_embeddings=False, vocab_size=260)
    return nnx.state(GPT(model_cfg, key=jax.random.key(0))), init_head(32, 2, jax.random.key(1))


def _updates(cfg, params, head, steps, total=1000):
    """Per step, the update each parameter got from constant unit gradients."""
    optimizer = make_optimizer(cfg, total, params, head)
    state = optimizer.init((params, head))
    grads = jax.tree.map(jnp.ones_like, (params, head))
    update = jax.jit(optimizer.update)
    out = []
    for _ in range(steps):
        updates, state = update(grads, state, (params, head))
        out.append(updates)
    return out


def test_new_embedding_rows_train_at_the_head_rate():
    params, head = _grown_params()
    cfg = FinetuneConfig(freeze_body=True, body_lr=1e-6, head_lr=1e-2, weight_decay=0.0)
    (body, head_update) = _updates(cfg, params, head, 3)[-1]  # after the 2-step warmup: factor ~1
    wte = np.abs(np.asarray(body["wte"][...]))
    assert wte[257:].min() > 0.9e-2 and wte[:257].max() == 0  # special rows at head_lr; body frozen
    assert np.abs(np.asarray(head_update["w"])).min() > 0.9e-2
    assert not np.abs(np.asarray(body["h"]["attn"]["c_attn"][...])).any()


def test_gradual_unfreezing_gives_each_layer_its_own_adam_count():
    """A layer opened at step 5 makes Adam's first step (|update| = lr) then, not 1/sqrt(1-b2^6) times it."""
    params, head = _grown_params()
    cfg = FinetuneConfig(unfreeze_every=5, body_lr=1e-3, head_lr=1e-3, weight_decay=0.0)
    updates = _updates(cfg, params, head, 6)
    lr = [float(lr_schedule(_optim(cfg, 1000), 1000)(s)) for s in range(6)]
    layers = [np.abs(np.asarray(u[0]["h"]["mlp"]["c_fc"][...])).reshape(3, -1) for u in updates]
    assert not layers[4][1].any()  # the middle layer is closed until step 5
    np.testing.assert_allclose(layers[5][1], lr[5], rtol=1e-5)  # its first step: exactly lr
    np.testing.assert_allclose(layers[5][2], lr[5], rtol=1e-5)  # the top layer, 6 steps in
    assert not layers[5][0].any()


def test_discriminative_rates_per_layer():
    params, head = _grown_params()
    cfg = FinetuneConfig(body_lr=1e-3, head_lr=5e-3, layer_lr_decay=2.6, weight_decay=0.0)
    lrs = peak_lrs(params, cfg, 3, 257)
    per_layer = np.asarray(lrs["h"]["attn"]["c_attn"][...]).ravel()
    np.testing.assert_allclose(per_layer, [1e-3 / 2.6**2, 1e-3 / 2.6, 1e-3], rtol=1e-6)  # float32
    wte = np.asarray(lrs["wte"][...]).ravel()
    np.testing.assert_allclose(wte[[0, 256, 257, 259]], [1e-3 / 2.6**3] * 2 + [5e-3] * 2, rtol=1e-6)
    assert float(lrs["ln_f"]["scale"][...]) == pytest.approx(1e-3, rel=1e-6)
    # And the optimizer applies them: constant gradients, one open step after warmup.
    body = _updates(cfg, params, head, 3)[-1][0]
    per_layer = np.abs(np.asarray(body["h"]["mlp"]["c_fc"][...])).reshape(3, -1).max(1)
    np.testing.assert_allclose(per_layer[:2] / per_layer[1:], 1 / 2.6, rtol=1e-5)


def test_dropout_reaches_the_body_and_the_classifier(tasks, tmp_path):
    assert FinetuneConfig().dropout == 0.1  # GPT-1's
    model_cfg = dataclasses.replace(MODEL_PRESETS["nano"], vocab_size=260)  # no body dropout here
    graphdef, params = nnx.split(GPT(model_cfg, key=jax.random.key(0)))
    head = init_head(32, 2, jax.random.key(2))
    batch = _batch(_config("unused", tasks, tmp_path))
    loss_fn = make_loss_fn(graphdef, "classification", 0.0, dropout=0.5)
    logits = [loss_fn(params, head, batch, k)[1][2] for k in (None, jax.random.key(1))]
    assert not np.allclose(np.asarray(logits[0]), np.asarray(logits[1]))  # the classifier's input
    no_drop = make_loss_fn(graphdef, "classification", 0.0, dropout=0.0)
    np.testing.assert_array_equal(no_drop(params, head, batch, jax.random.key(1))[1][2], logits[0])


def test_gpt1_preset_carries_the_gpt1_recipe():
    config = load_config("gpt1")
    m, o, t = config.model, config.optim, config.train
    assert (m.embd_dropout, m.attn_dropout, m.resid_dropout) == (0.1, 0.1, 0.1)
    assert (m.n_layer, m.n_embd, m.block_size, m.activation) == (12, 768, 512, "gelu")
    assert (o.lr, o.beta2, o.weight_decay, o.warmup_steps, o.schedule, o.min_lr) == (
        2.5e-4,
        0.999,
        0.01,
        2000,
        "cosine",
        0.0,
    )
    assert t.batch_size == 64


# --------------------------------------------------------------------------------------
# On the trainer: sharding, resume, preemption, skipped steps


def _short(pretrained, tasks, run_dir, **fields):
    cfg = _config(pretrained, tasks, run_dir, max_steps=6, body_lr=1e-3, head_lr=3e-3)
    return dataclasses.replace(cfg, **{"eval_every": 3, **fields})


@pytest.mark.multidevice
def test_finetune_on_8_devices_matches_one_device(pretrained, tasks, tmp_path):
    one = finetune(_short(pretrained, tasks, tmp_path / "one"), log=lambda _: None, mesh=_one_device())
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))  # the 8 fake CPU devices
    eight = finetune(_short(pretrained, tasks, tmp_path / "eight"), log=lambda _: None, mesh=mesh)
    c_fc = eight.state.params["h"]["mlp"]["c_fc"][...]
    assert len(c_fc.sharding.device_set) == 8 and "fsdp" in str(c_fc.sharding.spec)
    assert [h["val_loss"] for h in eight.history] == pytest.approx(
        [h["val_loss"] for h in one.history], rel=1e-5
    )
    # The key bias is left out: softmax is invariant to it, so its true gradient is 0 and Adam
    # turns float noise of 1e-9 into +-lr steps differently on each mesh (test_train_step).
    flat_one = jax.tree_util.tree_flatten_with_path((one.state.params, one.state.head))[0]
    for (path, a), b in zip(flat_one, jax.tree.leaves((eight.state.params, eight.state.head)), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if "c_attn_bias" in jax.tree_util.keystr(path):
            a, b = a[:, [0, 2]], b[:, [0, 2]]  # (L, q/k/v, N, H): queries and values
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_finetune_sigterm_saves_and_resumes_bitwise(pretrained, tasks, tmp_path):
    import os
    import signal

    whole = finetune(_short(pretrained, tasks, tmp_path / "whole"), log=lambda _: None, mesh=_one_device())

    def preempt(step, batch):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the step in flight finishes, is saved, returns
        return batch

    cfg = _short(pretrained, tasks, tmp_path / "cut")
    cut = finetune(cfg, log=lambda _: None, mesh=_one_device(), batch_hook=preempt)
    assert cut.interrupted and cut.steps == 2
    resumed = finetune(cfg, log=lambda _: None, mesh=_one_device())
    assert resumed.steps == 6 and not resumed.interrupted
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["step"] for h in resumed.history] == [3, 6] and resumed.best == whole.best


def test_finetune_skips_a_non_finite_step(pretrained, tasks, tmp_path):
    def poison(step, batch):
        if step == 1:
            batch = {**batch, "tokens": batch["tokens"].copy()}
            batch["tokens"][0, 0, 0] = 10**6  # gathers NaN from the embedding (as corrupt data would)
        return batch

    cfg = _short(pretrained, tasks, tmp_path / "ft", max_steps=3, eval_every=3)
    result = finetune(cfg, log=lambda _: None, mesh=_one_device(), batch_hook=poison)
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped"], r["skipped_total"]) for r in rows if "skipped" in r] == [(0, 1)]  # step 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))
    assert np.isfinite(result.best["val_loss"])


def _one_device():
    return make_mesh(MeshConfig(), jax.devices()[:1])
