"""JSON Lines files, read and written one way everywhere: crash-safe appends, one torn-tail rule,
atomic rewrites, an exclusive lock, and a reader that reports a bad line instead of stopping.

The torn-tail rule: a run killed mid-write leaves a last line without its newline. When that line
is not a whole JSON object it is never trusted: readers report it as a bad line, and an appender
cuts it off before writing, so the next line never glues onto it. When it is a whole object (every
byte but the newline was written; no strict prefix of an object is itself an object), it is kept
and only its newline is added.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class BadLine(ValueError):
    """A line that is not a JSON object; `lineno` is 1-based."""

    def __init__(self, lineno: int, reason: str) -> None:
        self.lineno = lineno
        self.reason = reason
        super().__init__(f"line {lineno}: {reason}")


class Locked(RuntimeError):
    """Another process holds the lock on this output."""


def parse_line(raw: bytes, lineno: int) -> dict[str, Any]:
    """One line's bytes -> its object, or BadLine saying why (encoding, JSON, number size, type)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(lineno, f"not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(lineno, f"not valid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer past Python's digit limit, deep nesting
        raise BadLine(lineno, f"not valid JSON: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(obj, dict):
        raise BadLine(lineno, f"not a JSON object (a {type(obj).__name__})")
    return obj


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """(line number, object or BadLine) for every non-blank line; never raises for a bad line."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            torn = not raw.endswith(b"\n")
            try:
                yield lineno, parse_line(raw, lineno)
            except BadLine as e:
                if torn:
                    e = BadLine(lineno, f"{e.reason}; the last line has no newline (a killed writer?)")
                yield lineno, e


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every readable object line of a file ([] when it does not exist); bad lines are skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    return [obj for _, obj in iter_jsonl(p) if not isinstance(obj, BadLine)]


def dumps(obj: dict[str, Any]) -> str:
    """One line of JSON (no newline inside; non-ASCII kept)."""
    return json.dumps(obj, ensure_ascii=False)


def cut_torn_tail(path: str | Path) -> bool:
    """Apply the torn-tail rule (module docstring) to a file's last line; True when something was cut."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    with p.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        pos, cut = size, 0
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        f.seek(cut)
        try:
            parse_line(f.read(size - cut), 0)
        except BadLine:
            f.truncate(cut)
            return True
        f.seek(size)
        f.write(b"\n")
        return False


def has_torn_tail(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    with p.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class JsonlAppender:
    """Thread-safe appends; every `write` call's lines are written and flushed together.
    Opening cuts a torn tail (see the module docstring); `truncate=True` starts the file empty."""

    def __init__(self, path: str | Path, truncate: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not truncate:
            cut_torn_tail(self.path)
        self._f = self.path.open("w" if truncate else "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, objs: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        """Append one object or several (as one write, so a kill tears at most the last line)."""
        if isinstance(objs, dict):
            objs = [objs]
        text = "".join(dumps(o) + "\n" for o in objs)
        if not text:
            return
        with self._lock:
            self._f.write(text)
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Replace `path` with these rows in one step (a kill leaves the old file, never half a new one).
    The temporary file is private to this process, so two writers never share it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(dumps(r) + "\n")
                n += 1
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return n


@contextlib.contextmanager
def exclusive_lock(target: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock beside `target` (a file or folder) for as long as the block runs.
    A second holder is refused at once with `Locked`; the OS frees the lock when the process
    dies, so a killed run leaves no stale lock. A folder's lock is `.lock` inside it; a file's
    is `.NAME.lock` beside it."""
    t = Path(target)
    lock = t / ".lock" if t.is_dir() else t.with_name(f".{t.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no protection
        yield lock
        return
    with lock.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise Locked(f"another {what} is writing to {target} (lock {lock}); wait for it or choose another output") from e
        try:
            yield lock
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["BadLine", "JsonlAppender", "Locked", "cut_torn_tail", "dumps", "exclusive_lock", "has_torn_tail",
           "iter_jsonl", "parse_line", "read_jsonl", "write_jsonl_atomic"]
