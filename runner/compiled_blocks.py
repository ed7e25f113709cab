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

Loading the artifacts costs a fresh process seconds: importing Inductor's modules (3-4 s on the
H200's host), then the generated code and the kernels (about 1 s). The imports are made while a
runner started ahead waits for its job (runner.engines.COMPILE_LOADER_MODULES). The rest: the key
depends only on the checkpoint's config, the dtype and the card, so `Prefetch` starts loading in a
thread before the weights are read, and the first block call takes what it loaded. Being Python,
that load holds the GIL, so it overlaps the weight load and the encoding only in part
(docs/PERFORMANCE.md, goal 2).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

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


def fingerprint(config: Mapping, dtype: torch.dtype, on_cuda: bool, flags: dict) -> str:
    """What a compiled block depends on: the versions and sources of the code it was traced from, the
    card, the dtype, the transformer's config and the switches. Any change means a new artifact.
    Everything here is known before the weights are loaded (see `Prefetch`)."""
    import diffusers

    from runner import speedups

    parts = [torch.__version__, diffusers.__version__, sys.version.split()[0], str(dtype), repr(sorted(flags.items())),
             repr({k: v for k, v in config.items() if not k.startswith("_")})]
    if on_cuda and torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(), repr(torch.cuda.get_device_capability()), str(torch.version.cuda)]
    for module in (sys.modules[__name__], speedups, sys.modules[AceStepTransformerBlock.__module__]):
        parts.append(hashlib.sha256(inspect.getsource(module).encode()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def transformer_key(transformer, on_cuda: bool, flags: dict) -> str:
    """The fingerprint of a loaded transformer (`on_cuda`: where it runs, wherever offload keeps it now)."""
    return fingerprint(transformer.config, next(transformer.parameters()).dtype, on_cuda, flags)


def checkpoint_key(transformer_dir: Path, dtype: torch.dtype, on_cuda: bool, flags: dict) -> str:
    """The same fingerprint from the checkpoint's transformer folder, before its weights are read: the
    config is the one `from_pretrained` would give the model (built on the meta device, no memory)."""
    from diffusers import AceStepTransformer1DModel

    with torch.device("meta"):
        model = AceStepTransformer1DModel.from_config(AceStepTransformer1DModel.load_config(str(transformer_dir)))
    return fingerprint(model.config, dtype, on_cuda, flags)


def artifact_path(cache: Path, key: str, kind: str) -> Path:
    return cache / f"dit-{key}-{kind}{SUFFIX}"


def load_artifact(path: Path):
    """The compiled function saved at `path`, or None where there is none (or it is unreadable or
    stale: then it is removed, and compiled again by the first process that needs it)."""
    if not path.is_file():
        return None
    try:
        with _dynamo_settings(), path.open("rb") as f:
            return torch.compiler.load_compiled_function(f)
    except Exception:  # noqa: BLE001 - an unreadable or stale artifact is compiled again
        path.unlink(missing_ok=True)
        return None


class Prefetch:
    """Loads, in a thread, every artifact saved under one key (batch-2 kinds first: guidance doubles
    the batch), while the process loads the weights and encodes the source. `take(kind)` waits for
    that kind only and hands over what was loaded."""

    def __init__(self, cache: Path, key: str):
        self.cache, self.key = cache, key
        self.seconds = 0.0
        prefix = f"dit-{key}-"
        paths = sorted(cache.glob(f"{prefix}*{SUFFIX}"), key=lambda p: (not p.name.endswith(f"-bn{SUFFIX}"), p.name))
        self._paths = {p.name[len(prefix):-len(SUFFIX)]: p for p in paths}
        self._done = {kind: threading.Event() for kind in self._paths}
        self._fns: dict = {}
        _one_compile_thread()
        self._thread = threading.Thread(target=self._run, name="compiled-blocks-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            for kind, path in self._paths.items():
                try:
                    fn = load_artifact(path)
                    if fn is not None:
                        self._fns[kind] = fn
                finally:
                    self._done[kind].set()
                    self.seconds = time.perf_counter() - start
        finally:
            for done in self._done.values():
                done.set()

    def take(self, kind: str):
        """The loaded function of this kind, or None (none on disk, or unreadable: the caller compiles)."""
        done = self._done.get(kind)
        if done is not None:
            done.wait()
        fn = self._fns.pop(kind, None)
        if fn is None:
            self._thread.join()  # the caller loads or compiles next, and Dynamo's settings are global
            return None
        _rebuild_guards(fn)
        return fn


def _rebuild_guards(fn) -> None:
    """Build the loaded function's guards again in the calling thread. Dynamo builds them when it loads
    the function, from that thread's dispatch state: built in the prefetch thread, outside the
    runner's inference mode, every tensor guard failed on the first CPU run (ADInplaceOrView)."""
    from torch._dynamo.package import load_guard_manager, load_guards_state

    artifacts = fn._artifacts
    artifacts.guard_manager = load_guard_manager(load_guards_state(artifacts.guards_state), artifacts.original_code,
                                                 fn.fn.__globals__)


def _one_compile_thread() -> None:
    import torch._inductor.config

    # No pool of compile workers: loading an artifact then spent less before the first forward
    # (H200: 5.4 s against 6.2 s), and a runner does not wait for the pool's shutdown at exit.
    torch._inductor.config.compile_threads = 1


@dataclass
class CompiledBlocks:
    """Installed on every block of one transformer; `report` says where each artifact came from."""

    cache: Path
    key: str
    prefetch: Optional[Prefetch] = None  # used when its key is this one
    loaded: list = field(default_factory=list)
    prefetched: list = field(default_factory=list)
    compiled: list = field(default_factory=list)
    seconds: float = 0.0
    eager_calls: int = 0
    _fns: dict = field(default_factory=dict)

    def install(self, transformer) -> "CompiledBlocks":
        _one_compile_thread()
        if self.prefetch is not None and self.prefetch.key != self.key:
            self.prefetch = None  # loaded for other switches or another card: of no use here
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
        return artifact_path(self.cache, self.key, kind)

    def _load(self, kind: str):
        fn = self.prefetch.take(kind) if self.prefetch is not None else None
        if fn is not None:
            self.prefetched.append(kind)
        else:
            fn = load_artifact(self.path(kind))
        if fn is not None:
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
        """`seconds`: what the block calls waited for loading or compiling; `prefetch_seconds`: what the
        prefetch thread spent beside the weight load and the encoding (kinds in `prefetched`)."""
        return {"loaded": sorted(self.loaded), "prefetched": sorted(self.prefetched), "compiled": sorted(self.compiled),
                "seconds": round(self.seconds, 2),
                "prefetch_seconds": round(self.prefetch.seconds, 2) if self.prefetch is not None else None,
                "eager_calls": self.eager_calls}


def _dynamo_settings():
    """What the precompile API needs: `aot_compile` enabled, and float arguments (norm eps, scales) kept
    as constants, since a whole-graph AOT compile cannot restart its analysis to turn them into inputs."""
    return torch._dynamo.config.patch(enable_aot_compile=True, specialize_float=True)
