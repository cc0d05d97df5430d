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
