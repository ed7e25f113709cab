"""Getting the upload onto disk without holding it in memory, and never leaving a half of it.

- `UploadRequest` makes werkzeug spool multipart files into anonymous temporary files under
  `DATA_DIR/tmp` (unlinked at creation, so a crash leaves nothing); the body size limit
  (`MAX_CONTENT_LENGTH` = MAX_UPLOAD_MB) is enforced by werkzeug before and while reading.
- `JobFiles` is a job's folder: it is built as `<id>.staging/` and renamed to `<id>/` only once
  the upload is proven to be audio and the job's record is written in it, and removed entirely
  when anything fails before that. A restart removes staging folders (never acknowledged).
- The JSON protocol's base64 body is streamed to disk by webapp/json_body.py.
- File names are chosen by the server (`source.wav`, `upload.bin`); the client's file name is
  never used in a path.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO

from flask import Request, current_app

from webapp.durable import sync_folder
from webapp.errors import ApiError

TASK_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20


class UploadRequest(Request):
    """A Flask request whose uploaded files spool into DATA_DIR/tmp instead of the system temp."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None) -> IO[bytes]:
        tmp_dir = current_app.config.get("ACESTEP_TMP_DIR")
        return tempfile.TemporaryFile(dir=tmp_dir)  # O_TMPFILE: never visible, never left behind


def jobs_root(data_dir: Path) -> Path:
    return data_dir / "jobs"


def tmp_root(data_dir: Path) -> Path:
    return data_dir / "tmp"


def remove_entries(*folders: Path, before: float | None = None) -> int:
    """Remove what the folders hold (job folders, spooled uploads): all of it, or only entries last
    modified before the time `before`. Links are removed, never followed. Returns how many went."""
    removed = 0
    for folder in folders:
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            try:
                if before is not None and entry.lstat().st_mtime >= before:
                    continue
            except OSError:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


class JobFiles:
    """The files of one job under DATA_DIR/jobs/<task_id>/."""

    def __init__(self, data_dir: Path, task_id: str):
        if not TASK_ID_RE.match(task_id):
            raise ValueError("task ids are 32 lower-case hex digits")
        self.root = jobs_root(data_dir)
        self.task_id = task_id
        self.staging = self.root / f"{task_id}.staging"
        self.dir = self.root / task_id

    # Paths inside the final folder.
    @property
    def source(self) -> Path:
        return self.dir / "source.wav"

    @property
    def out_partial(self) -> Path:
        return self.dir / "out.partial"

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def stderr_log(self) -> Path:
        return self.dir / "runner.stderr.log"

    def begin(self) -> Path:
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self) -> None:
        """The upload is proven audio: the staging folder becomes the job's folder, atomically."""
        os.replace(self.staging, self.dir)
        sync_folder(self.root)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def remove_source(self) -> None:
        self.source.unlink(missing_ok=True)


def save_stream(stream: IO[bytes], dest: Path, limit: int) -> int:
    """Copy an upload stream to dest; refuse (413) past `limit` bytes. Returns the size."""
    size = 0
    with open(dest, "wb") as out:
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise ApiError("upload_too_large")
            out.write(chunk)
    return size
