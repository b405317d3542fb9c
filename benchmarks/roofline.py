"""A roofline reading of a compiled XLA program: FLOPs, bytes, kernels and buffers from its HLO.

Used by ``python -m benchmarks.pretrain --analyze`` (issue 15). Everything here reads what XLA
reports (``compiled.cost_analysis()``, ``compiled.memory_analysis()``) or the optimized HLO text
(``compiled.as_text()``); nothing is timed. Caveat for the reader of its figures: XLA's fusion
decisions depend on the backend, so the kernels and bytes of a program compiled for the CPU
estimate, not measure, those of the same program on a GPU; the FLOPs do not depend on it.

The roofline: a step of F FLOPs moving B bytes through memory takes at least
max(F / peak, B / bandwidth); below the ridge point peak / bandwidth (H100 SXM: 989 TFLOP/s dense
bf16 / 3.35 TB/s ≈ 295 FLOP/byte) a program is bound by its memory traffic.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter, defaultdict

H100_PEAK_FLOPS = 989e12  # dense bfloat16, SXM (not the 2:4 sparse figure)
H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3
H100_RIDGE = H100_PEAK_FLOPS / H100_BANDWIDTH  # ≈ 295 FLOP/byte

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1}
# Instructions that move no data of their own (views, bookkeeping).
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
            "partition-id", "replica-id"}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*")


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of its result (tuple: many)
    op: str
    operands: tuple[str, ...]
    calls: str | None
    op_name: str  # jax's metadata op_name ("" when absent)

    @property
    def nbytes(self) -> int:
        return sum(array_bytes(t, d) for t, d in self.arrays)


def array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return math.prod(dims) * DTYPE_BYTES.get(dtype, 4)


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start] == '('."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced parentheses in HLO line: {text[:120]}")


def parse_instruction(line: str) -> Instr | None:
    """One HLO instruction line → :class:`Instr` (None for anything else)."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple-shaped result
        end = _balanced(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    arrays = tuple((t, tuple(int(x) for x in d.split(",") if x))
                   for t, d in _ARRAY.findall(shape))
    op_end = rest.find("(")
    if op_end < 0:
        return None
    op = rest[:op_end]
    args_end = _balanced(rest, op_end)
    operands = tuple(re.findall(r"%[\w.\-]+", rest[op_end:args_end]))
    attrs = rest[args_end:]
    calls = re.search(r"calls=(%[\w.\-]+)", attrs)
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    return Instr(m.group(1), arrays, op, operands, calls.group(1) if calls else None,
                 op_name.group(1) if op_name else "")


def split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """HLO module text → ({computation name: its lines}, the ENTRY computation's name)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if current is None:
            m = re.match(r"^(ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$", line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


# Operations that only move, re-type or re-lay data: a kernel made of these alone does no math.
MOVE_OPS = {"parameter", "convert", "bitcast", "copy", "transpose", "reshape", "broadcast",
            "slice", "concatenate", "tuple", "get-tuple-element", "constant", "pad",
            "dynamic-slice", "bitcast-convert"}
PHASES = ("forward", "backward", "update", "unattributed")


def phase(op_name: str) -> str:
    """Which part of a training step an instruction belongs to, from jax's op_name metadata:
    "backward" (the transpose of a JVP), "forward" (a JVP), "update" (anything else jax named:
    optimizer, metrics, RNG) or "unattributed" (no op_name: a copy or convert XLA added)."""
    if not op_name:
        return "unattributed"
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update"


@dataclasses.dataclass
class HloStats:
    kernels: int  # instructions of the entry computation that launch work
    fusions: int
    matmul_kernels: int  # of those, the ones computing a dot or a convolution
    bytes_total: int  # Σ (operands + result) over the kernels (an approximation of XLA's)
    bytes_by_phase: dict[str, int]
    kernels_by_phase: dict[str, int]
    score_bytes: int  # traffic of T×T attention score/probability tensors
    movement_bytes: int  # traffic of kernels that only convert/copy/transpose (no arithmetic)
    movement_kernels: int
    written_by_dtype: dict[str, int]  # bytes of results, per element type
    largest: list[tuple[str, int, int, str]]  # (dtype[dims], count, total bytes, op_name)


def hlo_stats(hlo: str, score_shapes: set[tuple[int, int, int]] = frozenset(), top: int = 6
              ) -> HloStats:
    """Kernels, bytes and buffers of an optimized HLO module (``compiled.as_text()``).

    ``score_shapes``: (heads, T, S) of the model's attention score tensors: results and
    operands of shape (…, heads, T, S) are counted as score traffic (what flash attention keeps
    on chip). Only the entry computation is read (loop bodies, such as a CPU's RNG, are not).
    """
    comps, entry = split_computations(hlo)
    ops_of = {name: {i.op for i in map(parse_instruction, lines) if i is not None}
              for name, lines in comps.items()}
    has_matmul = {name for name, ops in ops_of.items() if ops & {"dot", "convolution"}}
    instrs = [i for i in (parse_instruction(x) for x in comps[entry]) if i is not None]
    by_name = {i.name: i for i in instrs}
    kernels = [i for i in instrs if i.op not in FREE_OPS]

    def is_score(arr) -> bool:
        t, d = arr
        return len(d) >= 3 and tuple(d[-3:]) in score_shapes

    bytes_by_phase: dict[str, int] = defaultdict(int)
    kernels_by_phase: Counter = Counter()
    written: dict[str, int] = defaultdict(int)
    groups: dict[str, list] = {}
    score = total = move = n_move = 0
    for k in kernels:
        arrays = list(k.arrays)
        for o in k.operands:
            if o in by_name:
                arrays.extend(by_name[o].arrays)
        b = sum(array_bytes(t, d) for t, d in arrays)
        total += b
        score += sum(array_bytes(t, d) for t, d in arrays if is_score((t, d)))
        if (k.calls in ops_of and ops_of[k.calls] <= MOVE_OPS) or k.op in MOVE_OPS:
            move += b
            n_move += 1
        ph = phase(k.op_name)
        bytes_by_phase[ph] += b
        kernels_by_phase[ph] += 1
        for t, d in k.arrays:
            written[t] += array_bytes(t, d)
        if len(k.arrays) == 1:
            t, d = k.arrays[0]
            key = f"{t}[{','.join(map(str, d))}]"
            g = groups.setdefault(key, [0, 0, k.op_name])
            g[0] += 1
            g[1] += array_bytes(t, d)
            if not g[2]:
                g[2] = k.op_name
    # the largest single buffers first (then the most of them)
    largest = sorted(((k, n, b, op) for k, (n, b, op) in groups.items()),
                     key=lambda r: (-(r[2] // r[1]), -r[2]))[:top]
    return HloStats(
        kernels=len(kernels),
        fusions=sum(k.op == "fusion" for k in kernels),
        matmul_kernels=sum(k.op in ("dot", "convolution") or (k.calls in has_matmul)
                           or (k.op == "custom-call" and "gemm" in k.name.lower())
                           for k in kernels),
        bytes_total=total,
        bytes_by_phase=dict(bytes_by_phase),
        kernels_by_phase=dict(kernels_by_phase),
        score_bytes=score,
        movement_bytes=move,
        movement_kernels=n_move,
        written_by_dtype=dict(written),
        largest=largest,
    )


def roofline(flops: float, nbytes: float, peak: float = H100_PEAK_FLOPS,
             bandwidth: float = H100_BANDWIDTH) -> dict[str, float]:
    """The roofline bound of a program of ``flops`` moving ``nbytes``: its arithmetic intensity,
    the least time it can take and which resource sets it."""
    intensity = flops / nbytes if nbytes else math.inf
    t = max(flops / peak, nbytes / bandwidth)
    return {"intensity": intensity, "ridge": peak / bandwidth, "time_s": t,
            "bound": "memory" if intensity < peak / bandwidth else "compute"}


def short_op_name(op_name: str, width: int = 60) -> str:
    """jax's op_name without the jit(...) prefix, cut to ``width`` characters."""
    s = re.sub(r"^jit\([^)]*\)/", "", op_name)
    return s if len(s) <= width else "…" + s[-(width - 1):]
