"""Does the source reach lego's conditioning? Asked of the installed acestep by running it.

The probe runs the installed handler's own `generate_music` on a 2 s lego job (no repaint end,
as the runner sends it), lets it reach the installed `service_generate` and `_prepare_batch`, and
reads the batch the DiT would be conditioned on. Only the parts that need weights are small
stand-ins: the source is read as a constant 0.1 waveform, the VAE encodes any audio to latents of
+1, the silence latent is -5, the tokenizer is a word-level one. If `src_latents` over the source
are +1, the source reaches the conditioning; if -5, lego would run on silence. Nothing after the
batch runs (no DiT, no decoding): the probe stops there.

Whatever the installed code does in between, whichever function holds the bug or its fix, this
looks at the outcome, so a fix made upstream in another place is seen as a fix.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

SOURCE_SECONDS = 2
SAMPLE_RATE = 48000
HOP = 1920
SOURCE_LATENT, SILENCE_LATENT = 1.0, -5.0
INSTRUCTION = "Generate the DRUMS track based on the audio context:"


class _Reached(Exception):
    """Stops the installed code once the conditioning batch exists."""


def source_reaches_conditioning(handler_class) -> bool:
    """True when lego's `src_latents` are the encoded source, False when they are silence.

    Raises RuntimeError when the installed code never builds a batch (its API changed)."""
    import torch

    handler = _probe_handler(handler_class, torch)
    batches = []
    prepare_batch = handler._prepare_batch

    def capture(*args, **kwargs):
        batches.append(prepare_batch(*args, **kwargs))
        raise _Reached()

    handler._prepare_batch = capture
    with _acestep_logs_muted():  # the stop is logged by acestep as a failed generation: not one
        result = handler.generate_music(
            captions="drums", lyrics="", bpm=120, src_audio="probe.wav", task_type="lego", instruction=INSTRUCTION,
            repainting_start=0.0, repainting_end=-1, batch_size=1, use_random_seed=False, seed=7, inference_steps=2,
        )
    if not batches:
        error = result.get("error") if isinstance(result, dict) else result
        raise RuntimeError(f"the installed generate_music built no conditioning batch ({error})")
    frames = SOURCE_SECONDS * SAMPLE_RATE // HOP
    src_latents = batches[0]["src_latents"][0, :frames].float()
    if torch.all(src_latents == SOURCE_LATENT):
        return True
    if torch.all(src_latents == SILENCE_LATENT):
        return False
    raise RuntimeError("lego's src_latents are neither the source nor silence; the probe cannot tell")


@contextlib.contextmanager
def _acestep_logs_muted():
    try:
        from loguru import logger
    except ImportError:
        yield
        return
    logger.disable("acestep")
    try:
        yield
    finally:
        logger.enable("acestep")


def _probe_handler(handler_class, torch):
    handler = handler_class()
    handler.device, handler.dtype = "cpu", torch.float32
    handler.config = SimpleNamespace(is_turbo=False, is_lego_sft=False)
    handler.model = SimpleNamespace(config=handler.config)  # "loaded": only its config is read before the batch
    handler.vae = handler.text_encoder = object()
    handler.text_tokenizer = _word_tokenizer()
    handler.silence_latent = torch.full((1, 1000, 64), SILENCE_LATENT)
    handler.offload_to_cpu = False
    handler.process_src_audio = lambda path: torch.full((2, SOURCE_SECONDS * SAMPLE_RATE), 0.1)
    handler._encode_audio_to_latents = lambda wav: torch.full((wav.shape[-1] // HOP, 64), SOURCE_LATENT)
    return handler


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
