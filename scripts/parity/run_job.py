"""Run `python -m runner ARGS...` in this process and keep what the parity check compares.

Usage: python scripts/parity/run_job.py CAPTURE.npz -- lego --engine ... (any runner arguments)

Saved in CAPTURE.npz: `latents`, the inputs of every VAE decoder call (the final latents, piece by
piece and candidate by candidate, joined along time); `source_samples`, every posterior sample of the
VAE encoder, joined the same way; `stems`, the float stems the engine returned (48 kHz, uncropped). Works with either engine in either environment:
it wraps the decoder and the posterior of diffusers' AutoencoderOobleck, which both ACE-Step and
diffusers' pipeline use (each decoder call is one piece of one candidate, whoever does the tiling).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import numpy as np
    from diffusers.models.autoencoders import autoencoder_oobleck

    import runner.lego
    from runner.cli import main as runner_main

    capture, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    seen = {"latents": [], "source_samples": [], "stems": []}
    decoder = autoencoder_oobleck.OobleckDecoder
    decode, sample, generate = decoder.forward, autoencoder_oobleck.OobleckDiagonalGaussianDistribution.sample, runner.lego._generate

    def recording_decode(self, z, *args, **kwargs):
        seen["latents"].append(z.detach().float().cpu().numpy())
        return decode(self, z, *args, **kwargs)

    def recording_sample(self, *args, **kwargs):
        value = sample(self, *args, **kwargs)
        seen["source_samples"].append(value.detach().float().cpu().numpy())
        return value

    def recording_generate(*args, **kwargs):
        stems = generate(*args, **kwargs)
        seen["stems"].append(np.stack(stems))
        return stems

    decoder.forward = recording_decode
    autoencoder_oobleck.OobleckDiagonalGaussianDistribution.sample = recording_sample
    runner.lego._generate = recording_generate
    status = runner_main(argv)
    if status != 0:
        return status
    # Decoder and encoder calls (pieces, candidates) joined end to end in call order; the last job's stems.
    np.savez(capture, latents=np.concatenate(seen["latents"], axis=-1), source_samples=np.concatenate(seen["source_samples"], axis=-1),
             stems=seen["stems"][-1])
    return status


if __name__ == "__main__":
    sys.exit(main())
