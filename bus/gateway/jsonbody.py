"""A webhook's JSON body, read as it arrives with its one big string decoded on the way.

``{"filename": "a.jpg", "data": "<base64>"}`` is nearly all ``data``. Reading the body
whole, parsing it and then decoding the string held three copies of the image at once.
Here the ``data`` string of the top-level object is base64-decoded piece by piece while the
body streams in, so the image is held once, decoded; the rest of the body (a few small
fields, capped) is parsed whole at the end, with ``true`` standing in for ``data``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from bus.gateway.problems import Problem

_QUOTE, _BACKSLASH, _COLON, _COMMA = b'"\\:,'
_OPEN, _CLOSE = b"{[", b"}]"
# Where a stretch of the data string stops: its end, an escape, or a character JSON forbids
# raw in a string.
_DATA_STOP = re.compile(rb'["\\\x00-\x1f]')
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_SPACE = b" \t\r\n\f\v"
_UNICODE_ESCAPE = re.compile(rb"\\u[0-9A-Fa-f]{4}")


class Base64Decoder:
    """Standard or URL-safe base64, padding optional, whitespace ignored, fed in pieces.

    :meth:`feed` and :meth:`finish` raise :class:`ValueError` saying what is wrong.
    """

    def __init__(self) -> None:
        self._tail = b""  # up to 3 characters waiting for the rest of their group of 4
        self._padded = False  # padding was seen: only more padding may follow

    def feed(self, text: bytes) -> bytes:
        compact = text.translate(_URLSAFE, _SPACE)
        pad = compact.find(b"=")
        if pad >= 0 or self._padded:
            if compact[max(pad, 0) :].strip(b"="):
                raise ValueError("'data' is not valid base64: it goes on after its padding")
            compact = compact[:pad] if pad >= 0 else b""
            self._padded = True
        text = self._tail + compact
        whole = len(text) - len(text) % 4
        self._tail = text[whole:]
        return _decode(text[:whole])

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        return _decode(tail + b"=" * (-len(tail) % 4))


def _decode(text: bytes) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"'data' is not valid base64: {exc}") from None


def decode_base64(text: str) -> bytes:
    """All of ``text`` at once (see :class:`Base64Decoder`)."""
    decoder = Base64Decoder()
    return decoder.feed(text.encode()) + decoder.finish()


def _malformed(detail: str) -> Problem:
    return Problem(400, "Malformed JSON", detail)


class HookJson:
    """Feed the body's chunks in order, then :meth:`finish`; raises :class:`Problem`.

    Outside ``data`` the bytes are scanned one by one, for the nesting depth, strings and
    the key before each value; past ``fields_limit`` of them the body is refused (413)
    before more are looked at.
    """

    def __init__(self, fields_limit: int) -> None:
        self._limit = fields_limit
        self._fields = bytearray()  # the body with true in place of the data string
        self.image: deque[bytes] | None = None  # the decoded data string, when it came
        self._decoder = Base64Decoder()
        self._in_data = False
        self._escape = b""  # an escape sequence in the data string, not complete yet
        self._in_string = False
        self._string_escape = False
        self._depth = 0
        self._expect_value = False  # at depth 1: after a key's colon
        self._key_start = -1  # where the key being read starts in _fields
        self._key = b""  # the last key read at depth 1, as JSON

    def feed(self, chunk: bytes) -> None:
        at = 0
        while at < len(chunk):
            at = self._data(chunk, at) if self._in_data else self._structure(chunk, at)

    def finish(self) -> dict[str, Any]:
        """The body's object, ``data`` as ``true`` when it was a string (see :attr:`image`)."""
        if self._in_data:
            raise _malformed("the body ends inside the 'data' string")
        try:
            body = orjson.loads(self._fields)
        except orjson.JSONDecodeError as exc:
            raise _malformed(str(exc)) from None
        if not isinstance(body, dict):
            raise _malformed("the body must be a JSON object")
        return body

    def _structure(self, chunk: bytes, at: int) -> int:
        fields = self._fields
        end = min(len(chunk), at + self._limit + 1 - len(fields))  # one past the limit at most
        for i in range(at, end):
            c = chunk[i]
            if self._in_string:
                if self._string_escape:
                    self._string_escape = False
                elif c == _BACKSLASH:
                    self._string_escape = True
                elif c == _QUOTE:
                    self._in_string = False
                    if self._key_start >= 0:
                        self._key = bytes(fields[self._key_start :]) + b'"'
                        self._key_start = -1
            elif c == _QUOTE:
                if self._depth == 1 and self._expect_value and self._key_is_data():
                    self._start_data()
                    return i + 1
                self._in_string = True
                if self._depth == 1 and not self._expect_value:
                    self._key_start = len(fields)
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
            elif c == _COLON and self._depth == 1:
                self._expect_value = True
            elif c == _COMMA and self._depth == 1:
                self._expect_value = False
            fields.append(c)
        self._check_size()
        return end

    def _key_is_data(self) -> bool:
        try:
            return bool(orjson.loads(self._key) == "data")
        except orjson.JSONDecodeError:
            return False

    def _start_data(self) -> None:
        if self.image is not None:
            raise Problem(422, "Invalid hook body", "'data' is given twice")
        self.image = deque()
        self._fields += b"true"
        self._check_size()
        self._in_data = True

    def _check_size(self) -> None:
        if len(self._fields) > self._limit:
            raise Problem(
                413,
                "Payload Too Large",
                f"the JSON fields besides 'data' may take at most {self._limit:,} bytes",
            )

    def _data(self, chunk: bytes, at: int) -> int:
        while at < len(chunk):
            if self._escape:  # \x or \uXXXX, perhaps split across chunks
                self._escape += chunk[at : at + 1]
                at += 1
                if len(self._escape) == 6 or (len(self._escape) == 2 and self._escape != b"\\u"):
                    escape, self._escape = self._escape, b""
                    self._text(_unescape(escape))
                continue
            stop = _DATA_STOP.search(chunk, at)
            end = stop.start() if stop else len(chunk)
            self._text(chunk[at:end])
            if stop is None:
                return end
            if chunk[end] == _QUOTE:
                self._in_data = self._expect_value = False
                self._decoded(self._decoder.finish)
                return end + 1
            if chunk[end] != _BACKSLASH:
                raise _malformed("'data' holds a raw control character (write a newline as \\n)")
            self._escape = b"\\"
            at = end + 1
        return at

    def _text(self, text: bytes) -> None:
        if text:
            self._decoded(lambda: self._decoder.feed(text))

    def _decoded(self, decode: Callable[[], bytes]) -> None:
        assert self.image is not None
        try:
            piece = decode()
        except ValueError as exc:
            raise Problem(422, "Invalid hook body", str(exc)) from None
        if piece:
            self.image.append(piece)


def _unescape(escape: bytes) -> bytes:
    """One escape of the data string as UTF-8. A \\uXXXX is taken alone, so half of a
    surrogate pair comes out as it is: never base64, so the decoder refuses it (422), as it
    does any other character outside the alphabet."""
    if _UNICODE_ESCAPE.fullmatch(escape):
        return chr(int(escape[2:], 16)).encode("utf-8", "surrogatepass")
    try:
        return str(orjson.loads(b'"' + escape + b'"')).encode()
    except orjson.JSONDecodeError:
        raise _malformed("'data' holds an invalid escape sequence") from None
