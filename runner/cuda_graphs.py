"""CUDA graphs of the DiT's forward: captured once per input signature, replayed on every step.

With the eager switches one forward at 120 s is about 1,200 kernels, 25 ms of GPU time in a
47-56 ms call on the H200 (docs/PERFORMANCE.md): the CPU launching them, not the card, sets the
pace. A denoising loop calls the DiT with the same shapes on every step, so its kernels can be
recorded once and launched as one graph. A job pays one warm-up forward and one capture.

A graph replays fixed memory: inputs are copied into the captured tensors, the output is
copied out (the caller may hold it across steps), and the graph's private memory pool lives
until `release`, which the engine calls between the denoising loop and the VAE decode. Inputs
that are not all CUDA tensors, or a capture that fails (an op that waits on the CPU), run the
forward as it is, and the reason is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils import _pytree as pytree

WARMUP_CALLS = 1  # cuBLAS/cuDNN plans and lazy initialisation happen outside the capture


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list  # the captured tensors, in the flattened order of (args, kwargs)
    output: object


@dataclass
class GraphedForward:
    """Wraps a module's bound `forward`; install with `module.forward = GraphedForward(module.forward)`."""

    forward: Callable
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    fallback: Optional[str] = None
    _graphs: dict = field(default_factory=dict)
    _pool: object = None

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = None if self.fallback else _signature(leaves, spec)
        if key is None:
            self.eager_calls += 1
            return self.forward(*args, **kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(leaves, spec)
            if entry is None:
                self.eager_calls += 1
                return self.forward(*args, **kwargs)
            self._graphs[key] = entry
        for static, new in zip(entry.inputs, (l for l in leaves if isinstance(l, torch.Tensor))):
            static.copy_(new)
        entry.graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, entry.output)

    def _capture(self, leaves: list, spec) -> Optional[_Captured]:
        static = [_like(l) if isinstance(l, torch.Tensor) else l for l in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.forward(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self.forward(*args, **kwargs)
        except RuntimeError as exc:  # an op that cannot be captured: run eagerly from now on
            torch.cuda.synchronize()
            self.fallback = f"capture failed: {str(exc).splitlines()[0][:200]}"
            return None
        self.captures += 1
        return _Captured(graph, [s for s in static if isinstance(s, torch.Tensor)], output)

    def release(self) -> None:
        """Drop the graphs and their memory pool (the caching allocator gets it back)."""
        self._graphs.clear()
        self._pool = None

    def report(self) -> dict:
        return {"captures": self.captures, "replays": self.replays, "eager_calls": self.eager_calls, "fallback": self.fallback}


def _like(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the same shape and dtype, and the same strides where the layout is dense (an
    expanded tensor, stride 0, becomes contiguous: a graph input must own every element it is given)."""
    out = torch.empty_like(tensor, memory_format=torch.preserve_format)
    out.copy_(tensor)
    return out


def _signature(leaves: list, spec) -> Optional[tuple]:
    """What a capture depends on: tensor shapes, strides and dtypes, and every other argument's value.
    None where a graph cannot serve the call (a CPU tensor, an unhashable argument)."""
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "cuda":
                return None
            parts.append(("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device.index))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            parts.append(("value", type(leaf).__name__, leaf))
    return (str(spec), tuple(parts))
