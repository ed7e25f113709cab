"""The three acestep patches, on the real installed code (ace-step15-fork 20260212, nano-vllm-fork).
The lego patch's own tests are in test_lego_patch.py.

Every test starts and ends with the original functions in place (`patches.undo()`), so order does
not matter. Each "fixed" assertion is paired with the unpatched behaviour, so a no-op patch fails.
"""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import patches
from patch_helpers import originals_in_place  # noqa: F401 (the autouse fixture)
from patches import graph_capture_fallback, lego_source_context, llm_eager_mode

ROOT = Path(__file__).resolve().parents[1]


# --- importing ---------------------------------------------------------------------------------

def test_importing_patches_imports_neither_torch_nor_acestep():
    code = "import sys, patches; print(sorted(m for m in ('torch', 'acestep', 'nanovllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_or_changed_target_is_reported_not_found():
    class NoPadding:
        pass

    class OtherSignature:
        def prepare_padding_info(self, batch, audio):
            return None

    assert lego_source_context.apply(NoPadding).status == patches.NOT_FOUND
    outcome = lego_source_context.apply(OtherSignature)
    assert outcome.status == patches.NOT_FOUND and "is_lego_task" in outcome.detail
    assert llm_eager_mode.apply(NoPadding).status == patches.NOT_FOUND
    assert graph_capture_fallback.apply(NoPadding).status == patches.NOT_FOUND


def test_apply_logs_one_outcome_per_patch(caplog):
    with caplog.at_level(logging.INFO, logger="patches"):
        outcomes = patches.apply()
    assert set(outcomes) == {"lego_source_context", "llm_eager_mode", "graph_capture_fallback"}
    messages = [r.getMessage() for r in caplog.records if r.name == "patches"]
    for name, outcome in outcomes.items():
        assert outcome.status in patches.STATUSES
        assert any(m.startswith(f"{name}: {outcome.status}") for m in messages)


# --- patch 2: LLM eager mode --------------------------------------------------------------------

@pytest.fixture
def cuda_and_nanovllm_doubles(monkeypatch):
    """Lets the real _initialize_5hz_lm_vllm run on this CPU machine up to its LLM(...) call.

    The nanovllm double records the keyword arguments the way nano-vllm's LLM(model, **kwargs) takes them."""
    calls = []

    class RecordingLLM:
        def __init__(self, model, **kwargs):
            calls.append(dict(kwargs, model=model))

    fake = types.ModuleType("nanovllm")
    fake.LLM, fake.SamplingParams = RecordingLLM, object
    monkeypatch.setitem(sys.modules, "nanovllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "double")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return calls, fake, RecordingLLM


def _start_language_model():
    from acestep.llm_inference import LLMHandler

    handler = LLMHandler()
    handler.llm_tokenizer = None
    handler.get_gpu_memory_utilization = lambda **kwargs: (0.5, False)
    status = handler._initialize_5hz_lm_vllm("/checkpoints/acestep-5Hz-lm-1.7B")
    assert status.startswith("✅"), status
    return handler


def test_real_llm_handler_starts_nano_vllm_eager_once_patched(cuda_and_nanovllm_doubles):
    calls, fake, recording_llm = cuda_and_nanovllm_doubles
    _start_language_model()
    assert calls[-1]["enforce_eager"] is False  # what the fork does by itself

    assert patches.apply()["llm_eager_mode"].status == patches.APPLIED
    handler = _start_language_model()
    assert calls[-1]["enforce_eager"] is True
    assert isinstance(handler.llm, recording_llm)
    assert fake.LLM is recording_llm  # put back after the call


def test_official_shape_gets_enforce_eager_true_passed():
    class OfficialLLMHandler:
        def _initialize_5hz_lm_vllm(self, model_path, enforce_eager=False):
            return enforce_eager

    assert OfficialLLMHandler()._initialize_5hz_lm_vllm("m") is False
    outcome = llm_eager_mode.apply(OfficialLLMHandler)
    assert outcome.status == patches.APPLIED and "passes enforce_eager=True" in outcome.detail
    assert OfficialLLMHandler()._initialize_5hz_lm_vllm("m", enforce_eager=False) is True
    assert OfficialLLMHandler()._initialize_5hz_lm_vllm("m", False) is True


# --- patch 3: graph-capture fallback ------------------------------------------------------------

class CaptureFailsAfterDrawing:
    """A nano-vllm ModelRunner in small: capture draws random numbers, builds part of its graphs, then fails."""

    def __init__(self, device="cpu"):
        self.device = device
        self.enforce_eager = False
        self.config = SimpleNamespace(enforce_eager=False)

    def capture_cudagraph(self):
        self.graphs = {1: "partial"}
        torch.rand(8, device=self.device)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def _draws_after_failed_capture(runner):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    try:
        runner.capture_cudagraph()
    except RuntimeError:
        pass
    return expected, torch.rand(4)


def test_failed_capture_restores_cpu_rng_and_continues_eager():
    runner = CaptureFailsAfterDrawing()
    expected, drawn = _draws_after_failed_capture(runner)
    assert not torch.equal(expected, drawn)  # unpatched: the RNG moved and the error escaped

    assert graph_capture_fallback.apply(CaptureFailsAfterDrawing).status == patches.APPLIED
    runner = CaptureFailsAfterDrawing()
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    assert runner.capture_cudagraph() is None
    assert torch.equal(torch.rand(4), expected)
    assert runner.enforce_eager is True and runner.config.enforce_eager is True
    assert not hasattr(runner, "graphs")
    graph_capture_fallback.undo(CaptureFailsAfterDrawing)


class RealCaptureFails:
    """A runner whose capture is a real torch.cuda.graph capture that fails part way (a host sync)."""

    def __init__(self):
        self.enforce_eager = False
        self.config = SimpleNamespace(enforce_eager=False)

    def capture_cudagraph(self):
        x = torch.zeros(4, device="cuda")
        torch.rand(8, device="cuda")
        self.graphs = {1: torch.cuda.CUDAGraph()}
        with torch.cuda.graph(self.graphs[1]):
            (x + torch.rand(4, device="cuda")).sum().item()  # not allowed while capturing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_failed_real_capture_restores_cuda_rng_and_cuda_sampling_works():
    assert graph_capture_fallback.apply(RealCaptureFails).status == patches.APPLIED
    try:
        torch.cuda.init()
        torch.manual_seed(99)
        torch.cuda.manual_seed_all(99)
        expected_cpu, expected_cuda = torch.rand(4), torch.rand(4, device="cuda")
        torch.manual_seed(99)
        torch.cuda.manual_seed_all(99)
        runner = RealCaptureFails()
        assert runner.capture_cudagraph() is None
        assert torch.equal(torch.rand(4), expected_cpu)
        assert torch.equal(torch.rand(4, device="cuda"), expected_cuda)  # fails with set_rng_state_all alone
        assert runner.enforce_eager is True and not hasattr(runner, "graphs")
    finally:
        graph_capture_fallback.undo(RealCaptureFails)


@pytest.fixture
def real_model_runner(monkeypatch):
    """nano-vllm's real ModelRunner; flash_attn (GPU-only wheels) is replaced by an empty stand-in
    when absent, and every nanovllm module imported here is forgotten afterwards."""
    if importlib.util.find_spec("nanovllm") is None:
        pytest.fail("nano-vllm-fork is not installed; `make test` installs it")
    if importlib.util.find_spec("flash_attn") is None:
        stand_in = types.ModuleType("flash_attn")
        stand_in.flash_attn_varlen_func = stand_in.flash_attn_with_kvcache = None
        monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    before = set(sys.modules)
    from nanovllm.engine.model_runner import ModelRunner

    yield ModelRunner
    graph_capture_fallback.undo(ModelRunner)
    for name in set(sys.modules) - before:
        if name == "nanovllm" or name.startswith("nanovllm."):
            del sys.modules[name]


def _bare_runner(model_runner_class):
    runner = object.__new__(model_runner_class)
    runner.config = SimpleNamespace(max_num_seqs=4, max_model_len=256, enforce_eager=False,
                                    hf_config=SimpleNamespace(hidden_size=8))
    runner.block_size, runner.enforce_eager, runner.model = 256, False, None
    return runner


def test_real_model_runner_capture_falls_back_to_eager(real_model_runner, monkeypatch):
    def capture_that_draws_then_fails():
        torch.rand(16)
        raise RuntimeError("graph capture failed")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", capture_that_draws_then_fails)
    with pytest.raises(RuntimeError):
        _bare_runner(real_model_runner).capture_cudagraph()

    assert graph_capture_fallback.apply(real_model_runner).status == patches.APPLIED
    runner = _bare_runner(real_model_runner)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    runner.capture_cudagraph()  # the real method body runs and fails inside; the wrapper catches
    assert torch.equal(torch.rand(3), expected)
    assert runner.enforce_eager is True and runner.config.enforce_eager is True
    assert not hasattr(runner, "graphs")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_without_flash_attn_nano_vllm_is_target_not_found():
    outcome = graph_capture_fallback.apply()
    assert outcome.status == patches.NOT_FOUND and "flash_attn" in outcome.detail
    assert graph_capture_fallback.apply().detail == outcome.detail  # a second attempt fails the same way
