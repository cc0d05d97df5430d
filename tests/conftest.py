"""Test setup: 8 fake CPU devices (set before jax is imported) and the offline assets."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests needing it skip with a reason when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared (offline assets for developers and CI) is absent")
    return SHARED


@pytest.fixture(scope="session")
def gpt2_tokenizer_available(shared_dir: Path) -> bool:
    if not (shared_dir / "tiktoken-cache").is_dir():
        pytest.skip("../shared/tiktoken-cache is absent: the gpt2 vocabulary cannot be loaded offline")
    return True


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """A small local text corpus (40 documents of random words) and a private store cache."""
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import"]
    for i in range(40):
        (text_dir / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 300)) + "\n")
    return text_dir
