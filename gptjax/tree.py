"""Naming pytree paths: the one place that turns a JAX key path into strings.

Checkpoints key arrays by these names, weight decay and fine-tuning pick parameters by
them, and the Hugging Face mapping matches them.
"""

from __future__ import annotations

from typing import Any


def key_name(entry: Any) -> str:
    """One path entry (dict key, attribute, sequence index) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_names(path) -> list[str]:
    """A parameter's path as names, without the trailing ``value`` of an nnx Variable."""
    names = [key_name(entry) for entry in path]
    return names[:-1] if names and names[-1] == "value" else names
