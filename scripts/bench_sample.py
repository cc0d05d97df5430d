"""Benchmark gptjax.sample.generate against a recomputing loop and transformers' generate.

    python scripts/bench_sample.py                                   # the issue's table
    python scripts/bench_sample.py --models quickstart --rounds 1    # a quick look

For each model shape (random weights, seed 0) and batch size: greedy decoding of 16-token
random prompts for --new-tokens tokens (capped by the context: the quick-start model's is
128), no early stop. Every engine runs in its own process, alternately (ours, transformers,
ours, transformers, ...), and each keeps its best time, so a noisy neighbour on a shared
CPU hurts both alike. Columns:

- ours tok/s: batch * new tokens / seconds of a warm ``generate`` call; compile s: the
  tracing, lowering and XLA compilation time of the first call (JAX's own timers).
- naive tok/s: a loop that recomputes the full forward for every token (nanoGPT's
  ``generate``: context right-padded to a multiple of 32, logits at the last real token
  only, compile excluded). Forward times are measured at three context lengths and
  interpolated linearly over the steps, because running it in full takes hours at the
  gpt2 shape.
- hf tok/s: ``GPT2LMHeadModel.generate`` (its KV cache on, greedy) on the same weights,
  copied over after checking that the logits match.

Prints one JSON line per measurement, then a JSON summary and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPT_LEN = 16


def build(name: str):
    import jax

    from gptjax.config import MODEL_PRESETS, quickstart
    from gptjax.model import GPT

    cfg = quickstart().model if name == "quickstart" else MODEL_PRESETS[name]
    return GPT(cfg, key=jax.random.key(0))


def prompts(model, batch: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, PROMPT_LEN)).tolist()


def new_tokens(model, wanted: int) -> int:
    return min(wanted, model.config.block_size - PROMPT_LEN)


def run_ours(model, batch: int, wanted: int) -> dict:
    import jax

    from gptjax.sample import SamplingParams, generate

    n, rows = new_tokens(model, wanted), prompts(model, batch)
    greedy = SamplingParams(temperature=0)
    compile_s = []  # jax's own trace + lower + compile durations during the first call
    listener = lambda event, seconds, **_: compile_s.append(seconds) if "/compile/" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    generate(model, rows, max_new_tokens=n, params=greedy)
    jax.monitoring.unregister_event_duration_listener(listener)
    start = time.perf_counter()
    out = generate(model, rows, max_new_tokens=n, params=greedy)
    seconds = time.perf_counter() - start
    assert all(len(t) == n for t in out.tokens)
    return {"seconds": seconds, "compile_s": sum(compile_s), "new_tokens": n}


def run_naive(model, batch: int, wanted: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    n, rows = new_tokens(model, wanted), np.asarray(prompts(model, batch), np.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, tokens, last):  # tokens (B, T) right-padded; last: the real end
        model = nnx.merge(graphdef, state)
        hidden = jax.lax.dynamic_slice_in_dim(model.hidden(tokens), last, 1, axis=1)
        return model.logits(hidden)[:, 0].argmax(-1)

    def padded(length: int) -> int:
        return min(-(-length // 32) * 32, model.config.block_size)

    lengths = [PROMPT_LEN + i for i in range(n)]  # the context each step recomputes
    probes = sorted({padded(lengths[0]), padded(lengths[len(lengths) // 2]), padded(lengths[-1])})
    probe_s = []
    for t in probes:
        block = np.zeros((batch, t), np.int32)
        block[:, :PROMPT_LEN] = rows
        next_token(state, block, PROMPT_LEN - 1).block_until_ready()  # compile
        start = time.perf_counter()
        for _ in range(3):
            next_token(state, block, PROMPT_LEN - 1).block_until_ready()
        probe_s.append((time.perf_counter() - start) / 3)
    seconds = float(sum(np.interp([padded(t) for t in lengths], probes, probe_s)))
    return {"seconds": seconds, "new_tokens": n, "probe_lengths": probes, "probe_s": probe_s}


def to_transformers(model):
    """GPT2LMHeadModel with our weights (gptjax.interop's mapping, as export-hf writes it)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptjax import interop

    hf = GPT2LMHeadModel(GPT2Config.from_dict(interop.hf_config(model.config))).eval()
    weights = {name: torch.tensor(a) for name, a in interop.hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and k != "lm_head.weight"]  # tied to wte
    if unexpected or missing:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def run_hf(model, batch: int, wanted: int) -> dict:
    import numpy as np
    import torch

    n, rows = new_tokens(model, wanted), prompts(model, batch)
    hf = to_transformers(model)
    ids = torch.tensor(rows)
    with torch.no_grad():
        ours = np.asarray(model(np.asarray(rows, np.int32)))
        diff = float(np.abs(hf(ids).logits.numpy() - ours).max())
        if diff > 1e-3:
            raise RuntimeError(f"transformers' logits differ from ours by {diff}: the weight copy is wrong")
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0)
        hf.generate(ids, max_new_tokens=4, **kwargs)  # warm up
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        seconds = time.perf_counter() - start
    assert out.shape == (batch, PROMPT_LEN + n)
    return {
        "seconds": seconds,
        "new_tokens": n,
        "max_logit_diff": diff,
        "torch_threads": torch.get_num_threads(),
    }


def worker(engine: str, name: str, batch: int, wanted: int) -> None:
    run = {"ours": run_ours, "naive": run_naive, "hf": run_hf}[engine]
    result = run(build(name), batch, wanted)
    result |= {"engine": engine, "model": name, "batch": batch}
    result["tokens_per_s"] = batch * result["new_tokens"] / result["seconds"]
    print("RESULT " + json.dumps(result), flush=True)


def spawn(engine: str, name: str, batch: int, wanted: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--models", name, "--batches", str(batch)]
    proc = subprocess.run([*cmd, "--new-tokens", str(wanted)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2,quickstart")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/transformers runs")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--worker", choices=["ours", "naive", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    models, batches = args.models.split(","), [int(b) for b in args.batches.split(",")]
    if args.worker:
        return worker(args.worker, models[0], batches[0], args.new_tokens)

    summary = []
    for name in models:
        for batch in batches:
            naive = spawn("naive", name, batch, args.new_tokens)
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for engine in ("ours",) if args.no_hf else ("ours", "hf"):
                    result = spawn(engine, name, batch, args.new_tokens)
                    if engine not in best or result["seconds"] < best[engine]["seconds"]:
                        best[engine] = result
            ours, hf = best["ours"], best.get("hf")
            summary.append({
                "model": name, "batch": batch, "new_tokens": ours["new_tokens"],
                "ours_tok_s": ours["tokens_per_s"], "compile_s": ours["compile_s"],
                "naive_tok_s": naive["tokens_per_s"],
                "speedup_vs_naive": ours["tokens_per_s"] / naive["tokens_per_s"],
                "hf_tok_s": hf and hf["tokens_per_s"],
                "ratio_vs_hf": hf and ours["tokens_per_s"] / hf["tokens_per_s"],
            })  # fmt: skip
    print(json.dumps(summary, indent=2))
    header = (
        "| model | batch | new tokens | ours tok/s | compile s | naive tok/s | x naive | hf tok/s | x hf |"
    )
    print("\n" + header + "\n|" + "---|" * 9)
    for r in summary:
        hf_cells = f"{r['hf_tok_s']:.1f} | {r['ratio_vs_hf']:.2f}" if r["hf_tok_s"] else "- | -"
        print(
            f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['ours_tok_s']:.1f} "
            f"| {r['compile_s']:.1f} | {r['naive_tok_s']:.2f} | {r['speedup_vs_naive']:.1f} | {hf_cells} |"
        )


if __name__ == "__main__":
    main()
