"""The collective inventory of a compiled program: which collectives, on what shapes, how many bytes.

:func:`inventory` reads the optimised HLO text of a compiled step
(``jax.jit(f).lower(...).compile().as_text()``) and lists every cross-device collective:
all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute (their async
``-start`` halves included, the ``-done`` halves not, so each transfer is counted once).

Each entry counts how often it runs per step: a collective inside a ``while`` body (a
``lax.scan`` over layers or micro-batches) runs as many times as the loop's
``known_trip_count`` says (nested loops multiply). ``bytes`` is the size of the larger of
the collective's operand and result as one device holds them, so an all-gather is counted
at its gathered size and a reduce-scatter at its unscattered input: the data each device
touches, not a wire-level model of the algorithm.

XLA:TPU writes a reduce-scatter as an all-reduce and a dynamic slice fused into one
``all-reduce-scatter`` computation; it is listed as a reduce-scatter. XLA:CPU may lower a
reduce-scatter as an unfused all-reduce plus slice, which is listed as the all-reduce it is.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start)?\(")
_CALLEE = re.compile(r"\b(body|calls|branch_computations|true_computation|false_computation)=\{?([^,}\s]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_BOUND = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")


@dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled program.

    Attributes:
        kind: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` or
            ``collective-permute``.
        shapes: The per-device array shapes it produces, e.g. ``("f32[8,256]",)``.
        bytes: Per-device bytes of the larger of operands and results (a tuple's elements
            summed), one execution.
        count: Executions per step (loop trip counts multiplied in).
    """

    kind: str
    shapes: tuple[str, ...]
    bytes: int
    count: int

    @property
    def dims(self) -> list[tuple[int, ...]]:
        return [_dims(s) for s in self.shapes]


def _dims(shape: str) -> tuple[int, ...]:
    inner = shape[shape.index("[") + 1 : -1]
    return tuple(int(d) for d in inner.split(",") if d)


def _shapes(text: str) -> list[str]:
    """The array shapes in an HLO type string (a tuple's elements in order)."""
    return [f"{dtype}[{dims}]" for dtype, dims in _SHAPE.findall(text) if dtype in _DTYPE_BYTES]


def _nbytes(shapes: list[str]) -> int:
    return sum(math.prod(_dims(s)) * _DTYPE_BYTES[s[: s.index("[")]] for s in shapes)


def inventory(hlo_text: str) -> list[Collective]:
    """Every collective in ``hlo_text`` (a compiled program's ``as_text()``), merged by kind and shape."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if line[:1] not in (" ", "\t", "") and stripped.endswith("{"):  # a computation's header
            words = stripped.split()
            current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
            computations[current] = []
            if words[0] == "ENTRY":
                entry = current
        elif current is not None and stripped and stripped != "}":
            computations[current].append(stripped)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    multiplier: Counter[str] = Counter()

    def trip_count(line: str) -> int:
        """A while loop's iterations: XLA's known_trip_count, else the bound its condition compares to."""
        known = _TRIP.search(line)
        if known:
            return int(known.group(1))
        condition = _CONDITION.search(line)
        bounds = {int(b) for c in computations.get(condition.group(1), []) for b in _BOUND.findall(c)}
        return bounds.pop() if len(bounds) == 1 else 1  # (XLA:TPU leaves the count in the condition)

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in computations or depth > 64:
            return
        multiplier[name] += times
        for line in computations[name]:
            for field, callees in _CALLEE.findall(line):
                n = trip_count(line) if field == "body" else 1
                for callee in callees.split(","):
                    visit(callee.strip().lstrip("%"), times * n, depth + 1)

    visit(entry, 1)
    merged: Counter[tuple[str, tuple[str, ...], int]] = Counter()
    for name, lines in computations.items():
        for line in lines:
            op = _OP.search(line)
            if op is None or multiplier[name] == 0:
                continue
            result_shapes = _shapes(op.group(1))
            operand_shapes = _shapes(line[op.end() :].split(")")[0])
            if op.group(3):  # async start: the result tuple holds (operands, outputs, scalar contexts)
                result_shapes = [shape for shape in result_shapes if not shape.endswith("[]")]
                skip = len(operand_shapes) or len(result_shapes) // 2  # operands' types may be unprinted
                result_shapes = result_shapes[skip:] or result_shapes
            nbytes = max(_nbytes(result_shapes), _nbytes(operand_shapes))
            kind = op.group(2)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # XLA:TPU's reduce-scatter: all-reduce + slice, one fusion
            merged[(kind, tuple(result_shapes), nbytes)] += multiplier[name]
    return sorted(
        (Collective(kind, shapes, nbytes, count) for (kind, shapes, nbytes), count in merged.items()),
        key=lambda c: (-c.bytes * c.count, c.kind),
    )


def totals(collectives: list[Collective]) -> dict[str, dict[str, int]]:
    """Per kind: instructions executed per step and bytes moved per step (per device)."""
    out: dict[str, dict[str, int]] = {}
    for c in collectives:
        entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += c.count
        entry["bytes"] += c.bytes * c.count
    return out


def total_bytes(collectives: list[Collective]) -> int:
    return sum(c.bytes * c.count for c in collectives)


def format_inventory(collectives: list[Collective], limit: int = 12) -> str:
    """A table: kind, shapes, executions per step, MiB per step; largest first."""
    rows = [f"{'kind':<19} {'x/step':>6} {'MiB/step':>9}  shapes"]
    for c in collectives[:limit]:
        rows.append(f"{c.kind:<19} {c.count:>6} {c.bytes * c.count / 2**20:>9.2f}  {', '.join(c.shapes)}")
    if len(collectives) > limit:
        rest = collectives[limit:]
        rows.append(f"{'... ' + str(len(rest)) + ' more':<19} {sum(c.count for c in rest):>6} "
                    f"{total_bytes(rest) / 2**20:>9.2f}")  # fmt: skip
    return "\n".join(rows)
