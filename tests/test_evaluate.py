"""gptjax eval (LM metrics, multiple choice) and gptjax attention on a tiny trained model."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import load
from gptjax.attention_maps import attention_maps
from gptjax.cli import main
from gptjax.config import MeshConfig, load_config
from gptjax.data import eval_batches, load_dataset
from gptjax.errors import GptjaxError
from gptjax.evaluate import few_shot_prefix, lm_metrics, read_multiple_choice, score_multiple_choice
from gptjax.sharding import make_mesh
from gptjax.train import train

LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def _word(rng, n=5):
    return "".join(rng.choice(LETTERS, n))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """20 facts ``<name> eats <food>.``, a model trained on them, and two question splits."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    facts = [(_word(rng), _word(rng)) for _ in range(20)]
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        order = rng.permutation(len(facts))
        lines = [f"{facts[j][0]} eats {facts[j][1]}." for _ in range(6) for j in order]
        (corpus / f"{i}.txt").write_text("\n".join(lines) + "\n")
    cache = root / "cache"
    overrides = [f"data.source={corpus}", "data.val_fraction=0.2", "train.steps=200", "train.batch_size=16"]
    overrides += [
        "train.eval_every=0",
        "train.eval_max_batches=2",
        "optim.lr=3e-3",
        "train.checkpoint_every=0",
    ]
    overrides += [f"data.cache_dir={cache}", "optim.warmup_steps=10", "sample.num_samples=1"]
    config = load_config("nano", [*overrides, f"train.run_dir={root / 'run'}"])
    train(config, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    questions = []
    for name, food in facts:  # the food seen in training against three unseen words
        choices = [food, _word(rng), _word(rng), _word(rng)]
        order = rng.permutation(4)
        questions.append({"context": f"{name} eats", "choices": [choices[k] for k in order],
                          "label": int(np.argmax(order == 0))})  # fmt: skip
    for split, rows in (("shots", questions[:8]), ("test", questions[8:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "run": root / "run", "data": config.data}


def test_perplexity_and_bits_per_byte_match_a_hand_computation(world):
    model, config, _ = load(world["run"])
    metrics = lm_metrics(model, world["data"], split="val", batch_size=4)
    dataset = load_dataset(world["data"], seq_len=64, vocab_size=257)
    total, count = 0.0, 0
    for tokens, weights in eval_batches(dataset.val, seq_len=64, batch_size=4):
        logits = np.asarray(model(jnp.asarray(tokens[:, :-1])), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        logp -= logits.max(-1, keepdims=True)
        nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        total += float((nll * weights).sum())
        count += int(weights.sum())
    assert count == len(dataset.val) - 1 == metrics["tokens"]
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Bytes of the held-out text, counted independently: every byte token except end-of-text.
    n_bytes = int((np.asarray(dataset.val) != 256).sum())
    assert metrics["bytes"] == n_bytes == dataset.meta["bytes"]["val"]
    assert metrics["bits_per_byte"] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-5)
    assert metrics["loss"] < 2.0  # it learned something


def test_multiple_choice_scores_far_above_chance(world):
    model, _, tokenizer = load(world["run"])
    rows = read_multiple_choice(world["root"] / "test.jsonl")
    result = score_multiple_choice(model, tokenizer, rows)
    assert result["n"] == 12 and result["chance"] == 0.25
    assert result["accuracy"] >= 0.75 and result["accuracy_norm"] >= 0.75, result
    assert result["accuracy_stderr"] == pytest.approx(
        math.sqrt(result["accuracy"] * (1 - result["accuracy"]) / 12)
    )


def test_few_shot_prompt_has_exactly_k_examples_from_the_other_split(world):
    pool = read_multiple_choice(world["root"] / "shots.jsonl")
    rows = read_multiple_choice(world["root"] / "test.jsonl")
    shots = {f"{r['context']} {r['choices'][r['label']]}" for r in pool}
    tested = {r["context"] for r in rows}
    for index in range(len(rows)):
        prefix = few_shot_prefix(pool, 3, index, seed=1)
        examples = prefix.split("\n\n")
        assert examples[-1] == "" and len(examples) == 4
        assert set(examples[:3]) <= shots and len(set(examples[:3])) == 3
        assert not any(e.rsplit(" ", 1)[0] in tested for e in examples[:3])
        assert prefix == few_shot_prefix(pool, 3, index, seed=1)  # deterministic
    assert few_shot_prefix(pool, 0, 0) == ""
    model, _, tokenizer = load(world["run"])
    result = score_multiple_choice(model, tokenizer, rows, shots=2, shot_pool=pool)
    assert result["shots"] == 2 and result["accuracy"] >= 0.5
    with pytest.raises(GptjaxError, match="needs --shots-from"):
        score_multiple_choice(model, tokenizer, rows, shots=2)


def test_cli_eval_json(world, capsys):
    root = world["root"]
    args = ["eval", str(world["run"]), "--data", world["data"].source, "--task", str(root / "test.jsonl")]
    assert main([*args, "--shots", "1", "--shots-from", str(root / "shots.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lm"]["bits_per_byte"] > 0 and result["multiple_choice"]["shots"] == 1
    assert main(args[:2] + args[4:]) == 0
    assert "accuracy, per byte" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"context": "a", "choices": ["only"], "label": 0}, "line 1: choices must be a list of at least 2"),
        ({"context": "a", "choices": ["x", "y"], "label": "z"}, "line 1: label 'z' is neither a choice"),
        ({"choices": ["x", "y"], "label": 0}, "line 1 has no 'context' field"),
    ],
)
def test_bad_task_rows(tmp_path, row, message):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(GptjaxError, match=message):
        read_multiple_choice(path)


def test_attention_maps_are_causal_distributions_from_the_forward_pass(world, tmp_path, capsys):
    model, _, _ = load(world["run"])
    out = tmp_path / "attn.png"
    maps = attention_maps(world["run"], "abcde eats fghij.", layer=1, out=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out).ndim == 3
    n, t, _ = maps.probs.shape
    assert (n, t) == (2, 17) and maps.labels[5] == "␣"
    assert np.all(np.triu(maps.probs, k=1) == 0)
    np.testing.assert_allclose(maps.probs.sum(-1), 1.0, rtol=1e-5)
    # The map is the model's own forward pass (tests/test_model.py checks that against a manual softmax).
    tokens = jnp.asarray([list(b"abcde eats fghij.")], jnp.int32)
    np.testing.assert_array_equal(maps.probs, model(tokens, attention=True)[1][1, 0])
    assert main(["attention", str(world["run"]), "--prompt", "ab", "--layer", "0", "--out", str(out)]) == 0
    assert main(["attention", str(world["run"]), "--prompt", "ab", "--layer", "5", "--out", str(out)]) == 2
    assert "layer 5 does not exist" in capsys.readouterr().err
