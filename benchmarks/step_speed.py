"""Speed of the DiT's denoising steps through the runner's switches (runner/speedups.py).

`gpu_bench.py --parts speed` runs this in a child process (so the memory runs' parent holds no
CUDA context); it can also run alone. Per dtype (bfloat16; float16 with the attention kernels a
T4 has: flash attention is withheld, the memory-efficient and math SDPA kernels remain), it prints
first the proof that the real computation runs (the forward's input shapes with the batch doubled
by guidance, then each full run's DiT call count, batch sizes and first/last timestep), then:

  costs     FLOPs and bytes of one eager forward, op by op, in three classes (benchmarks/roofline.py)
  variants  per switch set: first-call seconds (the compile), per-forward ms (median), a profile
            of one forward split into matmul / attention / other kernels, error against eager
  steps     the whole denoising loop at 20, 32 and 50 steps, eager and all switches on, and the
            share of the card's measured matrix rate the 50 steps reach
  fresh     a new process's first forward with the compile cache warm, against eager's, and
            `python -m runner lego` from a cold start with the switches off and on
            (benchmarks/cold_compile.py)
  t4        the T4 projection (see `t4_projection`)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = {"eager": (), "contiguous": ("contiguous",), "fused": ("contiguous", "fused"),
            "attention": ("contiguous", "fused", "attention"), "graphs": ("contiguous", "fused", "attention", "graphs"),
            "compile": ("contiguous", "fused", "attention", "compile"),
            "compile_graphs": ("contiguous", "fused", "attention", "compile", "graphs")}
RESULTS: dict = {}


def emit(key: str, value) -> None:
    RESULTS[key] = value
    print(json.dumps({key: value}, default=str), flush=True)


def guarded(key: str, fn, *args, **kwargs):
    """One measurement; a failure is printed and recorded, and the others still run."""
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a benchmark reports every failure and goes on
        emit(key + "_error", traceback.format_exc(limit=-6)[:3000])
        return None


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def ceilings() -> dict:
    """The card's matrix rate on random data (8192^3, mean of 10 after 3) and device copy bandwidth."""
    import torch

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        out[f"{name}_tflops"] = round(2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12, 1)
    x = torch.randn(2**30, device="cuda", dtype=torch.float32)  # 4 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    out["copy_gbps"] = round(2 * x.numel() * 4 * 5 / (start.elapsed_time(end) / 1e3) / 1e9, 1)
    return out


def make_source(seconds: float):
    import torch
    from runner.sampling import model_source

    rng = np.random.default_rng(int(seconds))
    t = np.arange(int(seconds * 48000)) / 48000
    tone = 0.3 * np.sin(2 * np.pi * 196 * t)
    data = np.stack([tone, tone]) + 0.02 * rng.standard_normal((2, t.size))
    return torch.from_numpy(model_source(data))


def load_pipe(ckpt: Path, dtype, device: str):
    from diffusers import AceStepPipeline

    pipe = AceStepPipeline.from_pretrained(str(ckpt), torch_dtype=dtype, audio_tokenizer=None, audio_token_detokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def fresh_transformer(ckpt: Path, dtype, device: str):
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel

    return AceStepTransformer1DModel.from_pretrained(str(ckpt / "transformer"), torch_dtype=dtype).to(device).eval()


def run_pipe(pipe, src, steps: int, device: str, batch: int = 1, seed: int = 1):
    """The runner's lego call, latents out; returns (latents, seconds of the denoising loop)."""
    import torch

    marks = {}
    open_bar = pipe.progress_bar

    def progress_bar(*a, **k):
        sync(device)
        marks["loop"] = time.perf_counter()
        return open_bar(*a, **k)

    pipe.progress_bar = progress_bar
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    try:
        with torch.inference_mode():
            latents = pipe(prompt=["soulful vocalist"] * batch, lyrics=[""] * batch, src_audio=src, task_type="lego",
                           track_name="VOCALS", instruction="Generate the VOCALS track based on the audio context:",
                           num_inference_steps=steps, guidance_scale=7.0, bpm=120, audio_duration=src.shape[-1] / 48000,
                           generator=torch.Generator().manual_seed(seed), output_type="latent").audios
        sync(device)
    finally:
        del pipe.progress_bar
    return latents, time.perf_counter() - marks["loop"]


def capture_kwargs(pipe, src, device: str) -> dict:
    captured = {}

    def grab(_module, _args, kwargs):
        captured.setdefault("k", dict(kwargs))

    hook = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_pipe(pipe, src, 1, device)
    finally:
        hook.remove()
    return {k: v.clone() if hasattr(v, "clone") else v for k, v in captured["k"].items()}


def forward(tr, kwargs):
    import torch

    with torch.inference_mode():
        return tr(**kwargs)[0]


def count_costs(tr, kwargs):
    """One forward under `OpCosts`, outside inference mode: there the dispatch mode would see
    composite ops (linear, SDPA) whole instead of the kernels they run."""
    import torch

    from benchmarks.roofline import OpCosts

    with torch.no_grad(), OpCosts() as costs:
        tr(**kwargs)
    return costs


def forward_ms(tr, kwargs, device: str, repeats: int) -> float:
    import torch

    for _ in range(2):
        forward(tr, kwargs)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(tr, kwargs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            forward(tr, kwargs)
            times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


def profile_forward(tr, kwargs) -> dict:
    """One forward's CUDA kernels, summed per class, and the heaviest kernels by name."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.roofline import kernel_class

    forward(tr, kwargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(tr, kwargs)
        torch.cuda.synchronize()
    per_class, per_name, launches = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, {}, 0
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        us = evt.time_range.elapsed_us()
        per_class[kernel_class(evt.name)] += us / 1e3
        per_name[evt.name[:90]] = per_name.get(evt.name[:90], 0.0) + us / 1e3
        launches += 1
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:8]
    return {"kernel_ms": {k: round(v, 3) for k, v in per_class.items()}, "kernels": launches,
            "top": [[n, round(ms, 3)] for n, ms in top]}


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def t4_attention():
    """The SDPA kernels a T4 (sm_75) can run: no flash attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def measure_dtype(ckpt: Path, dtype_name: str, args, ceil: dict) -> None:
    import torch

    from benchmarks.roofline import project
    from runner import speedups

    t4 = dtype_name == "float16" and args.device == "cuda"
    tag = f"{dtype_name}{'_t4attn' if t4 else ''}"
    dtype = getattr(torch, dtype_name)
    with (t4_attention() if t4 else contextlib.nullcontext()):
        pipe = load_pipe(ckpt, dtype, args.device)
        src = make_source(args.seconds)
        kwargs = capture_kwargs(pipe, src, args.device)
        emit(f"{tag}_proof_forward_inputs", {k: list(v.shape) for k, v in kwargs.items() if hasattr(v, "shape")})
        if kwargs["hidden_states"].shape[0] != 2:
            raise RuntimeError("guidance did not double the batch: the DiT ran at batch "
                               f"{kwargs['hidden_states'].shape[0]}, not 2")
        eager_tr = pipe.transformer
        reference = forward(eager_tr, kwargs)
        costs = count_costs(eager_tr, kwargs)
        flops = sum(f for _, f, _ in costs.floor_inputs)
        emit(f"{tag}_costs", {"tflop_per_forward": round(flops / 1e12, 3), "by_class": costs.summary(), "top_ops": costs.top_ops()})
        if args.device == "cuda":
            rate = ceil["bf16_tflops" if dtype_name == "bfloat16" else "fp16_tflops"]
            emit(f"{tag}_floor_h200_ms", project(costs, rate, ceil["copy_gbps"]))
            emit(f"{tag}_floor_t4_ms", project(costs, 65.0, 320.0))
        keep = {"eager": (eager_tr, speedups.apply(SimpleNamespace(transformer=eager_tr), args.device, (), flash=not t4))}
        for name in args.variants:
            if name == "eager":
                tr, state = keep["eager"]
            else:
                tr = fresh_transformer(ckpt, dtype, args.device)
                state = speedups.apply(SimpleNamespace(transformer=tr), args.device, VARIANTS[name], flash=not t4)
            if name == "attention":  # the ops a T4 runs with the eager switches on, for its floor
                fused_costs = count_costs(tr, kwargs)
                emit(f"{tag}_costs_attention_variant", {"by_class": fused_costs.summary(), "top_ops": fused_costs.top_ops()})
                if args.device == "cuda":
                    emit(f"{tag}_floor_t4_ms_attention_variant", project(fused_costs, 65.0, 320.0))
            t = time.perf_counter()
            out = forward(tr, kwargs)
            sync(args.device)
            row = {"first_call_s": round(time.perf_counter() - t, 3), "on": list(state.on),
                   "compiled_blocks": state.report()["compiled_blocks"],
                   "forward_ms": forward_ms(tr, kwargs, args.device, args.repeats),
                   "rel_err_vs_eager": float(f"{rel_err(out, reference):.3g}"), "finite": bool(torch.isfinite(out).all())}
            if args.device == "cuda":
                row["tflops"] = round(flops / (row["forward_ms"] / 1e3) / 1e12, 1)
                row["share_of_measured_rate"] = round(row["tflops"] / ceil["bf16_tflops" if dtype_name == "bfloat16" else "fp16_tflops"], 3)
                row.update(guarded(f"{tag}_{name}_profile", profile_forward, tr, kwargs) or {})
            emit(f"{tag}_variant_{name}", row)
            if name == "eager" or name in args.loop_variants:
                keep[name] = (tr, state)
            else:
                del tr
        latents = {}
        for name in dict.fromkeys(["eager"] + [v for v in args.variants if v in args.loop_variants]):
            tr, state = keep[name]
            pipe.transformer = tr
            for steps in args.steps_list:
                state.reset()
                lat, seconds = run_pipe(pipe, src, steps, args.device)
                report = state.report()
                row = {"steps": steps, "loop_s": round(seconds, 3), "per_step_ms": round(seconds / steps * 1e3, 2),
                       "dit": report["dit_forwards"], "finite": bool(torch.isfinite(lat).all()),
                       "cuda_graphs": report["cuda_graphs"], "compiled_blocks": report["compiled_blocks"]}
                if report["dit_forwards"]["calls"] != steps or report["dit_forwards"]["batch_sizes"] != {"2": steps}:
                    row["WARNING"] = "the DiT did not run once per step at the doubled batch"
                if args.device == "cuda":
                    row["peak_allocated_mib"] = torch.cuda.max_memory_allocated() // 2**20
                    row["share_of_bf16_rate"] = round(flops * steps / seconds / 1e12 / ceil["bf16_tflops"], 3)
                emit(f"{tag}_steps_{name}_{steps}", row)
                latents[(name, steps)] = lat
        top = max(args.steps_list)
        for name in {n for n, _ in latents} - {"eager"}:
            err = rel_err(latents[(name, top)], latents[("eager", top)])
            emit(f"{tag}_latents_rel_err_{name}_vs_eager_{top}_steps", float(f"{err:.3g}"))
    del pipe, keep
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--project", type=Path, help="only print the T4 projection of a saved --json file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/acestep-bench"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--steps-list", default="20,32,50")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default="eager,contiguous,fused,attention,compile")
    parser.add_argument("--loop-variants", default="", help="variants also run through the full loop (default: the last)")
    parser.add_argument("--cold-runs", type=int, default=2)
    parser.add_argument("--cold-settings", default="none;default", help="ACESTEP_SPEEDUPS values for the cold runs, ';'-separated; "
                        "a value ending in /noprefetch leaves the compiled blocks' prefetch thread out")
    parser.add_argument("--fresh-variant", default="compile", help="the variant whose fresh-process first call is measured (none: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.project:
        RESULTS.update(json.loads(args.project.read_text()))
        t4_projection(RESULTS["ceilings"])
        return 0
    args.dtypes, args.variants = args.dtypes.split(","), args.variants.split(",")
    args.loop_variants = args.loop_variants.split(",") if args.loop_variants else args.variants[-1:]
    args.steps_list = [int(s) for s in args.steps_list.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    ceil = {}
    if args.device == "cuda":
        ceil = ceilings()
        emit("ceilings", ceil | {"card": torch.cuda.get_device_name(0)})
    for dtype_name in args.dtypes:
        guarded(f"measure_{dtype_name}", measure_dtype, args.checkpoints, dtype_name, args, ceil)
    from benchmarks import cold_compile

    if args.fresh_variant != "none":
        guarded("fresh", cold_compile.fresh_processes, args.checkpoints, args, emit)
    if args.cold_runs:
        guarded("cold", cold_compile.cold_runner, args.checkpoints, args, emit)
    if args.device == "cuda":
        guarded("t4", t4_projection, ceil)
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=1, default=str))
    print_summary()
    return 0


def t4_projection(ceil: dict) -> None:
    """A T4's step time from what the H200 measured in float16 with the T4's attention kernels.

    Each kernel class is assumed to reach the same share of the T4's ceiling as it reached of
    the H200's: matmul and attention time scale by the fp16 matrix rates (H200 measured / T4's
    65 TFLOP/s), element-wise time by the memory bandwidths (H200 measured copy / T4's 320 GB/s).
    A step is one forward: the scheduler and guidance work beside it is a few small kernels on
    a (2, T, 64) latent, under a millisecond, and not modelled; nor are CPU launch gaps, which a
    T4's longer kernels hide. The roofline floors (`*_floor_t4_ms`) give the least a T4 could
    take for the same ops."""
    rate_ratio, bw_ratio = ceil["fp16_tflops"] / 65.0, ceil["copy_gbps"] / 320.0
    out = {"rate_ratio": round(rate_ratio, 2), "bandwidth_ratio": round(bw_ratio, 2)}
    for name in VARIANTS:
        variant = RESULTS.get(f"float16_t4attn_variant_{name}")
        if not variant or "kernel_ms" not in variant:
            continue
        k = variant["kernel_ms"]
        fwd = (k["matmul"] + k["attention"]) * rate_ratio + k["other"] * bw_ratio
        out[name] = {"per_step_ms": round(fwd, 1), "steps_s": {n: round(fwd * n / 1e3, 1) for n in (20, 32, 50)}}
    emit("t4_projection", out)


def print_summary() -> None:
    print("\nvariant                       first_s  fwd_ms  matmul  attn   other   share  err")
    for key, row in RESULTS.items():
        if "_variant_" in key and isinstance(row, dict):
            k = row.get("kernel_ms", {})
            print(f"{key:29} {row['first_call_s']:7} {row['forward_ms']:7} {k.get('matmul', ''):7} {k.get('attention', ''):6} "
                  f"{k.get('other', ''):7} {row.get('share_of_measured_rate', '')!s:6} {row['rel_err_vs_eager']}")
    for key, row in RESULTS.items():
        if "_steps_" in key and isinstance(row, dict):
            print(f"{key:36} loop {row['loop_s']:7} s  {row['per_step_ms']:7} ms/step  calls {row['dit']['calls']} "
                  f"batches {row['dit']['batch_sizes']}  t {row['dit']['first_t']}..{row['dit']['last_t']}  share {row.get('share_of_bf16_rate', '')}")


if __name__ == "__main__":
    sys.exit(main())
