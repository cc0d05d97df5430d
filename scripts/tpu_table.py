"""The README's TPU table: each GPT-2 preset on each TPU target, planned and compiled with libtpu.

    python scripts/tpu_table.py [--presets gpt2,gpt2-xl] [--targets v5e-8,v6e-8] [--batch 32]

For every preset x target, :func:`gptjax.plan.plan` ranks the layouts by its analytic
estimate and compiles them in that order (at most ``--compile``) until one fits; the row is
that layout: mesh, remat, accumulation, per-chip GiB from the compiler, fits, compile
seconds (on this machine) and collective bytes per step and chip from the compiled HLO.
Prints JSON lines as rows finish, then a Markdown table. Compiling gpt2-xl takes minutes
on a small CPU: run it with ``nice`` in the background.
"""

from __future__ import annotations

import argparse
import json
import sys

from gptjax.config import load_config
from gptjax.plan import plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl")
    parser.add_argument("--targets", default="v5e-8,v5e-16,v5p-32,v6e-8")
    parser.add_argument("--batch", type=int, default=32, help="global batch (sequences of block_size)")
    parser.add_argument("--compile", type=int, default=3, help="most layouts compiled per cell")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        config = load_config(preset, ["model.dtype=bfloat16", f"train.batch_size={args.batch}"])
        for target in args.targets.split(","):
            result = plan(config, target, compile=args.compile, slack=0.9, first_fit=True)
            row = {"preset": preset, "target": target, **(result["best"] or result["compiled"][-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| preset | target | mesh (data x fsdp x tensor) | remat | accum | GiB/chip | fits | compile s "
          "| collective MiB/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['target']} | {r['data']} x {r['fsdp']} x {r['tensor']} | {r['remat']} "
            f"| {r['accum_steps']} | {r['gib']:.2f} | {'yes' if r['fits'] else 'no'} | {r['compile_s']:.0f} "
            f"| {r['collective_bytes'] / 2**20:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
