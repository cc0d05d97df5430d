"""Hugging Face GPT-2 interop against transformers' PyTorch GPT2LMHeadModel (random weights, no downloads)."""

import importlib
import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from gptjax import cli, interop, runs
from gptjax.config import ModelConfig, apply_overrides
from gptjax.errors import GptjaxError
from gptjax.model import GPT
from gptjax.sample import SamplingParams, generate
from gptjax.train import train


class _OnFirstUse:
    """A module imported when first used: every pytest process of the suite collects this
    file, and torch with transformers take 1.5-2 CPU-s to import (measured)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # pytest's collection probes names like __test__
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)


torch, transformers = _OnFirstUse("torch"), _OnFirstUse("transformers")
safetensors_torch = _OnFirstUse("safetensors.torch")
pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")),
    reason="the reference needs torch and transformers: pip install -e '.[test]'",
)

VOCAB = 50257  # GPT-2's, so that imported runs can record the gpt2 tokenizer
TOL = 1e-4  # max abs logit difference, fp32 (Levanter's rule for complex modules)


def _hf_model(directory, seed=0, vocab_size=VOCAB, **fields):
    """A randomly initialised GPT2LMHeadModel, saved to ``directory`` (model.safetensors)."""
    torch.manual_seed(seed)
    if vocab_size <= 50256:  # GPT2Config's end-of-text would lie outside the vocabulary
        fields.update(bos_token_id=None, eos_token_id=None)
    config = transformers.GPT2Config(vocab_size=vocab_size, **fields)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    return model


def _merge(config, params) -> GPT:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(config.model, key=jax.random.key(0))))
    return nnx.merge(graphdef, params)


def _ours(hf_dir) -> GPT:
    return _merge(*interop.from_hf(hf_dir))


def _hf_logits(model, tokens, mask=None) -> np.ndarray:
    with torch.no_grad():
        if mask is None:
            return model(torch.tensor(tokens)).logits.numpy()
        positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)  # HF's positions under left padding
        return model(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        ).logits.numpy()


def _max_abs(a, b) -> float:
    diff = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    print(f"max |ours - transformers| = {diff:.2e}")
    return diff


def _check_logits(hf, model, *, batch, seq, seed=0):
    """Ours == transformers' logits, on a full batch and on a left-padded one."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (batch, seq))
    assert _max_abs(model(jnp.asarray(tokens)), _hf_logits(hf, tokens)) < TOL
    # Left padding: rows start at different slots; only their real positions are compared.
    start = rng.integers(1, seq // 2, batch)
    start[0] = 0
    mask = np.arange(seq)[None, :] >= start[:, None]
    padded_logits, _ = model.decode(
        jnp.asarray(tokens), model.init_cache(batch, seq, start=jnp.asarray(start))
    )
    reference = _hf_logits(hf, tokens, mask)
    assert _max_abs(np.asarray(padded_logits)[mask], reference[mask]) < TOL


def _check_greedy(hf, model, prompts):
    """50 greedy tokens, ours (one left-padded batch) == transformers' generate (one prompt each)."""
    ours = generate(model, prompts, max_new_tokens=50, params=SamplingParams(temperature=0.0))
    # No end-of-text, so neither side stops early or masks a token.
    no_eos = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=50, eos_token_id=None, bos_token_id=None, pad_token_id=0
    )
    for prompt, tokens in zip(prompts, ours.tokens, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                generation_config=no_eos,
            )
        assert tokens == out[0, len(prompt) :].tolist()
        assert len(set(tokens)) > 5  # a varied continuation, not one repeated token


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """transformers on one thread: on a shared 2-core machine two threads spin-wait (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """GPT-2 layout at toy size; weights scaled up (0.2) so greedy continuations vary."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    return _hf_model(
        directory, n_embd=64, n_layer=2, n_head=4, n_positions=96, initializer_range=0.2
    ), directory


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    """Untied head, exact GELU, MLP of 2 x n_embd: the config fields GPT-2 can vary."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-untied"
    fields = dict(n_embd=48, n_layer=3, n_head=3, n_positions=64, n_inner=96, activation_function="gelu")
    return _hf_model(directory, seed=1, tie_word_embeddings=False, initializer_range=0.1, **fields), directory


# --------------------------------------------------------------------------------------
# 1-2. Logits and greedy generation


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_logits_match_transformers(which, request):
    hf, directory = request.getfixturevalue(which)
    _check_logits(hf, _ours(directory), batch=3, seq=48)


def test_greedy_generation_matches_transformers(tiny):
    hf, directory = tiny
    _check_greedy(hf, _ours(directory), [[1, 2, 3], [500, 7, 9000, 12, 5, 6, 7, 8, 9], [42]])


@pytest.mark.slow
def test_gpt2_small_logits_and_generation(tmp_path):
    """The 124M shape: 12 layers, 768 wide, 12 heads, 1024 positions.

    Weights are 2.5x GPT-2's init (0.05) so that greedy continuations vary (at 0.02 they
    repeat a token or two). Much larger ones make fp32 rounding itself reach the tolerance:
    at 0.1, transformers' own fp32 logits are 1.1e-4 from its fp64 ones.
    """
    fields = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, initializer_range=0.05)
    hf = _hf_model(tmp_path / "gpt2", **fields)
    model = _ours(tmp_path / "gpt2")
    _check_logits(hf, model, batch=2, seq=64)
    _check_greedy(hf, model, [[464, 2068, 7586, 21831], [15496, 11, 616, 1438, 318, 257, 1332, 13]])


# --------------------------------------------------------------------------------------
# 3. Round trips


def test_import_then_export_is_bitwise_and_loads(tiny_untied, tmp_path):
    hf, directory = tiny_untied
    interop.to_hf(_ours(directory), tmp_path / "out", eos_token_id=50256)
    original, exported = (
        load_file(directory / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    for key in original:
        assert original[key].dtype == exported[key].dtype and np.array_equal(original[key], exported[key]), (
            key
        )
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 32))
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(hf, tokens))


def test_export_of_our_model_gives_identical_logits(tmp_path):
    """A model GPT-2 writes with zero biases and an untied head; every tensor non-zero."""
    cfg = ModelConfig(
        vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False, tie_embeddings=False
    )
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, key=jax.random.key(0))))
    rng = np.random.default_rng(0)
    model = nnx.merge(
        graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype), abstract)
    )
    interop.to_hf(model, tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(0).integers(0, 300, (2, 32))
    assert _max_abs(model(jnp.asarray(tokens)), _hf_logits(hf, tokens)) < 1e-5


def test_rope_models_cannot_be_exported(tmp_path):
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, position="rope")
    model = nnx.eval_shape(lambda: GPT(cfg, key=jax.random.key(0)))
    with pytest.raises(GptjaxError, match="position='rope'.*learned"):
        interop.to_hf(model, tmp_path / "out")


def test_pytorch_bin_and_old_hub_names_import_the_same(tiny, tmp_path):
    hf, directory = tiny
    _, expected = interop.from_hf(directory)
    # pytorch_model.bin (read with torch), with the tied head saved too as torch does.
    (tmp_path / "bin").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, from_bin = interop.from_hf(tmp_path / "bin")
    # The original hub layout: no "transformer." prefix, attention-mask buffers saved too.
    tensors = {
        k.removeprefix("transformer."): v for k, v in load_file(directory / "model.safetensors").items()
    }
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 96, 96), np.float32))
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    (tmp_path / "old").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "old")
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"))
    _, from_old = interop.from_hf(tmp_path / "old")
    for params in (from_bin, from_old):
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)
    # bfloat16 weights (which numpy cannot hold) import as their exact float32 values.
    (tmp_path / "bf16").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "bf16")
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    safetensors_torch.save_file(bf16, str(tmp_path / "bf16" / "model.safetensors"), metadata={"format": "pt"})
    _, from_bf16 = interop.from_hf(tmp_path / "bf16")
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(from_bf16), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16), np.float32), b)


# --------------------------------------------------------------------------------------
# 4. Errors


def _copy(directory, target, *, config_changes=None, tensors=None):
    target.mkdir()
    config = json.loads((directory / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    if tensors is not None:
        save_file(tensors, str(target / "model.safetensors"))
    return target


def test_errors_for_directories_that_are_not_gpt2(tiny, tmp_path):
    _, directory = tiny
    tensors = load_file(directory / "model.safetensors")
    cases = {
        "llama": ({"model_type": "llama"}, tensors, r"'llama' model, not GPT-2"),
        "no-weights": ({}, None, r"has no weights: expected model.safetensors"),
        "narrow-wte": (
            {},
            {**tensors, "transformer.wte.weight": tensors["transformer.wte.weight"][:, :60]},
            r"'wte.weight'.*shape \(50257, 60\).*implies \(50257, 64\)",
        ),
        "fewer-positions": (
            {"n_positions": 32},
            tensors,
            r"'wpe.weight'.*shape \(96, 64\).*implies \(32, 64\)",
        ),
        "more-layers": ({"n_layer": 3}, tensors, r"no tensor 'h.2.attn.c_attn.weight'.*n_layer=3"),
        "fewer-layers": (
            {"n_layer": 1},
            tensors,
            r"tensors its config.json .*n_layer=1.* does not account for \(h.1.",
        ),
        "untied-no-head": ({"tie_word_embeddings": False}, tensors, r"no tensor 'lm_head.weight'"),
        "bad-activation": (
            {"activation_function": "relu"},
            tensors,
            r"activation_function 'relu' is not one of",
        ),
    }
    for name, (changes, weights, message) in cases.items():
        with pytest.raises(GptjaxError, match=message):
            interop.from_hf(_copy(directory, tmp_path / name, config_changes=changes, tensors=weights))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptjaxError, match="has no config.json"):
        interop.from_hf(tmp_path / "empty")


def test_hub_names_offline_say_how_to_use_a_local_copy(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GptjaxError, match=r"HF_HUB_OFFLINE is set.*--local-dir DIR\) and pass that DIR"):
        interop.from_hf("gptjax-tests/no-such-model")


# --------------------------------------------------------------------------------------
# 5. Tokenizer parity; CLI; fine-tuning from an import


def test_gpt2_tokenizer_matches_transformers(gpt2_tokenizer_available, shared_dir, tmp_path):
    # tiktoken's cache holds GPT-2's encoder.json and vocab.bpe under hashed names.
    for file in (shared_dir / "tiktoken-cache").iterdir():
        head = file.read_bytes()[:16]
        if head.startswith(b"{"):
            shutil.copy(file, tmp_path / "vocab.json")
        elif head.startswith(b"#version"):
            shutil.copy(file, tmp_path / "merges.txt")
    if not (tmp_path / "vocab.json").is_file() or not (tmp_path / "merges.txt").is_file():
        pytest.skip("../shared/tiktoken-cache lacks GPT-2's encoder.json / vocab.bpe")
    reference = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    from gptjax.tokenizer import get_tokenizer

    ours = get_tokenizer("gpt2")
    samples = [
        "Hello, world! It's 3:14pm — naïve café, Straße, ångström.",
        "日本語のテキストと中文文本，한국어 문장, русский текст, العربية, हिन्दी",
        "Emoji: 😀🎉👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇯🇵 and a ZWJ\u200dsequence",
        "def f(x):\n\treturn {'a': [1, 2.5e-3, None]}  # comment\n\n    if x != 0x1F:\n        pass\r\n",
        "   leading and  double  spaces\n\n\ntrailing   ",
    ]
    for text in samples:
        assert ours.encode(text) == reference(text)["input_ids"], text
    assert ours.encode_batch(samples) == [reference(t)["input_ids"] for t in samples]


def test_cli_import_sample_export(tiny, tmp_path, gpt2_tokenizer_available, capsys):
    hf, directory = tiny
    assert cli.main(["import-hf", str(directory), str(tmp_path / "run")]) == 0
    model, config, tokenizer = runs.load(tmp_path / "run")
    assert tokenizer.name == "gpt2" and config.name == "tiny-gpt2" and config.model.block_size == 96
    out = generate(
        model, ["Hello there"], max_new_tokens=8, params=SamplingParams(temperature=0.0), tokenizer=tokenizer
    )
    prompt = tokenizer.encode("Hello there")
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1].argmax().item()
    assert out.tokens[0][0] == expected
    assert (
        cli.main(["sample", str(tmp_path / "run"), "--prompt", "Hi", "--max-new-tokens", "4", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"][0]["prompt"] == "Hi"
    assert cli.main(["export-hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    original, exported = (
        load_file(directory / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == 50256
    assert "AutoTokenizer loads its tokenizer" in capsys.readouterr().out
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert exported_tokenizer("Hello there")["input_ids"] == prompt
    assert exported_tokenizer.model_max_length == 96
    assert cli.main(["import-hf", str(tmp_path / "missing"), str(tmp_path / "run2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_training_starts_from_the_imported_weights(tmp_path, monkeypatch):
    """Fine-tuning from an import (a byte-level model here: a 50k vocabulary is slow to train on CPU)."""
    directory = tmp_path / "hf-bytes"
    _hf_model(
        directory, vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=32, initializer_range=0.1
    )
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "text").mkdir()
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import"]
    rng = np.random.default_rng(0)
    for i in range(20):
        (tmp_path / "text" / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 200)) + "\n")
    run = interop.import_hf(directory, tmp_path / "imported", tokenizer="bytes")
    recipe, _ = runs.read_config(run)
    config = apply_overrides(
        recipe,
        [
            f"data.source={tmp_path / 'text'}",
            "data.val_fraction=0.1",
            f"train.init_from={run}",
            f"train.run_dir={tmp_path / 'finetune'}",
            "train.steps=1",
            "train.batch_size=8",
            "train.eval_max_batches=1",
            "optim.warmup_steps=1",
            "sample.max_new_tokens=2",
            "sample.num_samples=1",
        ],
    )
    result = train(config)
    # Warmup makes step 0's learning rate 0, so the parameters after the one update are
    # the ones it started from: the imported weights, not a fresh initialisation.
    rows = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [0.0]
    _, imported = interop.from_hf(directory, tokenizer="bytes")
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(result.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
