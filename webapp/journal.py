"""The journal on disk of GPU leases held and runner processes alive: what a crash must not forget.

Two kinds of record under DATA_DIR/state/, each one small JSON file written atomically:
- `leases/<session_id>.json`: a lease from the moment its acquire is sent until the token
  service confirms its release: its state, the job, the holder (the web worker's pid and start
  time), the runner bound to it, the release status and whether the acquire's fate is unknown;
- `runners/<pid>-<start>.json`: every runner process from its spawn until it is reaped, with
  its holder.
A record whose holder is gone belongs to a worker that died (SIGKILL, the OOM killer): the lease
keeper (webapp/lease_keeper.py) kills its runners and releases its leases.
"""
from __future__ import annotations

import enum
import re
import time
from pathlib import Path

from webapp.durable import read_json, remove_stale_temporaries, write_json
from webapp.procinfo import ProcessId

_SESSION_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class LeaseState(str, enum.Enum):
    ACQUIRING = "acquiring"  # the acquire is on its way: the service may register it
    HELD = "held"            # granted: a runner may use the GPU
    RELEASING = "releasing"  # the release is owed and not yet confirmed

    def may_become(self, new: "LeaseState") -> bool:
        return new in _NEXT[self]


_NEXT = {LeaseState.ACQUIRING: {LeaseState.HELD, LeaseState.RELEASING},
         LeaseState.HELD: {LeaseState.RELEASING}, LeaseState.RELEASING: set()}


class Journal:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "state"
        self.leases_dir = self.root / "leases"
        self.runners_dir = self.root / "runners"
        for folder in (self.leases_dir, self.runners_dir):
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)

    # ---- leases ---------------------------------------------------------------------------------------

    def _lease_path(self, session_id: str) -> Path:
        if not _SESSION_RE.match(session_id):
            raise ValueError(f"session id {session_id!r} is not a safe file name")
        return self.leases_dir / f"{session_id}.json"

    def write_lease(self, record: dict) -> None:
        record = {**record, "updated_at": time.time()}
        write_json(self._lease_path(record["session_id"]), record)

    def remove_lease(self, session_id: str) -> None:
        self._lease_path(session_id).unlink(missing_ok=True)

    def leases(self) -> list[dict]:
        out = []
        for path in sorted(self.leases_dir.glob("*.json")):
            record = read_json(path)
            if record is not None and isinstance(record.get("session_id"), str) and _SESSION_RE.match(record["session_id"]):
                out.append(record)
            else:
                path.unlink(missing_ok=True)  # not ours to read: nothing can be released from it
        return out

    # ---- runners --------------------------------------------------------------------------------------

    def _runner_path(self, ident: ProcessId) -> Path:
        return self.runners_dir / f"{ident.pid}-{ident.start}.json"

    def write_runner(self, ident: ProcessId, holder: ProcessId, argv0: str) -> None:
        write_json(self._runner_path(ident), {"runner": ident.as_dict(), "holder": holder.as_dict(), "argv0": argv0,
                                              "spawned_at": time.time()})

    def remove_runner(self, ident: ProcessId) -> None:
        self._runner_path(ident).unlink(missing_ok=True)

    def runners(self) -> list[tuple[ProcessId, ProcessId | None]]:
        out = []
        for path in sorted(self.runners_dir.glob("*.json")):
            record = read_json(path) or {}
            runner = ProcessId.from_dict(record.get("runner"))
            if runner is None:
                path.unlink(missing_ok=True)
                continue
            out.append((runner, ProcessId.from_dict(record.get("holder"))))
        return out
