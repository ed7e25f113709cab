"""`python -m runner`: argument parsing, the event stream, logging, signals and exit statuses.

stdout is reserved for JSON-lines events: the real stdout is kept for them and file
descriptor 1 is pointed at stderr, so a library that prints cannot corrupt the stream.
Python logging goes to stderr at INFO for the runner's own loggers (`runner`, `patches`: the
patch outcomes, the engine's choices) and at WARNING for the libraries'. A SIGTERM ends the
process with exit 5 through runner/cancellation.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from runner import cancellation, host_memory
from runner.events import EXIT_GENERATION, EXIT_OK, Cancelled, EventStream, RunnerError, bad_input
from runner.contract import DEFAULT_MAX_DURATION_S, ENGINE_NAMES, IMPORT_ENGINE_FLAG
from runner.tracks import TRACKS

DEFAULT_CHECKPOINTS = "./checkpoints"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a `bad_arguments` event instead of exiting on its own."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise bad_input("bad_arguments", f"{message}. Run `python -m runner {self.prog.split()[-1]} --help` for usage.")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = _Parser(prog="python -m runner", description="ACE-Step 1.5 lego stem generation, one job per process.")
    parser.add_argument("--json", action="store_true",
                        help="every event as JSON on stdout, even on a terminal (default: on a terminal, stages and "
                             "progress show on stderr as lines and a bar only; a pipe always gets every event)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    lego = sub.add_parser("lego", help="generate a stem that fits a source stem",
                          description="Generate a vocals, backing vocals or drums stem that fits SRC. Events on stdout, progress on stderr.")
    lego.add_argument("--source", required=True, type=Path, help="source audio (WAV, FLAC, OGG, MP3; M4A/AAC with ffmpeg)")
    lego.add_argument("--track", required=True, choices=TRACKS)
    lego.add_argument("--bpm", required=True, type=int, help="tempo of the source, 30..300")
    lego.add_argument("--key", help='key and scale, e.g. "F# minor", "Bb major" or shorthand Am, F#m, Bbmaj, C#min')
    lego.add_argument("--caption", help="style caption; default: the track's own")
    lego.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    lego.add_argument("--batch-size", type=int, default=1, choices=(1, 2), help="candidates to write (1 or 2)")
    lego.add_argument("--seed", type=int, help="random seed (default: random, reported in the result)")
    lego.add_argument("--repaint-start", type=float, default=0.0, help="window start in seconds (default 0)")
    lego.add_argument("--repaint-end", type=float, default=-1.0, help="window end in seconds; -1: end of clip")
    lego.add_argument("--guidance-scale", type=float, default=7.0, help="classifier-free guidance, 1..30 (default 7)")
    lego.add_argument("--time-signature", help="e.g. 4 or 3")
    _add_model_options(lego, env)
    lego.add_argument("--out", type=Path, default=Path("."), help="output folder, created if missing (default: current folder)")
    lego.add_argument("--format", choices=("wav", "flac", "mp3"), default="wav",
                      help="the stem's format: wav or flac (24-bit) or mp3 (default wav)")
    lego.add_argument("--max-duration", type=float, default=float(env.get("MAX_DURATION_S") or DEFAULT_MAX_DURATION_S),
                      help=f"longest source accepted, seconds (default MAX_DURATION_S or {DEFAULT_MAX_DURATION_S:g})")

    tiny = sub.add_parser("make-tiny-checkpoint", help="build a tiny random-weight checkpoint (tests, demo)")
    tiny.add_argument("dir", type=Path, help="the new checkpoint folder (must not exist yet)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--size", choices=("tiny", "full"), default="tiny",
                      help="full: the real base model's sizes (GB; for GPU benchmarks)")

    download = sub.add_parser(
        "download", help="download the real base-model weights through huggingface_hub",
        description="Download the ACE-Step 1.5 base model's weights (about 6 GB: the base DiT acestep-v15-base, "
                    "the VAE and Qwen3-Embedding-0.6B; never the language model). For the diffusers engine (the "
                    "default outside the Docker image) they are then converted into DIR, the download kept in "
                    "DIR-acestep; for --engine acestep they stay in ACE-Step's layout in DIR. Resumable: run it "
                    "again after a failure and it continues, skipping finished files. HF_TOKEN is sent "
                    "when set (these repositories are public: it is not needed); HF_ENDPOINT points at a mirror.")
    download.add_argument("dir", type=Path, help="the checkpoint folder to fill (created if missing), e.g. ./checkpoints")
    download.add_argument("--engine", choices=ENGINE_NAMES, default=env.get("ACESTEP_ENGINE") or "diffusers",
                          help="the engine the weights are for (default ACESTEP_ENGINE or diffusers)")

    convert = sub.add_parser("convert", help="convert ACE-Step's checkpoint layout to a diffusers pipeline folder",
                             description="Write a diffusers AceStepPipeline folder DST from ACE-Step's layout in SRC "
                                         "(acestep-v15-base/, vae/, Qwen3-Embedding-0.6B/). DST must be new or empty.")
    convert.add_argument("src", type=Path, help="a folder in ACE-Step's layout, e.g. what `download --engine acestep` wrote")
    convert.add_argument("dst", type=Path, help="the diffusers pipeline folder to write (new or empty)")

    check = sub.add_parser("check", help="say what a checkpoint folder is and whether it is complete")
    check.add_argument("dir", type=Path, nargs="?", default=Path(env.get("ACESTEP_CHECKPOINTS") or DEFAULT_CHECKPOINTS),
                       help="the checkpoint folder to inspect (default ACESTEP_CHECKPOINTS or ./checkpoints)")
    _add_model_options(check, env, with_checkpoints=False)

    serve = sub.add_parser("serve", help="keep-warm: read lego jobs as JSON lines on stdin, one at a time")
    serve.add_argument("--idle-timeout", type=float, default=float(env.get("KEEP_WARM_S") or 0),
                       help="exit after this many idle seconds once a model is loaded (default KEEP_WARM_S or 0)")
    serve.add_argument(IMPORT_ENGINE_FLAG, dest="import_engine", choices=ENGINE_NAMES, default=None,
                       help="import this engine's stack while waiting for the first job (default ACESTEP_ENGINE; "
                            "the service passes the engine its checkpoint folder implies)")
    return parser


def _add_model_options(parser, env, with_checkpoints: bool = True) -> None:
    if with_checkpoints:
        parser.add_argument("--checkpoints", type=Path, default=Path(env.get("ACESTEP_CHECKPOINTS") or DEFAULT_CHECKPOINTS),
                            help="checkpoint folder (default ACESTEP_CHECKPOINTS or ./checkpoints)")
    parser.add_argument("--engine", choices=ENGINE_NAMES, default=env.get("ACESTEP_ENGINE") or None,
                        help="override the engine chosen from the folder's layout (ACESTEP_ENGINE)")
    parser.add_argument("--device", default=env.get("ACESTEP_DEVICE") or "auto", help="auto|cuda|cpu")
    parser.add_argument("--dtype", default=env.get("ACESTEP_DTYPE") or "auto", help="auto|bfloat16|float16|float32")
    parser.add_argument("--offload", default=env.get("ACESTEP_OFFLOAD") or "auto", help="auto|on|off")


LOG_FORMAT = "[%(name)s] %(levelname)s %(message)s"
OWN_LOGGERS = ("runner", "patches")


def configure_logging() -> None:
    """INFO from the runner's own loggers on stderr, WARNING and above from everything else."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    host_memory.ask_for_huge_pages()  # before anything imports torch
    events = EventStream(out=os.fdopen(os.dup(1), "w", buffering=1), err=sys.stderr)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cancellation.install()
    configure_logging()
    try:
        return _run(argv, events)
    except Cancelled:  # raised anywhere, even inside another error's handling below
        cancellation.end_cancelled(events)  # never returns: exit 5 even with threads still running


def _run(argv: list[str] | None, events: EventStream) -> int:
    try:
        args = build_parser().parse_args(argv)
        events.for_person = events.out_is_terminal() and not args.json
        return _dispatch(args, events)
    except RunnerError as err:
        events.error(err)
        return err.exit_status
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except Exception as exc:  # a bug or an unforeseen library failure: say so, keep the traceback on stderr
        traceback.print_exc()
        events.error(RunnerError("internal_error", f"The runner failed unexpectedly: {type(exc).__name__}: {exc}", EXIT_GENERATION, retryable=False))
        return EXIT_GENERATION


def _dispatch(args, events: EventStream) -> int:
    if args.command == "lego":
        from runner.lego import EngineCache, LegoArgs, run_lego

        lego_args = LegoArgs(
            source=args.source, track=args.track, bpm=args.bpm, key=args.key, caption=args.caption,
            steps=args.steps, batch_size=args.batch_size, seed=args.seed, repaint_start=args.repaint_start,
            repaint_end=args.repaint_end, guidance_scale=args.guidance_scale, time_signature=args.time_signature,
            checkpoints=args.checkpoints, out=args.out, format=args.format, device=args.device,
            dtype=args.dtype, offload=args.offload, engine=args.engine, max_duration_s=args.max_duration,
        )
        result = run_lego(lego_args, events, EngineCache())
        _emit_result(events, result)
        return EXIT_OK
    if args.command == "make-tiny-checkpoint":
        from runner.random_checkpoint import write_checkpoint

        try:
            path = write_checkpoint(args.dir, args.size, args.seed)
        except FileExistsError as exc:
            raise bad_input("checkpoint_exists", str(exc)) from None
        events.emit("checkpoint", path=str(path.resolve()), size=args.size, seed=args.seed, demo=True)
        events.say(f"[runner] wrote a {args.size} random-weight checkpoint to {path} (demo: random weights)")
        return EXIT_OK
    if args.command == "download":
        from runner.download import download

        return download(args.dir, events, engine=args.engine)
    if args.command == "convert":
        from runner.download import convert_checkpoint

        return convert_checkpoint(args.src, args.dst, events)
    if args.command == "check":
        from runner.check import check

        return check(args, events)
    if args.command == "serve":
        from runner.serve import serve

        return serve(args, events)
    raise bad_input("bad_arguments", f"Unknown command {args.command!r}.")


def _emit_result(events: EventStream, result: dict) -> None:
    try:
        events.emit("result", **result)
    except Cancelled:
        for output in result["outputs"]:
            Path(output["path"]).unlink(missing_ok=True)
        raise
    events.say("[runner] wrote " + ", ".join(o["path"] for o in result["outputs"]))
    events.say("[runner] timings " + json.dumps(result["timings"]))
