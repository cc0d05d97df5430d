"""gptjax.host: glibc keeps XLA:CPU's per-step temporaries instead of faulting them back in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from gptjax.launch import with_cpu_devices

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt settings")

# A jitted step whose temporaries (two 36 MB intermediates) exceed what a glibc thread
# arena can hold, as a train step's do; page faults counted over steady-state calls.
SCRIPT = """
import json, resource
from gptjax.host import keep_freed_memory
kept = keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)).sum())
x = jnp.ones((3000, 3000))
for _ in range(2):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"kept": kept, "faults_per_call": faults}))
"""


def _run(keep: bool) -> dict:
    env = {
        **os.environ,
        "GPTJAX_KEEP_HOST_MEMORY": "1" if keep else "0",
        "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1),
    }
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_removes_per_call_page_faults():
    off, on = _run(keep=False), _run(keep=True)
    assert off == {"kept": False, "faults_per_call": off["faults_per_call"]}
    assert on["kept"] is True
    # Without it every call maps its temporaries afresh and faults each 4 KiB page in
    # (over 400,000 faults a call here); with it, calls reuse the pages they freed.
    assert off["faults_per_call"] > 10_000, off
    assert on["faults_per_call"] < off["faults_per_call"] / 10, (on, off)
