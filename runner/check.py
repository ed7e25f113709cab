"""`check DIR`: which engine a folder needs, whether it is complete, what `auto` would choose."""
from __future__ import annotations

from runner import device as placement
from runner.events import EXIT_CHECKPOINT, EXIT_OK, EventStream
from runner.layout import inspect_folder


def check(args, events: EventStream) -> int:
    layout = inspect_folder(args.dir, args.engine)
    chosen = placement.choose(args.device, args.dtype, args.offload)
    events.emit(
        "check", path=str(args.dir), engine=layout.engine, complete=layout.complete, missing=layout.missing,
        demo=layout.demo, device=chosen.device, dtype=chosen.dtype, offload=chosen.offload, gpu=chosen.gpu_name,
    )
    where = f"{chosen.device}" + (f" ({chosen.gpu_name})" if chosen.gpu_name else "")
    events.say(f"[runner] {args.dir}: engine {layout.engine or 'unknown'}, {'complete' if layout.complete else 'NOT complete'}"
               f"{', demo: random weights' if layout.demo else ''}; auto picks {where}, {chosen.dtype}, offload {'on' if chosen.offload else 'off'}")
    if not layout.complete:
        events.say(f"[runner] {layout.describe_problem()}")
        return EXIT_CHECKPOINT
    return EXIT_OK
