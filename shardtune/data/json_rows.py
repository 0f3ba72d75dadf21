"""A .json data file: a top-level list of row objects read element by element from a sliding text buffer
(the file is never held whole, each row knows the line it starts on), or the columnar {"col": [...]} layout,
which is read whole."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import IO, Any

from shardtune.errors import DataError

_JSON_BLOCK = 1 << 20  # characters of a .json file read at a time
_SPACE = re.compile(r"[ \t\r\n]*")
# bytes that were not UTF-8, kept by errors="surrogateescape"; also used by the jsonl reader
UNDECODABLE = re.compile("[\udc80-\udcff]")
NOT_UTF8_FIX = ("re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or set data.on_bad_row=skip "
                "to drop such rows")


def read_json(path: str, raw: IO[bytes], skip_bad: bool, row: Any, bad: Any) -> Iterator[Any]:
    """Rows of an open .json file; `row(path, index, data)` makes a row, `bad(path, index, message, skip_bad)`
    an unreadable one (readers.py's Row and bad-row policy)."""
    text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
    head = text.read(_JSON_BLOCK)
    start = len(head) - len(head.lstrip())
    if head[start:start + 1] == "[":
        yield from _JsonList(path, text, head, start + 1, skip_bad, row, bad)
        return
    yield from _read_json_whole(path, head + text.read(), skip_bad, row, bad)


def _read_json_whole(path: str, content: str, skip_bad: bool, row: Any, bad: Any) -> Iterator[Any]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}). "
                        "Fix: a JSON list of objects (or use .jsonl for one object per line).") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        lengths = {len(v) for v in data.values()}  # columnar {"col": [...]} layout
        if len(lengths) == 1:
            keys = list(data)
            data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}.")
    bad_bytes = UNDECODABLE.search(content) is not None
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            yield bad(path, i, f"{path}, row {i}: expected a JSON object, got {type(rec).__name__}. "
                                "Fix: a JSON list of objects", skip_bad)
        elif bad_bytes and UNDECODABLE.search(json.dumps(rec, ensure_ascii=False)):
            yield bad(path, i, f"{path}, row {i}: bytes that are not UTF-8. Fix: {NOT_UTF8_FIX}.", skip_bad)
        else:
            yield row(path, i, rec)


class _JsonList:
    """The elements of a top-level JSON list, decoded one at a time from a sliding text buffer (the file is
    never held whole), each with the line it starts on."""

    def __init__(self, path: str, text: io.TextIOBase, buf: str, pos: int, skip_bad: bool, row: Any, bad: Any):
        self.path, self.text, self.buf, self.pos, self.skip_bad = path, text, buf, pos, skip_bad
        self.row, self.bad = row, bad
        self.line = 1 + buf.count("\n", 0, pos)  # line of self.pos
        self.eof = False
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        """Read the next block (dropping what was consumed); False at the end of the file."""
        block = "" if self.eof else self.text.read(_JSON_BLOCK)
        self.eof = not block
        self.buf, self.pos = self.buf[self.pos:] + block, 0
        return bool(block)

    def _skip_space(self) -> str:
        """The next non-space character (consumed up to it, not past it); "" at the end of the file."""
        while True:
            end = _SPACE.match(self.buf, self.pos).end()
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            if end < len(self.buf):
                return self.buf[end]
            if not self._more():
                return ""

    def _error(self, problem: str) -> DataError:
        return DataError(f"{self.path}, line {self.line}: {problem}. Fix: a JSON list of objects "
                         "(or use .jsonl for one object per line).")

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            ch = self._skip_space()
            if ch == "]":
                return
            if i > 0:
                if ch != ",":
                    raise self._error(f"expected ',' or ']' after row {i - 1}, got {ch!r}" if ch else
                                      "the list is not closed (the file ends inside it)")
                self.pos += 1
                ch = self._skip_space()
            if not ch:
                raise self._error("the list is not closed (the file ends inside it)")
            value, end = self._decode()
            line = self.line
            if UNDECODABLE.search(self.buf, self.pos, end):
                yield self.bad(self.path, i, f"{self.path}, line {line}: bytes that are not UTF-8 (in row {i}). "
                                         f"Fix: {NOT_UTF8_FIX}.", self.skip_bad)
            elif not isinstance(value, dict):
                yield self.bad(self.path, i, f"{self.path}, line {line}: row {i} is a {type(value).__name__}, "
                                         "not an object. Fix: a JSON list of objects", self.skip_bad)
            else:
                yield self.row(self.path, i, value)
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            i += 1

    def _decode(self) -> tuple[Any, int]:
        """The value at self.pos and where it ends, reading more of the file while it is cut off by the buffer."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                cut_off = e.pos >= len(self.buf) - 1 or e.msg.startswith("Unterminated string")
                if cut_off and self._more():
                    continue
                raise self._error(f"invalid JSON ({e.msg})") from None
            if end < len(self.buf) or self.eof or not self._more():  # a number may continue in the next block
                return value, end
