"""Speed-ups of the DiT's denoising forwards, each a switch with a measured default.

The 50 steps are what a T4 user waits for, and on the reference H200 two thirds of a forward
was element-wise work (norms, RoPE, copies), not matrix multiplies (docs/PERFORMANCE.md, "Speed
of the 50 steps"). `ACESTEP_SPEEDUPS` picks the switches (comma list of names, `none`, or
`default`); `apply` installs them on a loaded pipeline with one call and returns what it did,
which the runner reports in its result event beside the DiT's forward count and batch sizes.

- `contiguous`: the residual stream leaves `proj_in` as a transposed view and stays strided
  through all 24 layers; one copy makes every later element-wise kernel read it contiguously.
- `fused`: RMSNorm as one `F.rms_norm` kernel instead of six or seven passes (several in float32),
  and an attention processor (the native SDPA path of diffusers' own) with RoPE in four kernels
  instead of eight.
- `attention`: where neither flash nor cuDNN attention can run (a T4, compute capability 7.5),
  grouped-query attention fell to SDPA's unfused math path, because `enable_gqa` admits only those
  kernels; repeating K/V to the query heads lets the memory-efficient kernel run instead.
- `compile`: Inductor-compiled transformer blocks (runner/compiled_blocks.py): compiled once per
  machine and kind of call with torch's precompile API, saved in `ACESTEP_COMPILE_CACHE`, and
  loaded by every later process without tracing. It compiles the `fused` path (the stock attention
  processor breaks the graph), so it implies `fused`.
- `graphs`: CUDA graphs of the whole DiT forward (runner/cuda_graphs.py): captured on the first
  step of a job, replayed on the others, so the CPU launches one graph instead of ~1,200 kernels
  per step. CUDA only, and not with model offload (which moves the weights the graph points at).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from runner.compiled_blocks import CompiledBlocks, Prefetch, checkpoint_key, transformer_key
from runner.contract import SPEEDUP_SWITCHES as SWITCHES, speedup_names
from runner.cuda_graphs import GraphedForward
from runner.events import bad_input

ENV = "ACESTEP_SPEEDUPS"
CACHE_ENV = "ACESTEP_COMPILE_CACHE"
# Measured defaults (docs/PERFORMANCE.md, "Speed of the 50 steps"): the three eager switches
# everywhere. `graphs` and `compile` are opt-in. Graphs save CPU launch time, which a T4's longer
# kernels hide, and hold their own memory pool (+656 MiB at 240 s, job 1, float16, H200); with
# model offload, the T4's recommended setting, they cannot run at all. A cold request with the
# compiled blocks (runner started ahead, their loader imported while it waited) took 6.87 s at
# 120 s on the H200 against 6.16 s with these defaults: their 50 steps save less than their load.
DEFAULTS = {"cuda": ("contiguous", "fused", "attention"), "cpu": ("contiguous", "fused", "attention")}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "acestep-stem" / "compile"


def chosen(device: str, value: Optional[str] = None) -> tuple[str, ...]:
    """The switches `ACESTEP_SPEEDUPS` (or `value`) asks for; unknown names are the caller's error."""
    try:
        names = speedup_names(os.environ.get(ENV, "") if value is None else value)
    except ValueError as exc:
        raise bad_input("bad_speedups", str(exc)) from None
    return DEFAULTS.get(device, ()) if names is None else names


@dataclass
class Speedups:
    """What `apply` installed, and the DiT forwards counted since the last `reset`."""

    on: tuple[str, ...] = ()
    compile_cache: Optional[str] = None
    compiled: Optional[CompiledBlocks] = None
    graphs: Optional[GraphedForward] = None
    calls: int = 0
    batches: Counter = field(default_factory=Counter)
    timesteps: list = field(default_factory=list)

    def reset(self) -> None:
        self.calls, self.batches, self.timesteps = 0, Counter(), []

    def release(self) -> None:
        """After the denoising loop: the CUDA graphs' memory goes back before the VAE decodes."""
        if self.graphs is not None and self.graphs.captures:
            self.graphs.release()
            torch.cuda.empty_cache()  # else the next job's capture cannot reuse the old pool's blocks

    def count(self, _module, _args, kwargs) -> None:
        self.calls += 1
        self.batches[int(kwargs["hidden_states"].shape[0])] += 1
        self.timesteps.append(kwargs["timestep"].detach().flatten()[:1])  # read at report time: no sync here

    def report(self) -> dict:
        """For the result event: the switches that were on, and proof of what the DiT computed."""
        steps = [round(float(t), 4) for t in self.timesteps[:1] + self.timesteps[-1:]]
        return {"on": list(self.on), "compile_cache": self.compile_cache,
                "compiled_blocks": self.compiled.report() if self.compiled else None,
                "cuda_graphs": self.graphs.report() if self.graphs else None,
                "dit_forwards": {"calls": self.calls, "batch_sizes": {str(b): n for b, n in sorted(self.batches.items())},
                                 "first_t": steps[0] if steps else None, "last_t": steps[-1] if steps else None}}


def _flash(device: str) -> bool:
    """Whether SDPA may pick flash attention: a CUDA card of compute capability 8.0 or more."""
    return device == "cuda" and torch.cuda.get_device_capability() >= (8, 0)


def _compile_flags(names: tuple[str, ...], flash: bool) -> dict:
    return {"expand_kv": "attention" in names, "flash": flash}


def prefetch(transformer_dir: Path, device: str, dtype: torch.dtype,
             names: Optional[tuple[str, ...]] = None) -> Optional[Prefetch]:
    """With `compile` chosen: start loading its saved blocks now, before the weights (see `Prefetch`).
    None otherwise, or where the key cannot be known yet (`apply` then loads them itself)."""
    names = chosen(device) if names is None else names
    if "compile" not in names:
        return None
    try:
        key = checkpoint_key(transformer_dir, dtype, device == "cuda", _compile_flags(names, _flash(device)))
    except (OSError, ValueError):  # an unreadable config: from_pretrained will say so
        return None
    return Prefetch(compile_cache_dir(), key)


def apply(pipe, device: str, names: Optional[tuple[str, ...]] = None, flash: Optional[bool] = None,
          offload: bool = False, prefetched: Optional[Prefetch] = None) -> Speedups:
    """Install the chosen switches on `pipe.transformer` (already placed) and a forward counter.
    `flash`: whether SDPA may pick flash attention (default: a CUDA card of compute capability 8.0+).
    `graphs` is left off on a CPU and with model offload; the report's `on` says what was installed.
    `prefetched`: the compiled blocks `prefetch` started loading, used where its key is this one."""
    names = chosen(device) if names is None else names
    if "compile" in names and "fused" not in names:
        names = names + ("fused",)
    if flash is None:
        flash = _flash(device)
    if "graphs" in names and (device != "cuda" or offload):
        names = tuple(n for n in names if n != "graphs")
    transformer = pipe.transformer
    state = Speedups(on=tuple(n for n in SWITCHES if n in names))
    transformer.register_forward_pre_hook(state.count, with_kwargs=True)
    if "contiguous" in names:
        transformer.proj_in_conv.register_forward_hook(_contiguous_after_transpose)
    if "fused" in names:
        _install_fused(transformer, expand_kv="attention" in names, flash=flash)
    if "compile" in names:
        cache = compile_cache_dir()
        key = transformer_key(transformer, device == "cuda", _compile_flags(names, flash))
        state.compiled = CompiledBlocks(cache, key, prefetched).install(transformer)
        state.compile_cache = str(cache)
    if "graphs" in names:
        state.graphs = GraphedForward(transformer.forward)
        transformer.forward = state.graphs
    return state


def _contiguous_after_transpose(_module, _args, output):
    # The model transposes proj_in's (B, C, T) output to (B, T, C); lay it out so that view is dense.
    return output.transpose(1, 2).contiguous().transpose(1, 2)


def _install_fused(transformer, expand_kv: bool, flash: bool) -> None:
    from diffusers.models.normalization import RMSNorm

    for module in transformer.modules():
        if type(module) is RMSNorm and module.weight is not None and module.bias is None:
            module.__class__ = _FusedRMSNorm
    transformer.set_attn_processor(_FusedAttnProcessor(expand_kv, flash))


def _rms_norm(x, norm):
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _rope(x, cos, sin):
    """Qwen3's rotate-half RoPE on (B, L, H, D) with (L, D) tables, in the tensors' own dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos[None, :, None, :], rotated, sin[None, :, None, :])


class _FusedRMSNorm(torch.nn.Module):
    """diffusers' RMSNorm (weight, no bias) through one fused kernel; same parameters (the class of
    each instance is swapped, so state dicts and hooks are untouched)."""

    def forward(self, hidden_states):
        return _rms_norm(hidden_states, self)


class _FusedAttnProcessor:
    """AceStepAttnProcessor2_0's native-SDPA path with fused norms and RoPE, and no backend lookup
    (which breaks torch.compile's graph). Same projections, masks, scale and GQA. With `expand_kv`,
    K/V are repeated to the query heads wherever flash cannot run (a mask, or no flash at all), so
    SDPA can pick its memory-efficient kernel rather than the math path."""

    def __init__(self, expand_kv: bool, flash: bool):
        self.expand_kv, self.flash = expand_kv, flash

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        import torch.nn.functional as F

        is_cross = attn.is_cross_attention and encoder_hidden_states is not None
        kv_input = encoder_hidden_states if is_cross else hidden_states
        query = _rms_norm(attn.to_q(hidden_states).unflatten(-1, (attn.heads, attn.head_dim)), attn.norm_q)
        key = _rms_norm(attn.to_k(kv_input).unflatten(-1, (attn.kv_heads, attn.head_dim)), attn.norm_k)
        value = attn.to_v(kv_input).unflatten(-1, (attn.kv_heads, attn.head_dim))
        if not is_cross and image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query, key = _rope(query, cos, sin), _rope(key, cos, sin)
        gqa = attn.heads != attn.kv_heads
        if gqa and self.expand_kv and (attention_mask is not None or not self.flash):
            repeats = attn.heads // attn.kv_heads  # query head h reads K/V head h // repeats, as enable_gqa does
            key, value = key.repeat_interleave(repeats, dim=2), value.repeat_interleave(repeats, dim=2)
            gqa = False
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask,
            scale=attn.scaling, enable_gqa=gqa,
        )
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3))


def compile_cache_dir() -> Path:
    """ACESTEP_COMPILE_CACHE (or ~/.cache/acestep-stem/compile), also Inductor's cache for its kernels."""
    cache = Path(os.environ.get(CACHE_ENV) or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return cache
