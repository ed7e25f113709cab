"""A stand-in for `python -m runner serve` that speaks the runner's protocol (DESIGN.md section 4).

Test-only: it exercises the web service's failure paths (crash, hang, timeout, bad statuses)
that the real runner cannot be made to hit on demand. Its own options come before `serve`:

    fake_runner.py [--mode MODE] [--step-s S] [--steps-shown N] [--record FILE] serve --idle-timeout S

Like the real runner it says `{"event": "ready"}` at start and after each job, reads jobs as JSON
lines on stdin, exits after one job when the idle timeout is 0, and at end of input.
Like the real runner (runner/serve.py) it watches for the service's end with runner/lifeline.py:
the parent-death signal and stdin closing during a job both become SIGTERM.
Modes: ok, fail (a generation error, status 4), badinput (2), nockpt (3), crash (SIGKILL itself
mid-job), hang (runs until SIGTERM, then exits 5), stubborn (ignores SIGTERM, so also the
service's end: needs SIGKILL), noresult (the process exits 0 without answering), junk (a non-JSON
line on stdout, then a normal result), chatty (writes --chatty-kb of stderr per step, for a
disk that fills up). `--once FILE`: MODE applies only to the first job (across processes; FILE marks it), later jobs run
ok, as a fault that does not repeat after a restart. A job whose caption reads `fake-mode:MODE`
runs in that mode instead (SIGTERM handling stays the process's), so one runner command can play
several cases. `--record FILE` appends {"pid","spawn","import_engine"} at start, {"pid","start","argv"} when a
job arrives (with its `args`) and {"pid","exit","code"} when the process ends normally.
The "ok" output is the source itself, in the requested format, same rate and frame count.
"""
import argparse
import json
import os
import select
import signal
import sys
import time

import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from runner import lifeline  # noqa: E402 - the real runner's watches, not a copy
from runner.cli import build_parser  # noqa: E402 - the real runner's command line

FORMATS = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24"), "mp3": ("MP3", "MPEG_LAYER_III")}
STATUS = {"badinput": (2, "bad_arguments", "The runner refused the arguments.", False),
          "nockpt": (3, "checkpoint_missing", "The checkpoint folder is incomplete.", False),
          "fail": (4, "out_of_memory", "CUDA ran out of memory while generating.", True)}


class Cancelled(Exception):
    pass


WATCH = None  # runner/lifeline.py's watch, once installed


def emit(**event):
    try:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass  # the service is gone: nobody reads the events any more


def record(path, **fields):
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


def error(status, code, message, retryable):
    emit(event="error", code=code, message=message, retryable=retryable, exit_status=status)


def run_job(opts, args, cancelled):
    emit(event="stage", stage="loading")
    if opts.mode in ("badinput", "nockpt"):
        return error(*STATUS[opts.mode])
    if opts.mode == "junk":
        sys.stdout.write("this line is not JSON\n")
    emit(event="stage", stage="encoding")
    emit(event="progress", stage="encoding", step=1, total=1)  # one piece of the source
    emit(event="stage", stage="generating")
    total = args.get("steps") or 50
    shown = max(1, min(opts.steps_shown, total))
    for i in range(1, shown + 1):
        if cancelled["flag"]:
            raise Cancelled()
        time.sleep(opts.step_s)
        if opts.mode == "chatty":
            sys.stderr.write(("x" * 1023 + "\n") * opts.chatty_kb)
            sys.stderr.flush()
        emit(event="progress", stage="generating", step=round(i * total / shown), total=total)
        if opts.mode == "crash" and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if opts.mode == "fail" and i == 2:
            return error(*STATUS["fail"])
    noted = False
    while opts.mode in ("hang", "stubborn"):
        if cancelled["flag"]:
            raise Cancelled()
        if WATCH is not None and WATCH.fired and not noted:  # a stubborn runner saw its service go, and stays
            record(opts.record, noticed=WATCH.fired, at=time.time())
            noted = True
        time.sleep(0.05)
    emit(event="stage", stage="decoding")
    if opts.mode == "noresult":
        sys.exit(0)
    emit(event="stage", stage="writing")
    data, rate = sf.read(args["source"], dtype="float32", always_2d=True)
    os.makedirs(args["out"], exist_ok=True)
    outputs = []
    fmt = args.get("format", "wav")
    for index in range(args.get("batch_size") or 1):
        final = os.path.join(os.path.abspath(args["out"]), f"lego-{args['track']}-{index}.{fmt}")
        tmp = final + ".part"
        container, subtype = FORMATS[fmt]
        sf.write(tmp, data, rate, format=container, subtype=subtype)
        os.replace(tmp, final)
        outputs.append({"path": final, "sample_rate": rate, "frames": int(data.shape[0])})
    emit(event="result", outputs=outputs, seed=args.get("seed", 1234),
         timings={"load_s": 0.0, "generating_s": 0.0, "total_s": 0.0}, peak_vram_bytes=0, engine="fake", dtype="float32")


def main(argv):
    own = argparse.ArgumentParser()
    own.add_argument("--mode", default="ok")
    own.add_argument("--step-s", type=float, default=0.01)
    own.add_argument("--steps-shown", type=int, default=5)
    own.add_argument("--record")
    own.add_argument("--chatty-kb", type=int, default=256)
    own.add_argument("--once", help="a marker file: MODE applies to the first job that finds it absent, later jobs run ok")
    split = argv.index("serve")
    opts = own.parse_args(argv[:split])
    serve = build_parser().parse_args(argv[split:])  # the real runner's parser: the same flags, the same refusals
    idle = serve.idle_timeout

    record(opts.record, spawn=time.time(), import_engine=serve.import_engine)
    cancelled = {"flag": False}

    def on_term(_sig, _frame):
        cancelled["flag"] = True
        if not cancelled.get("in_job"):  # like the real runner: SIGTERM between jobs ends it at once
            record(opts.record, exit=time.time(), code=5)
            os._exit(5)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if opts.mode == "stubborn" else on_term)
    global WATCH
    watch = WATCH = lifeline.install()
    emit(event="ready", loaded=False)
    jobs = 0
    while not (jobs and idle == 0):
        if jobs and not select.select([sys.stdin], [], [], idle)[0]:
            break
        line = sys.stdin.readline()
        if not line:
            break
        message = json.loads(line)
        if message.get("command") != "lego":
            break
        args = message["args"]
        jobs += 1
        if opts.once:
            try:
                os.close(os.open(opts.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # the first job: MODE
            except FileExistsError:
                opts.mode = "ok"
                signal.signal(signal.SIGTERM, on_term)
        record(opts.record, start=time.time(), args=args, argv=[f"{k}={v}" for k, v in args.items()])
        print(f"[fake-runner] {opts.mode} {args['track']} {args['source']}", file=sys.stderr, flush=True)
        watch.job_started()
        cancelled["in_job"] = True
        caption = str(args.get("caption") or "")
        job_opts = argparse.Namespace(**{**vars(opts), "mode": caption[len("fake-mode:"):]}) \
            if caption.startswith("fake-mode:") else opts
        try:
            run_job(job_opts, args, cancelled)
        except Cancelled:
            record(opts.record, exit=time.time(), code=5, why=watch.fired)
            error(5, "cancelled", "The job was cancelled; nothing was written.", True)
            os._exit(5)  # as the real runner leaves: stdout may be a broken pipe by now
        watch.job_ended()
        cancelled["in_job"] = False
        emit(event="ready", loaded=True)
    record(opts.record, exit=time.time(), code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
