"""Where a compiled step spends its time: XLA op times from ``jax.profiler``, grouped by kind.

    from benchmarks import op_profile
    report = op_profile.profile(compiled, call, steps=3)   # compiled = jitted.lower(...).compile(),
                                                           # call() runs it; warm it up first
    print(op_profile.format_report(report))

Used by ``python -m benchmarks.throughput ... --profile N``. Op times are the durations of the
XLA:CPU thunks (or device ops) recorded by the profiler, averaged per step; ops that run
concurrently are both counted, so the total can exceed the step time. Each op is classified from
the optimized HLO (``compiled.as_text()``):

* ``matmul``: dots (the 1x1 convolutions and linears);
* ``convolution``: XLA convolutions (on CPU: the strided dense convs and their gradients);
* ``shifted taps``: fusions reading >= 9 shifted slices (the depthwise fast path's forward and
  input gradient, ``lib/layers/conv.py``);
* ``tap loop``: fusions with a dynamic slice (the depthwise kernel gradient's per-tap loop);
* ``reduce``: reductions (BatchNorm statistics, kernel-gradient sums, losses);
* ``transpose/copy``: layout changes;
* ``elementwise``: everything else (activations, norms, optimizer update, ...).
"""
from __future__ import annotations

import collections
import re

CATEGORIES = ("matmul", "convolution", "shifted taps", "tap loop", "reduce", "transpose/copy", "elementwise")


def _parse_hlo(hlo_text: str):
    """instruction name -> (defining line, body of the computation it calls, if any)."""
    computations = {}
    for block in re.split(r"\n\s*\n", hlo_text):
        head = block.strip().split("\n", 1)[0]
        m = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", head)
        if m:
            computations[m.group(1)] = block
    instructions = {}
    for line in hlo_text.split("\n"):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if m:
            called = re.search(r"calls=%?([\w.\-]+)", line)
            instructions[m.group(1)] = (line.strip(), computations.get(called.group(1), "") if called else "")
    return instructions


_CONTROL_FLOW = ("while", "conditional", "call")


def _opcode(line: str) -> str:
    m = re.search(r"= (?:\([^=]*\)|\S+) ([\w\-]+)\(", line)
    return m.group(1) if m else ""


def classify(line: str, body: str) -> str:
    """The category of one HLO instruction, from its line and the body of the fusion it calls."""
    text = body or line
    op = _opcode(line)
    if op == "dot" or re.search(r" dot\(", text):
        return "matmul"
    if op == "convolution" or re.search(r" convolution\(", text):
        return "convolution"
    if len(re.findall(r" slice\(", text)) >= 9:
        return "shifted taps"
    if re.search(r"dynamic-slice\(", text):
        return "tap loop"
    if re.search(r" reduce\(", text) or op == "reduce":
        return "reduce"
    if op in ("transpose", "copy") or re.match(r"(?:ROOT )?%?(transpose|copy)", line):
        return "transpose/copy"
    return "elementwise"


def profile(compiled, call, steps: int = 3) -> dict:
    """Run ``call()`` (already warmed up) ``steps`` times under the profiler; op times per step by
    category and the ten slowest ops (name, category, ms per step, output shape)."""
    import tempfile

    import jax
    instructions = _parse_hlo(compiled.as_text() or "")
    jax.profiler.start_trace(tempfile.mkdtemp(prefix="jax-op-profile-"))
    try:
        for _ in range(steps):
            jax.block_until_ready(call())
    finally:
        data = jax.profiler.stop_trace()
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                # XLA ops only (not the executor's or Python's events), and not control flow: a
                # while loop's time is its body's ops, which are counted themselves.
                if event.name in instructions and _opcode(instructions[event.name][0]) not in _CONTROL_FLOW:
                    per_op[event.name] += event.duration_ns / 1e6 / steps
    by_category = collections.Counter()
    top = []
    for name, ms in per_op.most_common():
        line, body = instructions[name]
        category = classify(line, body)
        by_category[category] += ms
        if len(top) < 10:
            shape = line.split(" = ", 1)[1].split(" ", 1)[0]
            top.append({"op": name, "category": category, "ms": round(ms, 1), "shape": shape})
    return {"total_ms": round(sum(per_op.values()), 1),
            "by_category_ms": {c: round(by_category[c], 1) for c in CATEGORIES if by_category[c]},
            "top_ops": top}


def format_report(report: dict) -> str:
    lines = [f"op time per step: {report['total_ms']:.0f} ms"]
    for category, ms in sorted(report["by_category_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {category:15s} {ms:8.1f} ms  {100 * ms / max(report['total_ms'], 1e-9):5.1f}%")
    lines.append("  slowest ops:")
    for op in report["top_ops"]:
        lines.append(f"    {op['ms']:7.1f} ms  {op['category']:15s} {op['op']}  {op['shape']}")
    return "\n".join(lines)
