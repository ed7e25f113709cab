"""Choosing device, precision and offload for `auto` (issue 2), kept apart so `check` can report it."""
from __future__ import annotations

from dataclasses import dataclass

from runner.events import bad_input

DTYPES = ("bfloat16", "float16", "float32")
OFFLOAD_BELOW_BYTES = 20 * 1024**3  # offload the text encoder and VAE on GPUs under 20 GB


@dataclass
class Placement:
    device: str
    dtype: str
    offload: bool
    dtype_auto: bool
    gpu_name: str | None = None
    gpu_total_bytes: int | None = None
    compute_capability: tuple[int, int] | None = None


def choose(device: str = "auto", dtype: str = "auto", offload: str = "auto") -> Placement:
    """Resolve the three `auto`s: bf16 from compute capability 8.0, fp16 on older CUDA cards, fp32 on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise bad_input("cuda_unavailable", "--device cuda was asked for but torch sees no CUDA GPU; use --device auto or cpu.")
    if device not in ("cuda", "cpu"):
        raise bad_input("bad_device", f"Unknown device {device!r}; choose auto, cuda or cpu.")
    name = total = cc = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, total, cc = props.name, int(props.total_memory), (props.major, props.minor)
    dtype_auto = dtype == "auto"
    if dtype_auto:
        if device == "cpu":
            dtype = "float32"
        else:
            dtype = "bfloat16" if cc >= (8, 0) else "float16"
    if dtype not in DTYPES:
        raise bad_input("bad_dtype", f"Unknown dtype {dtype!r}; choose auto, bfloat16, float16 or float32.")
    if offload == "auto":
        use_offload = device == "cuda" and total < OFFLOAD_BELOW_BYTES
    elif offload in ("on", "off"):
        use_offload = offload == "on" and device == "cuda"
    else:
        raise bad_input("bad_offload", f"Unknown offload setting {offload!r}; choose auto, on or off.")
    return Placement(device, dtype, use_offload, dtype_auto, name, total, cc)


def gpu_total_gib(device: str) -> float:
    """What the official encoder reads to size its pieces (acestep/gpu_config.py get_gpu_memory_gb): 0 without CUDA."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def import_torch_seconds(engine: str | None = None) -> float:
    """Import torch and the engine's own stack, never another engine's (runner/engines)."""
    from runner.engines import import_seconds

    return import_seconds(engine)


def reset_cuda_peak() -> None:
    """Start each job's peak-memory count afresh (a keep-warm runner serves several)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_allocated() -> int | None:
    """Peak bytes held by tensors: what the job needs, where `peak_vram_bytes` (reserved) adds the cache."""
    import torch

    if not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())
