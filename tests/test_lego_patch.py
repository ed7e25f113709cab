"""Patch 1, lego_source_context, on the real installed ace-step15-fork 20260212: the fork silences
lego's conditioning, the patch brings the source back, and the probe decides by behaviour.

Every test starts and ends with the original functions in place (`patches.undo()`), so order does
not matter. Each "fixed" assertion is paired with the unpatched behaviour, so a no-op patch fails.
"""
from __future__ import annotations

import torch

import patches
from patch_helpers import LEGO_INSTRUCTION, handler_class, new_handler, originals_in_place, padding_arguments  # noqa: F401 (the autouse fixture)
from patches import lego_probe, lego_source_context
from patches._wrapping import MARK


# --- patch 1: lego source context ----------------------------------------------------------------

def test_real_prepare_padding_info_ends_lego_at_source_length_until_patched():
    handler = new_handler()
    start, end, wavs = handler.prepare_padding_info(**padding_arguments())
    assert (start, end) == ([0.0], [2.0])  # the bug: a repaint window over the whole clip

    assert patches.apply()["lego_source_context"].status == patches.APPLIED
    fixed_start, fixed_end, fixed_wavs = handler.prepare_padding_info(**padding_arguments())
    assert (fixed_start, fixed_end) == ([0.0], None)
    assert torch.equal(fixed_wavs, wavs)


def test_patch_leaves_other_cases_to_the_original():
    patches.apply()
    handler = new_handler()
    assert handler.prepare_padding_info(**padding_arguments(repainting_end=1.5))[1] == [1.5]
    assert handler.prepare_padding_info(**padding_arguments(repainting_end=-1))[1] is None
    repaint = padding_arguments(is_lego_task=False, is_repaint_task=True)
    assert handler.prepare_padding_info(**repaint)[1] == [2.0]
    no_source = padding_arguments(processed_src_audio=None, audio_duration=3.0)
    assert handler.prepare_padding_info(**no_source)[1] is None


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def _conditioning_for_lego(handler):
    """Run the real prepare_padding_info and _prepare_batch; the VAE is replaced by a constant encoder."""
    handler.device, handler.dtype = "cpu", torch.float32
    handler.text_tokenizer = _word_tokenizer()
    handler.silence_latent = torch.full((1, 1000, 64), -5.0)
    handler._encode_audio_to_latents = lambda wav: torch.full((wav.shape[-1] // 1920, 64), 1.0)
    start, end, wavs = handler.prepare_padding_info(**padding_arguments())
    return handler._prepare_batch(
        captions=["live acoustic drum kit"], lyrics=[""], target_wavs=wavs, refer_audios=[[torch.zeros(2, 48000)]],
        metas=[{"bpm": 120}], vocal_languages=["unknown"], repainting_start=start, repainting_end=end,
        instructions=[LEGO_INSTRUCTION], audio_code_hints=[None],
    )


def test_unpatched_lego_conditions_the_dit_on_silence_and_patched_on_the_source():
    source_frames = 2 * 48000 // 1920  # 50 latent frames of encoded source
    batch = _conditioning_for_lego(new_handler())
    assert torch.all(batch["src_latents"][0, :source_frames] == -5.0)  # silence_latent: the source is gone

    patches.apply()
    batch = _conditioning_for_lego(new_handler())
    assert torch.all(batch["src_latents"][0, :source_frames] == 1.0)  # the encoded source
    assert bool(batch["chunk_masks"].all())  # the full-mask branch


def test_real_generate_music_passes_no_end_to_the_diffusion_once_patched():
    class Stop(Exception):
        pass

    def end_seen_by_service_generate():
        handler = new_handler()
        handler.model = handler.vae = handler.text_tokenizer = handler.text_encoder = object()
        handler.process_src_audio = lambda path: torch.full((2, 2 * 48000), 0.1)
        seen = {}

        def service_generate(**kwargs):
            seen.update(kwargs)
            raise Stop

        handler.service_generate = service_generate
        handler.generate_music(
            captions="drums", lyrics="", bpm=120, src_audio="source.wav", task_type="lego",
            instruction=LEGO_INSTRUCTION, repainting_start=0.0, repainting_end=-1, batch_size=1,
            use_random_seed=False, seed=7, inference_steps=2,
        )
        return seen["repainting_end"]

    assert end_seen_by_service_generate() == [2.0]
    patches.apply()
    assert end_seen_by_service_generate() is None


def test_apply_twice_wraps_once_and_undo_restores():
    original = handler_class().__dict__["prepare_padding_info"]
    first, second = patches.apply(), patches.apply()
    assert first["lego_source_context"].status == second["lego_source_context"].status == patches.APPLIED
    assert "already wrapped" in second["lego_source_context"].detail
    wrapper = handler_class().__dict__["prepare_padding_info"]
    assert wrapper is not original and wrapper.__wrapped__ is original
    assert getattr(wrapper, MARK) == "lego_source_context"
    assert patches.undo()["lego_source_context"] is True
    assert handler_class().__dict__["prepare_padding_info"] is original


LEGO_WORDS = "based on the audio context"


def test_split_layout_patches_the_mixin_that_defines_the_method():
    real = handler_class()

    class PaddingMixin:
        prepare_padding_info = real.__dict__["prepare_padding_info"]

    class SplitHandler(PaddingMixin, real):
        pass

    outcome = lego_source_context.apply(SplitHandler)
    assert outcome.status == patches.APPLIED and "PaddingMixin" in outcome.detail
    assert getattr(PaddingMixin.__dict__["prepare_padding_info"], MARK) == "lego_source_context"
    assert getattr(real.__dict__["prepare_padding_info"], MARK, None) is None
    assert lego_probe.source_reaches_conditioning(SplitHandler) is True
    assert lego_source_context.undo(SplitHandler) is True
    assert lego_probe.source_reaches_conditioning(SplitHandler) is False


def fixed_in_the_conditioning():
    """Upstream's fix in the official shape: the conditioning keeps the source for lego (official
    conditioning_masks.py, 2026-03-11) while prepare_padding_info still ends lego's window at the
    source's length. A probe that read prepare_padding_info alone would call this unfixed."""
    class FixedInConditioning(handler_class()):
        def _prepare_batch(self, *args, **kwargs):
            if all(LEGO_WORDS in i for i in kwargs.get("instructions") or []):
                kwargs.update(repainting_start=None, repainting_end=None)
            return super()._prepare_batch(*args, **kwargs)

    return FixedInConditioning


def test_an_upstream_fix_made_elsewhere_is_seen_by_its_behaviour():
    fixed = fixed_in_the_conditioning()
    assert fixed().prepare_padding_info(**padding_arguments())[1] == [2.0]  # the function alone looks unfixed
    original = handler_class().__dict__["prepare_padding_info"]
    outcome = lego_source_context.apply(fixed)
    assert outcome.status == patches.UPSTREAM_FIXED, outcome
    assert handler_class().__dict__["prepare_padding_info"] is original  # nothing wrapped


def test_a_wrapper_that_does_not_bring_the_source_back_is_removed_and_reported():
    class SilencesAnyway(handler_class()):
        def _prepare_batch(self, *args, **kwargs):
            kwargs.update(repainting_start=[0.0], repainting_end=[2.0])  # the silencing moved elsewhere
            return super()._prepare_batch(*args, **kwargs)

    original = handler_class().__dict__["prepare_padding_info"]
    outcome = lego_source_context.apply(SilencesAnyway)
    assert outcome.status == patches.NOT_FOUND and "did not bring the source" in outcome.detail
    assert handler_class().__dict__["prepare_padding_info"] is original


def test_a_handler_the_probe_cannot_run_is_reported_not_found():
    class NoGenerateMusic:
        def prepare_padding_info(self, actual_batch_size, processed_src_audio, audio_duration, repainting_start,
                                 repainting_end, is_repaint_task, is_lego_task, is_cover_task, can_use_repainting):
            return [repainting_start], [2.0], processed_src_audio.unsqueeze(0)

    original = NoGenerateMusic.__dict__["prepare_padding_info"]
    outcome = lego_source_context.apply(NoGenerateMusic)
    assert outcome.status == patches.NOT_FOUND and "probe could not run" in outcome.detail
    assert NoGenerateMusic.__dict__["prepare_padding_info"] is original


