"""The `compile` switch: the DiT's blocks compiled once per machine, then loaded by every later process.

The runner is a fresh process per job. torch.compile's on-disk caches skip Inductor's code generation
but not Dynamo's trace nor AOTAutograd's setup: 8-20 s before the first compiled forward on the H200
(docs/PERFORMANCE.md). So each kind of block call (with or without the sliding-window mask; batch 1,
or more) is compiled ahead of time with torch's precompile API (`torch.compile(...).aot_compile`,
experimental in torch 2.11), saved in ACESTEP_COMPILE_CACHE under a fingerprint of everything the
graph depends on, and a later process loads that file instead of tracing. (AOTInductor packages were
tried as the stored form and measured worse on the H200: 119 s to compile, 45.7 s to load, and no
CUDA-graph capture; docs/PERFORMANCE.md.)

The block is an argument of the compiled function, so its weights are graph inputs: one artifact
serves all 24 blocks, and any checkpoint of the same shapes. Shapes are dynamic (source length and
batch). A call the artifact's guards refuse runs the block as it is, and is counted.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.models.transformers.ace_step_transformer import AceStepTransformerBlock

SUFFIX = ".block"
_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # block -> its CompiledBlocks


class _CompiledBlock(AceStepTransformerBlock):
    """A block whose calls go through its owner's compiled functions. Installed by swapping the class
    of each instance, so parameters, state dict and hooks are untouched; and nothing is added to the
    instance, which the compiled function receives and whose guards would otherwise pickle it."""

    def forward(self, hidden_states, position_embeddings, temb, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None):
        return _OWNERS[self].call(self, hidden_states, position_embeddings, temb, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask)


def _block_call(block, hidden_states, position_embeddings, temb, attention_mask, encoder_hidden_states,
                encoder_attention_mask=None):
    return AceStepTransformerBlock.forward(block, hidden_states=hidden_states, position_embeddings=position_embeddings,
                                           temb=temb, attention_mask=attention_mask,
                                           encoder_hidden_states=encoder_hidden_states,
                                           encoder_attention_mask=encoder_attention_mask)


def fingerprint(transformer, flags: dict) -> str:
    """What a compiled block depends on: the versions and sources of the code it was traced from, the
    card, the dtype, the block's shapes and the switches. Any change means a new artifact."""
    import diffusers

    from runner import speedups

    block = transformer.layers[0]
    parts = [torch.__version__, diffusers.__version__, sys.version.split()[0],
             str(next(transformer.parameters()).dtype), repr(sorted(flags.items())),
             repr({k: v for k, v in transformer.config.items() if not k.startswith("_")})]
    if torch.cuda.is_available() and next(transformer.parameters()).is_cuda:
        parts += [torch.cuda.get_device_name(), repr(torch.cuda.get_device_capability()), str(torch.version.cuda)]
    for module in (sys.modules[__name__], speedups, sys.modules[type(block).__module__]):
        parts.append(hashlib.sha256(inspect.getsource(module).encode()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


@dataclass
class CompiledBlocks:
    """Installed on every block of one transformer; `report` says where each artifact came from."""

    cache: Path
    key: str
    loaded: list = field(default_factory=list)
    compiled: list = field(default_factory=list)
    seconds: float = 0.0
    eager_calls: int = 0
    _fns: dict = field(default_factory=dict)

    def install(self, transformer) -> "CompiledBlocks":
        import torch._inductor.config

        # No pool of compile workers: loading an artifact then spent less before the first forward
        # (H200: 5.4 s against 6.2 s), and a runner does not wait for the pool's shutdown at exit.
        torch._inductor.config.compile_threads = 1
        for block in transformer.layers:
            if type(block) is AceStepTransformerBlock:
                block.__class__ = _CompiledBlock
                _OWNERS[block] = self
        return self

    def call(self, *args):
        """One block call: through the compiled function of its kind, or as it is where the guards refuse it."""
        fn = self._fn(args[:6]) if args[6] is None else None
        if fn is not None and fn.guard_check(*args[:6]):
            return fn(*args[:6])
        self.eager_calls += 1
        return _block_call(*args)

    def _fn(self, args):
        kind = ("mask" if args[4] is not None else "nomask") + ("-b1" if args[1].shape[0] == 1 else "-bn")
        if kind not in self._fns:
            start = time.perf_counter()
            fn = self._load(kind) or self._compile(kind, args)
            fn.disable_guard_check()  # checked once per call by the wrapper above
            self._fns[kind] = fn
            self.seconds += time.perf_counter() - start
        return self._fns[kind]

    def path(self, kind: str) -> Path:
        return self.cache / f"dit-{self.key}-{kind}{SUFFIX}"

    def _load(self, kind: str):
        path = self.path(kind)
        if not path.is_file():
            return None
        try:
            with _dynamo_settings(), path.open("rb") as f:
                fn = torch.compiler.load_compiled_function(f)
        except Exception:  # noqa: BLE001 - an unreadable or stale artifact is compiled again
            path.unlink(missing_ok=True)
            return None
        self.loaded.append(kind)
        return fn

    def _compile(self, kind: str, args):
        # Fresh dense copies as examples: a view (the first block's input is one) would add guards on its base.
        examples = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        with _dynamo_settings():
            compiled = torch.compile(_block_call, fullgraph=True, dynamic=True,
                                     options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
            fn = compiled.aot_compile((examples, {}))
        path = self.path(kind)
        # Written under a temporary name in the same folder, then renamed: whole or absent, since
        # another runner may be loading it.
        tmp = self.cache / f".{path.name}.{os.getpid()}.part"
        try:
            fn.save_compiled_function(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.compiled.append(kind)
        return fn

    def report(self) -> dict:
        return {"loaded": sorted(self.loaded), "compiled": sorted(self.compiled), "seconds": round(self.seconds, 2),
                "eager_calls": self.eager_calls}


def _dynamo_settings():
    """What the precompile API needs: `aot_compile` enabled, and float arguments (norm eps, scales) kept
    as constants, since a whole-graph AOT compile cannot restart its analysis to turn them into inputs."""
    return torch._dynamo.config.patch(enable_aot_compile=True, specialize_float=True)
