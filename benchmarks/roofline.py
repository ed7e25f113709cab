"""What one DiT forward must compute and move, op by op, and what that costs on another card.

`OpCosts` is a TorchDispatchMode: every aten op that runs inside it is counted with its FLOPs
(torch.utils.flop_counter's formulas: matrix multiplies, convolutions, attention) and the bytes
of its tensor inputs and outputs (each read once, written once: what an unfused eager kernel
moves at the least; views move nothing). Ops fall in three classes, as a profile's kernels do:
`matmul`, `attention` and `other` (element-wise, norms, RoPE, copies).

`project` turns the counts into a time on a card given its two ceilings: each op takes the
larger of FLOPs / rate and bytes / bandwidth (a roofline floor), summed per class. The T4's
ceilings are its datasheet's (65 TFLOP/s fp16 tensor, 320 GB/s): leads, not readings.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

T4 = {"name": "T4 (datasheet)", "tflops": 65.0, "gbps": 320.0}
CLASSES = ("matmul", "attention", "other")
_NO_BYTES = ("_unsafe_view", "_reshape_alias", "detach", "alias", "lift_fresh", "as_strided")  # views by another name
_MATMUL = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "cudnn_convolution")


def op_class(name: str) -> str:
    if "attention" in name:
        return "attention"
    return "matmul" if name in _MATMUL else "other"


class OpCosts(TorchDispatchMode):
    """Counts FLOPs and bytes per op class (and per op name) for everything run inside it."""

    def __init__(self):
        super().__init__()
        self.flops = defaultdict(float)
        self.bytes = defaultdict(float)
        self.floor_inputs = []  # (class, flops, bytes) per op, for `project`
        self.by_name = defaultdict(lambda: [0, 0.0, 0.0])  # name -> [count, flops, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_BYTES:
            return out
        cls = op_class(name)
        if cls == "attention":  # torch's formula refuses grouped-query shapes: QK^T and PV, per query head
            q, k = args[0], args[1]
            flops = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        else:
            formula = flop_registry.get(func.overloadpacket)
            flops = float(formula(*args, **kwargs, out_val=out)) if formula else 0.0
        moved = float(sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)))
        self.flops[cls] += flops
        self.bytes[cls] += moved
        self.floor_inputs.append((cls, flops, moved))
        row = self.by_name[name]
        row[0] += 1
        row[1] += flops
        row[2] += moved
        return out

    def summary(self) -> dict:
        return {c: {"gflop": round(self.flops[c] / 1e9, 1), "mb": round(self.bytes[c] / 1e6, 1)} for c in CLASSES}

    def top_ops(self, n: int = 12) -> list:
        rows = sorted(self.by_name.items(), key=lambda kv: -kv[1][2])[:n]
        return [{"op": k, "count": v[0], "gflop": round(v[1] / 1e9, 2), "mb": round(v[2] / 1e6, 1)} for k, v in rows]


def project(costs: OpCosts, tflops: float, gbps: float, other_bytes_scale: float = 1.0) -> dict:
    """Roofline floor per class in ms: sum over ops of max(FLOPs / rate, bytes / bandwidth).
    `other_bytes_scale` scales the element-wise bytes (a fused path moves fewer)."""
    ms = defaultdict(float)
    for cls, flops, moved in costs.floor_inputs:
        if cls == "other":
            moved *= other_bytes_scale
        ms[cls] += max(flops / (tflops * 1e12), moved / (gbps * 1e9)) * 1e3
    return {c: round(ms[c], 3) for c in CLASSES} | {"total": round(sum(ms.values()), 3)}


def kernel_class(name: str) -> str:
    """A profiled CUDA kernel's class, by its name (cuBLAS/CUTLASS GEMMs, SDPA kernels, the rest)."""
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "sm90_", "sm80_", "conv")):
        return "matmul"
    return "other"
