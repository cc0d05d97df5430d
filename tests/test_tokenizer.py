"""Tokenizers: round trips, known ids, batch encoding and the offline error."""

import json
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptjax.errors import GptjaxError
from gptjax.tokenizer import TIKTOKEN_ENCODINGS, ByteTokenizer, get_tokenizer, known_vocab_size

TEXTS = ["Hello world", "", " leading and trailing ", "naïve café — 日本語 🙂", "a\nb\r\n\tc", "x" * 1000]


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_available):
    return get_tokenizer("gpt2")


@given(st.text())
def test_bytes_round_trip(text):
    tokenizer = get_tokenizer("bytes")
    tokens = tokenizer.encode(text)
    assert all(0 <= t < 256 for t in tokens)
    assert len(tokens) == len(text.encode("utf-8"))
    assert tokenizer.decode(tokens) == text


@settings(deadline=None)  # the first example pays for loading the vocabulary
@given(text=st.text())
def test_gpt2_round_trip(gpt2, text):
    tokens = gpt2.encode(text)
    assert all(0 <= t < gpt2.eot_id for t in tokens)  # encode never emits end-of-text
    assert gpt2.decode(tokens) == text


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert (gpt2.name, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
    assert known_vocab_size("gpt2") == gpt2.vocab_size
    # Special-token text is ordinary text, not end-of-text (documents cannot inject it).
    assert gpt2.eot_id not in gpt2.encode("<|endoftext|>")
    assert gpt2.decode([15496, gpt2.eot_id, 995]) == "Hello<|endoftext|> world"
    assert gpt2.decode([15496, gpt2.vocab_size, -1, 995]) == "Hello world"  # out-of-range ids are dropped


def test_bytes_tokenizer_ids():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eot_id) == (257, 256)
    assert known_vocab_size("bytes") == 257
    assert tokenizer.encode("é") == [0xC3, 0xA9]
    assert tokenizer.decode([104, 256, 105]) == "hi"  # end-of-text is dropped
    assert tokenizer.decode([0xC3]) == "\ufffd"  # a broken UTF-8 sequence is replaced


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
def test_encode_batch_equals_encode(name, request):
    if name == "gpt2":
        request.getfixturevalue("gpt2_tokenizer_available")
    tokenizer = get_tokenizer(name)
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]
    assert tokenizer.encode_batch(()) == []
    for text in [*TEXTS, "special text stays text: <|endoftext|>"]:  # The token store's path.
        assert tokenizer.encode_array(text).tolist() == tokenizer.encode(text)


def test_offline_without_cache_raises_a_clear_error(tmp_path, monkeypatch):
    """An empty TIKTOKEN_CACHE_DIR and no network: one GptjaxError that says what to set.

    tiktoken fetches a missing vocabulary with ``requests.get(url)`` and no timeout, so on a
    machine whose DNS or firewall drops packets instead of refusing them this could hang.
    Name resolution and connecting are made to fail at once, as on a machine without a
    network, so the test neither waits nor depends on the network.
    """
    import tiktoken.registry

    def offline(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # tiktoken keeps loaded encodings for the life of the process.
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    with pytest.raises(GptjaxError, match="TIKTOKEN_CACHE_DIR") as error:
        get_tokenizer("cl100k_base")
    assert "cl100k_base" in str(error.value) and str(tmp_path) in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_tokenizer():
    with pytest.raises(GptjaxError, match=r"unknown tokenizer 'gpt3'.*'bytes'.*'gpt2'"):
        get_tokenizer("gpt3")
    assert known_vocab_size("gpt3") is None
    assert "gpt2" in TIKTOKEN_ENCODINGS


# Hugging Face vocab files (export-hf writes them next to the weights)

HF_SAMPLES = [
    "Hello, world! It's 3:14pm — naïve café, Straße, ångström.",
    "日本語のテキストと中文文本，한국어 문장, русский текст 😀🎉👩‍👩‍👧‍👦",
    "def f(x):\n\treturn {'a': [1, 2.5e-3, None]}  # comment\r\n   trailing   ",
]


def _hf_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(directory)


def test_gpt2_vocab_files_are_openais_and_encode_alike(gpt2, shared_dir, tmp_path):
    written = gpt2.save_hf(tmp_path, model_max_length=1024)
    assert sorted(p.name for p in written) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    # The merges are rebuilt from tiktoken's ranks; they must be OpenAI's files exactly.
    originals = {f.read_bytes()[:8]: f for f in (shared_dir / "tiktoken-cache").iterdir()}
    encoder = next((f for head, f in originals.items() if head.startswith(b"{")), None)
    bpe = next((f for head, f in originals.items() if head.startswith(b"#version")), None)
    if encoder is None or bpe is None:
        pytest.skip("../shared/tiktoken-cache lacks GPT-2's encoder.json / vocab.bpe")
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads(encoder.read_text())
    assert (tmp_path / "merges.txt").read_text().splitlines() == bpe.read_text().splitlines()
    reference = _hf_tokenizer(tmp_path)
    assert reference.eos_token_id == gpt2.eot_id
    for text in HF_SAMPLES:
        assert reference(text)["input_ids"] == gpt2.encode(text), text


def test_byte_vocab_files_encode_alike(tmp_path):
    tokenizer = ByteTokenizer()
    tokenizer.save_hf(tmp_path, model_max_length=128)
    reference = _hf_tokenizer(tmp_path)
    assert len(reference) == tokenizer.vocab_size and reference.eos_token_id == tokenizer.eot_id
    for text in [*HF_SAMPLES, "".join(map(chr, range(1, 256)))]:
        tokens = tokenizer.encode(text)
        assert reference(text)["input_ids"] == tokens, text
        assert reference.decode(tokens) == text
