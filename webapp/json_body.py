"""The JSON protocol's body, read as a stream: the base64 audio goes to disk as it arrives.

The plugin sends `{"audio_data": <base64 of the whole file>, ...}`: nearly all of the body is
one string. Every JSON library (json, ijson, orjson) hands a string value over whole, and then
it is decoded once more; buffering the body that way held about 2.7 times its size. Here the
top-level object is read piece by piece from the request stream: `audio_data` is base64-decoded
in blocks straight into the upload file, and every other value (small by nature, at most
FIELD_LIMIT bytes each) is parsed by the standard library's decoder. Memory stays flat whatever
the body's size; an over-limit body is a 413 even when it is chunked.

Refusals: `malformed_json` (not one JSON object, nested too deeply, trailing data),
`invalid_base64`, `upload_too_large` (the body, or one field).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from webapp.errors import ApiError

CHUNK = 1 << 20
MAX_FIELDS = 256
AUDIO_KEY = "audio_data"
_WS = b" \t\r\n"
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_DATA_URI_RE = re.compile(rb"^data:[\w.+/-]*;base64,", re.IGNORECASE)
_ESCAPES = {ord("/"): b"/", ord("n"): b"", ord("r"): b"", ord("t"): b"", ord("\\"): None, ord('"'): None}
_DECODER = json.JSONDecoder()


@dataclass
class JsonBody:
    fields: dict[str, Any] = field(default_factory=dict)  # every top-level field but a streamed audio_data
    audio_streamed: bool = False  # audio_data was a string, decoded into the upload file
    audio_bytes: int = 0
    audio_invalid: bool = False  # not base64: reported once the whole body proved to be JSON
    body_bytes: int = 0


def _malformed(detail: str) -> ApiError:
    return ApiError("malformed_json", f"The request body is not a valid JSON object ({detail}); send one JSON object.")


class _Stream:
    """A window on the request body that never holds much more than one chunk."""

    def __init__(self, raw: IO[bytes], limit: int):
        self.raw = raw
        self.limit = limit
        self.buf = b""
        self.pos = 0
        self.total = 0
        self.eof = False

    def fill(self, want: int = 1) -> bool:
        """Make `want` bytes available from pos (fewer at the end); False when none are left."""
        while len(self.buf) - self.pos < want and not self.eof:
            chunk = self.raw.read(CHUNK)
            if not chunk:
                self.eof = True
                break
            self.total += len(chunk)
            if self.total > self.limit:
                raise ApiError("upload_too_large", f"The request is larger than the {self.limit / 1048576:g} MB upload "
                                                   "limit (MAX_UPLOAD_MB); send a shorter or compressed file (MP3/FLAC).")
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
        return len(self.buf) > self.pos

    def skip_ws(self) -> None:
        while self.fill():
            stripped = self.buf[self.pos:].lstrip(_WS)
            self.pos = len(self.buf) - len(stripped)
            if stripped:
                return

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.fill() else None

    def take(self, expected: bytes) -> None:
        if self.peek() != expected[0]:
            got = "the end of the body" if self.peek() is None else repr(chr(self.peek()))
            raise _malformed(f"expected {expected.decode()!r}, found {got}")
        self.pos += 1

    def value(self, field_limit: int) -> Any:
        """One JSON value of at most `field_limit` bytes, parsed by the standard library."""
        self.fill(field_limit + 1)
        window = self.buf[self.pos:self.pos + field_limit + 1]
        text = window.decode("utf-8", "surrogateescape")
        try:
            value, end = _DECODER.raw_decode(text)
        except RecursionError:
            raise _malformed("nested too deeply") from None
        except ValueError:
            if len(window) > field_limit:
                raise ApiError("upload_too_large", f"A JSON field is larger than {field_limit // 1024} KB, the limit of one "
                                                   "field; only audio_data may be large.") from None
            raise _malformed("a value cannot be parsed") from None
        if end == len(text) and len(window) > field_limit:
            raise ApiError("upload_too_large", f"A JSON field is larger than {field_limit // 1024} KB, the limit of one "
                                               "field; only audio_data may be large.")
        used = text[:end].encode("utf-8", "surrogateescape")
        try:
            used.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("it is not UTF-8") from None
        self.pos += len(used)
        return value


def read_json_body(raw: IO[bytes], audio_dest: Path, limit: int, field_limit: int) -> JsonBody:
    """Parse the body from `raw`; a string `audio_data` is decoded into `audio_dest`."""
    stream = _Stream(raw, limit)
    body = JsonBody()
    stream.skip_ws()
    stream.take(b"{")
    stream.skip_ws()
    if stream.peek() == ord("}"):
        stream.pos += 1
    else:
        while True:
            stream.skip_ws()
            key = stream.value(field_limit)
            if not isinstance(key, str):
                raise _malformed("an object key is not a string")
            stream.skip_ws()
            stream.take(b":")
            stream.skip_ws()
            if key == AUDIO_KEY and stream.peek() == ord('"'):
                stream.pos += 1
                written = _stream_base64(stream, audio_dest)
                body.audio_bytes, body.audio_invalid = max(written, 0), written < 0
                body.audio_streamed = True
                body.fields.pop(AUDIO_KEY, None)
            else:
                body.fields[key] = stream.value(field_limit)
                if key == AUDIO_KEY:
                    body.audio_streamed = False
            if len(body.fields) > MAX_FIELDS:
                raise _malformed(f"more than {MAX_FIELDS} fields")
            stream.skip_ws()
            sep = stream.peek()
            stream.pos += 1
            if sep == ord(","):
                continue
            if sep == ord("}"):
                break
            raise _malformed("expected ',' or '}' between fields")
    stream.skip_ws()
    if stream.fill():
        raise _malformed("there is data after the object")
    if body.audio_streamed and body.audio_invalid:
        raise ApiError("invalid_base64")
    body.body_bytes = stream.total
    return body


class _NotBase64(Exception):
    def __init__(self, ended: bool = False):
        super().__init__()
        self.ended = ended  # the string's closing quote was already read


def _stream_base64(stream: _Stream, dest: Path) -> int:
    """The rest of a JSON string (after its opening quote), base64-decoded into dest, in blocks.
    Returns the bytes written, or -1 when the string is not base64 (read to its end all the same,
    so that a body that is not JSON at all says so first)."""
    try:
        return _decode_string(stream, dest)
    except _NotBase64 as exc:
        if not exc.ended:
            _skip_string(stream)
        return -1


def _skip_string(stream: _Stream) -> None:
    while True:
        if not stream.fill():
            raise _malformed("audio_data is not terminated")
        buf, pos = stream.buf, stream.pos
        quote = buf.find(b'"', pos)
        if quote == -1:
            stream.pos = len(buf) - (1 if buf.endswith(b"\\") else 0)
            if stream.pos == pos:
                stream.fill(len(buf) - pos + 1)
            continue
        backslashes = len(buf[pos:quote]) - len(buf[pos:quote].rstrip(b"\\"))
        stream.pos = quote + 1
        if backslashes % 2 == 0:
            return


def _decode_string(stream: _Stream, dest: Path) -> int:
    carry = b""
    head = b""  # the first bytes, to strip a `data:...;base64,` prefix
    head_done = False
    padded = False
    written = 0
    with open(dest, "wb") as out:
        while True:
            if not stream.fill():
                raise _malformed("audio_data is not terminated")
            buf, pos = stream.buf, stream.pos
            quote = buf.find(b'"', pos)
            end = quote if quote != -1 else len(buf)
            slash = buf.find(b"\\", pos, end)
            if slash != -1:
                # JSON escapes inside base64 (`\/` from some encoders, `\n` line breaks): rare, handled one by one.
                if slash + 1 >= len(buf):
                    stream.fill(slash - pos + 2)
                    buf, pos = stream.buf, stream.pos
                    slash = buf.find(b"\\", pos)
                    if slash + 1 >= len(buf):
                        raise _malformed("audio_data is not terminated")
                piece = buf[pos:slash]
                escaped = buf[slash + 1]
                replacement = _ESCAPES.get(escaped, None)
                if replacement is None:
                    raise _NotBase64()
                piece += replacement
                stream.pos = slash + 2
                done = False
            else:
                piece = buf[pos:end]
                stream.pos = end + 1 if quote != -1 else end
                done = quote != -1
            if not head_done:
                head += piece
                if len(head) < 100 and not done:
                    continue
                piece, head, head_done = _DATA_URI_RE.sub(b"", head, count=1), b"", True
            piece = piece.translate(None, _WS)
            if piece.translate(None, _B64_CHARS):
                raise _NotBase64(done)
            data = carry + piece
            cut = len(data) // 4 * 4
            carry = data[cut:]
            if cut:
                if padded:
                    raise _NotBase64(done)
                written += _decode_block(data[:cut], out, done)
                padded = data[cut - 1:cut] == b"="
            if done:
                break
        if carry:
            return -1  # the string ended: nothing left to skip
    return written


def _decode_block(block: bytes, out, ended: bool) -> int:
    try:
        raw = base64.b64decode(block, validate=True)
    except (binascii.Error, ValueError):
        raise _NotBase64(ended) from None
    out.write(raw)
    return len(raw)
