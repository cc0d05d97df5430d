"""Count how a checkout handles issue 19's bad inputs: clean / traceback / accepted / hang.

    python scripts/reliability_tally.py [--repo CHECKOUT] [--timeout 90]

Runs every row of ``tests/test_bad_input.py``'s table as ``python -m gptjax.cli ...`` in a
subprocess whose ``PYTHONPATH`` is ``CHECKOUT`` (default: this one), so an older commit
can be measured with this table: ``git worktree add /tmp/base 09f88dd`` then
``--repo /tmp/base``. The assets (a trained nano run, bad files) are built with this
checkout. Prints one JSON object (counts and each row's verdict) and a table.

Verdicts: ``clean`` (exit 2, one stderr line, no traceback), ``traceback``, ``accepted``
(exit 0 on harmful input), ``hang`` (still running after ``--timeout`` seconds), and
``exit N`` (another code, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(HERE), str(HERE / "tests")]


class _Factory:
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return path


def verdict(code: int | None, err: str) -> str:
    if code is None:
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if code == 0:
        return "accepted"
    lines = err.strip().splitlines()
    return "clean" if code == 2 and len(lines) == 1 and lines[0].startswith("gptjax") else f"exit {code}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=str(HERE), help="the checkout whose gptjax runs the rows")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds before a row counts as a hang")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import test_bad_input as table

    root = Path(tempfile.mkdtemp(prefix="tally-"))
    paths, cache = table.assets.__wrapped__(_Factory(root))
    env = {**os.environ, "PYTHONPATH": args.repo, "GPTJAX_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}
    rows = {}
    for name, argv in table.ROWS:
        cmd = [sys.executable, "-m", "gptjax.cli", *table._fill(argv, paths)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=paths["tmp"], timeout=args.timeout,
                errors="replace",
            )  # fmt: skip
            rows[name] = verdict(proc.returncode, proc.stderr)
        except subprocess.TimeoutExpired:
            rows[name] = verdict(None, "")
    counts: dict[str, int] = {}
    for v in rows.values():
        counts[v] = counts.get(v, 0) + 1
    print(json.dumps({"repo": args.repo, "rows": len(rows), "counts": counts, "verdicts": rows}, indent=2))
    width = max(map(len, rows))
    for name, v in rows.items():
        print(f"{name:<{width}}  {v}")
    print("  ".join(f"{k}: {n}" for k, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
