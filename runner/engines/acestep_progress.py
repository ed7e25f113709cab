"""Real progress from ACE-Step's own diffusion loop, for both installed APIs.

`generate_music` itself reports only coarse fractions, and the official code fills the diffusion
with a time-based estimate from a background thread (it reached 199/200 at about a third of the
steps). This hooks the loop instead: the DiT's `generate_audio` starts after the source's VAE
encoding and the text encoding (so those count as "encoding", not generation time), each call of
its `decoder` is one step (the Euler sampler calls it once a step; the guidance batch is inside
that call), and `generate_audio`'s return starts the VAE decoding. Before that, each call of the
VAE's `encoder` is one encoded piece of the source (ACE-Step's tiled encode calls it once a piece),
reported against the piece count of runner.sampling's plan of that same tiling. The hooks are set on
the loaded model instances for one generation and always removed.

The official code runs `generate_audio` in a worker thread: the callbacks are then called from
that thread (EventStream serialises its writes), and they never raise there. Cancellation stays
with the main thread's SIGTERM handler (runner/cancellation.py).
"""
from __future__ import annotations

import functools
import logging
import threading

from runner.contract import Stage
from runner.engines.base import StageCallback, StepCallback

LOG = logging.getLogger("runner.acestep")


class DiffusionProgress:
    """Context manager: while open, `model.generate_audio` and `model.decoder` report to the callbacks,
    and so does `vae.encoder` (one event per piece of `pieces`) until the diffusion starts."""

    def __init__(self, model, total: int, on_stage: StageCallback, on_step: StepCallback, vae=None, pieces: int = 0):
        self.model, self.total, self.on_stage, self.on_step = model, total, on_stage, on_step
        self.vae, self.pieces = vae, pieces
        self.calls = 0  # decoder calls seen: the steps actually run
        self.encoded = 0  # encoder calls seen before the diffusion: the source's pieces
        self.started = self.finished = False
        self._lock = threading.Lock()
        self._hook = None
        self._encode_hook = None

    def __enter__(self) -> "DiffusionProgress":
        model = self.model
        original = getattr(model, "generate_audio", None)  # the bound method of the loaded model
        if original is None:
            return self  # nothing loaded: ACE-Step refuses the job itself, with its own message

        @functools.wraps(original)
        def generate_audio(*args, **kwargs):
            self._began()
            try:
                return original(*args, **kwargs)
            finally:
                self._ended()

        model.generate_audio = generate_audio  # an instance attribute: the class stays untouched
        decoder = getattr(model, "decoder", None)
        if decoder is not None and hasattr(decoder, "register_forward_hook"):
            self._hook = decoder.register_forward_hook(self._decoder_called)
        else:
            LOG.warning("the loaded DiT has no decoder module to count steps on; progress shows the end only")
        encoder = getattr(self.vae, "encoder", None)
        if self.pieces > 0 and hasattr(encoder, "register_forward_hook"):
            self._encode_hook = encoder.register_forward_hook(self._piece_encoded)
        return self

    def __exit__(self, *exc_info) -> None:
        getattr(self.model, "__dict__", {}).pop("generate_audio", None)
        for hook in (self._hook, self._encode_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._encode_hook = None

    def _began(self) -> None:
        with self._lock:
            if self.started:
                return
            self.started = True
        self._safely(self.on_stage, "generating")

    def _piece_encoded(self, _module, _inputs, _output) -> None:
        with self._lock:
            if self.started:
                return  # the diffusion has begun: not the source's encoding
            self.encoded += 1
            piece = min(self.encoded, self.pieces)
        self._safely(self.on_step, piece, self.pieces, Stage.ENCODING.value)

    def _decoder_called(self, _module, _inputs, _output) -> None:
        with self._lock:
            self.calls += 1
            step = min(self.calls, self.total)
        self._safely(self.on_step, step, self.total)

    def _ended(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.finished = True
        self._safely(self.on_stage, "decoding")

    @staticmethod
    def _safely(callback, *args) -> None:
        # Called inside ACE-Step's loop, possibly in its worker thread: a failing event write must
        # not become a failed generation there (the stream's own errors surface on its next write).
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - reported, never raised into the library
            LOG.exception("progress callback failed")
