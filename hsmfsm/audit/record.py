"""The audit record: every state change as a JSON line, chained with SHA-256.

An auditor asks "what did the signer do last night when the HSM failed?".
The answer must be complete and must not be editable unnoticed, so each
line carries a sequence number, the hash of the line before it (``prev``)
and its own hash (``hash``, SHA-256 over the line's canonical JSON without
``hash``). Editing a line breaks its own hash; deleting or reordering lines
breaks the sequence and the ``prev`` link of the next line; deleting lines
at the end is caught by the head file (``LOG.head``) that holds the last
sequence number and hash. Whoever can rewrite the whole chain and the head
can still forge it: ship the head hash elsewhere (syslog, a ticket) when
that matters. The chain detects accidents and casual edits, not a
determined root.

Writing never blocks or fails a sign call: records go into a bounded queue
and a writer thread appends them. A full queue or a full disk drops records,
reports the loss through logging, and writes a ``gap`` record (with how
many were lost) as soon as it can, so the loss is itself on the record.

Rotation by size: the file is renamed ``LOG.N`` (N counts up from 1, so the
oldest has the smallest number) and a new ``LOG`` continues the same chain:
its first line's ``prev`` is the last hash of the old file. ``verify`` orders
the files by sequence number, so any glob order works.

One process writes one log. A forked child does not write into its parent's
chain (that would fork the chain): the log is switched off in the child.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..core.records import TransitionRecord

log = logging.getLogger("hsmfsm.audit")

GENESIS = "0" * 64


class AuditError(RuntimeError):
    """The audit log cannot be opened (another writer holds it, or the folder is not writable)."""


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(body)).hexdigest()


def seal(body: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """The line (with newline) for ``body`` at ``seq`` after ``prev``, and its hash."""
    body = {**body, "seq": seq, "prev": prev}
    digest = _digest(body)
    return _canonical({**body, "hash": digest}) + b"\n", digest


def _transition_body(rec: TransitionRecord, pool: str | None) -> dict[str, Any]:
    return {"kind": "transition", "time": rec.iso_time, "pool": pool, "member": rec.member,
            "from": rec.source, "to": rec.dest, "event": rec.event, "code": rec.code_name,
            "code_value": rec.code_value, "attempt": rec.attempt, "generation": rec.generation}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_ROTATED = re.compile(r"\.(\d+)$")


class AuditLog:
    """A chained JSON Lines log of transitions; use it as a listener (``pool.add_listener(log)``).

    ``rotate_bytes``: start a new file when the current one is larger
    (``None``: never). ``keep``: rotated files to keep (``None``: all of them;
    the oldest are deleted beyond that, and ``verify`` then needs ``--partial``).
    ``queue_size``: records waiting for the disk before new ones are dropped.
    """

    def __init__(self, path: str | os.PathLike[str], *, pool: str | None = None,
                 rotate_bytes: int | None = 10 * 1024 * 1024, keep: int | None = None,
                 queue_size: int = 10_000, fsync: bool = False) -> None:
        self.path = Path(path)
        self.pool, self.rotate_bytes, self.keep, self.fsync = pool, rotate_bytes, keep, fsync
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self._dropped = 0  # lost since the last gap record (queue full or write failed)
        self._lost_total = 0
        self._written = 0
        self._errors = 0
        self._last_error: str | None = None
        self._count_lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0
        self._pid = os.getpid()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot open: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise AuditError(f"audit log {self.path} is being written by another process; "
                             "give each process its own log path") from None
        self._seq, self._prev = self._chain_head()
        _LIVE.add(self)
        self._enqueue({"kind": "opened", "time": _now_iso(), "pool": pool, "pid": os.getpid()})
        self._thread = threading.Thread(target=self._run, name=f"hsmfsm-audit-{self.path.name}", daemon=True)
        self._thread.start()

    # -- the listener side: never blocks, never raises -----------------------

    def __call__(self, record: TransitionRecord) -> None:
        self.record(record)

    def record(self, record: TransitionRecord) -> None:
        """Queue one transition; drop it (and count it) if the writer is behind."""
        if self._closed or os.getpid() != self._pid:
            return
        self._enqueue(_transition_body(record, self.pool))

    def note(self, kind: str, **fields: Any) -> None:
        """Queue one record that is not a transition (``hsmfsm serve``: an application connected,
        a login was refused, an outage as applications saw it). ``fields`` must be JSON values and
        must never hold a PIN. Same contract as :meth:`record`: never blocks, never raises."""
        if self._closed or os.getpid() != self._pid:
            return
        if kind in ("transition", "gap", "opened"):
            raise ValueError(f"audit record kind {kind!r} is the log's own")
        self._enqueue({**fields, "kind": kind, "time": _now_iso(), "pool": self.pool})

    def _enqueue(self, body: dict[str, Any]) -> None:
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            with self._idle:
                self._pending -= 1
            with self._count_lock:
                first = self._dropped == 0
                self._dropped += 1
                self._lost_total += 1
            if first:
                log.error("audit log %s: writer is behind; dropping records (a gap record will say how many)",
                          self.path)

    # -- status ---------------------------------------------------------------

    @property
    def written(self) -> int:
        return self._written

    @property
    def lost(self) -> int:
        """Records that never reached the file (each loss is also on the record as a gap)."""
        return self._lost_total

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is on disk (or dropped); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        if os.getpid() == self._pid:
            self.flush(timeout)
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)
        self._closed = True
        try:
            os.close(self._fd)
        except OSError:
            pass
        _LIVE.discard(self)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AuditLog {self.path} written={self._written} lost={self._lost_total}>"

    # -- the writer thread ----------------------------------------------------

    def _chain_head(self) -> tuple[int, str]:
        """Where the chain stands: the last line of the current file, else the head file, else the start.

        A half-written last line (the process died mid-write) was never a
        record; it is cut off so that the next record starts on a line of its own.
        """
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as fh:
                fh.seek(max(0, size - 65536))
                tail = fh.read()
            if not tail.endswith(b"\n"):
                cut = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
                log.warning("audit log %s: cutting off a half-written last line (%d bytes)", self.path, size - cut)
                os.ftruncate(self._fd, cut)
        last = _last_line(self.path)
        if last is not None:
            try:
                rec = json.loads(last)
                return int(rec["seq"]) + 1, str(rec["hash"])
            except (ValueError, KeyError, TypeError):
                log.error("audit log %s: last line is not a record; continuing from the head file", self.path)
        head = _read_head(self.path)
        if head is not None:
            return head["seq"] + 1, head["hash"]
        return 0, GENESIS

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < 512:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = [b for b in batch if b is not None]
            self._write(done)
            with self._idle:
                self._pending -= len(done)
                self._idle.notify_all()
            if None in batch:
                return

    def _write(self, bodies: list[dict[str, Any]]) -> None:
        with self._count_lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            bodies = [{"kind": "gap", "time": _now_iso(), "pool": self.pool, "lost": dropped}, *bodies]
        if not bodies:
            return
        seq, prev = self._seq, self._prev
        lines = []
        for body in bodies:
            line, prev = seal(body, seq, prev)
            lines.append(line)
            seq += 1
        try:
            for chunk in self._chunks(lines):
                self._maybe_rotate(len(chunk))
                _append(self._fd, chunk)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            lost = len(bodies) - (1 if dropped else 0)
            with self._count_lock:
                self._dropped += dropped + lost
                self._lost_total += lost
            self._errors += 1
            self._last_error = f"{exc.strerror or exc}"
            if self._errors == 1 or self._errors % 100 == 0:
                log.error("audit log %s: cannot write (%s); %d record(s) lost so far; signing goes on",
                          self.path, self._last_error, self._lost_total)
            return
        self._seq, self._prev = seq, prev
        self._written += len(bodies)
        if self._errors and self._last_error:
            log.warning("audit log %s: writing again after %s", self.path, self._last_error)
            self._last_error = None
        _write_head(self.path, seq - 1, prev)

    def _chunks(self, lines: list[bytes]) -> Iterator[bytes]:
        """The lines in writes that each fit the rotation size (a file never outgrows it by a batch)."""
        if self.rotate_bytes is None:
            yield b"".join(lines)
            return
        room = self.rotate_bytes - os.fstat(self._fd).st_size
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > room:
                yield b"".join(chunk)
                chunk, size, room = [], 0, self.rotate_bytes
            chunk.append(line)
            size += len(line)
        if chunk:
            yield b"".join(chunk)

    def _maybe_rotate(self, incoming: int) -> None:
        if self.rotate_bytes is None:
            return
        size = os.fstat(self._fd).st_size
        if size == 0 or size + incoming <= self.rotate_bytes:
            return
        numbers = sorted(rotated_numbers(self.path))
        target = self.path.with_name(f"{self.path.name}.{(numbers[-1] if numbers else 0) + 1}")
        os.rename(self.path, target)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(self._fd)
        self._fd = fd
        if self.keep is not None:
            numbers.append(int(target.name.rsplit(".", 1)[1]))
            for n in numbers[:-self.keep] if self.keep else numbers:
                try:
                    os.unlink(self.path.with_name(f"{self.path.name}.{n}"))
                except OSError:
                    pass


_LIVE: weakref.WeakSet[AuditLog] = weakref.WeakSet()


def _in_child() -> None:
    """After fork: the child must not append to the parent's chain; its logs go quiet."""
    for audit in list(_LIVE):
        audit._closed = True


os.register_at_fork(after_in_child=_in_child)


def _append(fd: int, data: bytes) -> None:
    """Append whole lines or nothing: a short write is cut back, so no half line is left behind."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise


def _last_line(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            if end == 0:
                return None
            fh.seek(max(0, end - 65536))
            tail = fh.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    except OSError:
        return None
    return tail.decode("utf-8", "replace") or None


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _write_head(path: Path, seq: int, digest: str) -> None:
    tmp = path.with_name(path.name + ".head.tmp")
    try:
        tmp.write_text(json.dumps({"seq": seq, "hash": digest}) + "\n")
        os.replace(tmp, head_path(path))
    except OSError:
        pass  # the head is a convenience for verify; the chain itself is on disk


def _read_head(path: Path) -> dict[str, Any] | None:
    try:
        head = json.loads(head_path(path).read_text())
        return {"seq": int(head["seq"]), "hash": str(head["hash"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rotated_numbers(path: Path) -> list[int]:
    out = []
    for p in path.parent.glob(path.name + ".*"):
        m = _ROTATED.search(p.name)
        if m and p.name == f"{path.name}.{m.group(1)}":
            out.append(int(m.group(1)))
    return out


# --------------------------------------------------------------------------- verify


@dataclass
class Verdict:
    """What ``verify`` found: ok, or the first bad line and what is wrong with it."""

    ok: bool
    records: int = 0
    files: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.ok:
            return f"FAILED: {self.problem}"
        span = f"seq {self.first_seq}..{self.last_seq}" if self.records else "no records"
        return (f"OK: {self.records} records in {self.files} file(s), chain intact ({span}), "
                f"last hash {self.last_hash}")


def _records(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            yield n, raw.decode("utf-8", "replace")


def _log_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The given logs in chain order (by first seq); head files from a glob such as ``LOG*`` are skipped."""
    files = {Path(p) for p in paths}
    files = {p for p in files if not p.name.endswith((".head", ".head.tmp"))}
    return sorted(files, key=lambda p: (_first_seq(p), str(p)))


def _first_seq(path: Path) -> float:
    try:
        for _, line in _records(path):
            return int(json.loads(line)["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return float("inf")


def verify(paths: Iterable[str | os.PathLike[str]], *, partial: bool = False) -> Verdict:
    """Check the chain over ``paths`` (a log and its rotated files, in any order).

    ``partial``: the oldest files were rotated away, so the chain may start
    after seq 0; its first ``prev`` is then taken on trust (and reported).
    """
    files = _log_files(paths)
    verdict = Verdict(ok=False, files=len(files))
    if not files:
        verdict.problem = "no log files given"
        return verdict
    expect_seq: int | None = None if partial else 0
    prev: str | None = None if partial else GENESIS
    where = ""
    try:
        for path in files:
            for n, line in _records(path):
                where = f"{path}:{n}"
                problem = _check_line(line, expect_seq, prev)
                if problem:
                    verdict.problem = f"{where}: {problem}"
                    return verdict
                rec = json.loads(line)
                if verdict.first_seq is None:
                    verdict.first_seq = rec["seq"]
                    if rec["seq"] != 0:
                        verdict.notes.append(f"chain starts at seq {rec['seq']} (earlier files rotated away); "
                                             f"its first prev {rec['prev']} is taken on trust")
                expect_seq, prev = rec["seq"] + 1, rec["hash"]
                verdict.records += 1
                verdict.last_seq, verdict.last_hash = rec["seq"], rec["hash"]
    except OSError as exc:
        verdict.problem = f"{where or files[0]}: cannot read: {exc.strerror}"
        return verdict
    live = next((p for p in files if not _ROTATED.search(p.name)), None)
    last = files[-1]
    head = _read_head(last) if live == last else None  # the head file goes with the live log, if last
    if head is not None and verdict.last_seq is not None:
        if head["seq"] > verdict.last_seq:
            verdict.problem = (f"{where}: the log ends at seq {verdict.last_seq} but its head file "
                               f"{head_path(last)} says seq {head['seq']}: "
                               f"{head['seq'] - verdict.last_seq} record(s) after this line were deleted")
            return verdict
        if head["seq"] == verdict.last_seq and head["hash"] != verdict.last_hash:
            verdict.problem = f"{where}: the last record's hash differs from the head file's: it was replaced"
            return verdict
        if head["seq"] < verdict.last_seq:
            verdict.notes.append("the head file lags the log (the writer stopped between the two writes)")
    elif verdict.records:
        verdict.notes.append("no head file checked: deletion of records at the very end cannot be seen")
    verdict.ok = True
    return verdict


def _check_line(line: str, expect_seq: int | None, prev: str | None) -> str | None:
    if not line.endswith("\n"):
        return "the line is cut short (no newline): a write was interrupted or the file was truncated"
    try:
        rec = json.loads(line)
    except ValueError:
        return "not a JSON record (edited or corrupted)"
    if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str) or not isinstance(rec.get("seq"), int):
        return "not an audit record (no seq or hash)"
    body = {k: v for k, v in rec.items() if k != "hash"}
    if _digest(body) != rec["hash"]:
        return "the record does not match its hash: it was edited"
    if expect_seq is not None and rec["seq"] != expect_seq:
        if rec["seq"] > expect_seq:
            return (f"seq {rec['seq']} where {expect_seq} was expected: "
                    f"{rec['seq'] - expect_seq} record(s) before this line are missing or out of order")
        return f"seq {rec['seq']} where {expect_seq} was expected: this line is repeated or out of order"
    if prev is not None and rec.get("prev") != prev:
        return "prev does not match the hash of the record before it: a record was replaced or reordered"
    return None


# --------------------------------------------------------------------------- show


_AGO = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 time (UTC if no zone) or an age such as 30s, 10m, 2h, 1d."""
    m = _AGO.match(text.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: float(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: give an ISO 8601 time (2026-11-24T10:00:00Z) "
                         "or an age (30s, 10m, 2h, 1d)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def timeline(paths: Iterable[str | os.PathLike[str]], *, member: str | None = None,
             since: datetime | None = None) -> Iterator[str]:
    """Readable lines, oldest first: time, pool/member, from -> to, event, return code."""
    files = _log_files(paths)
    for path in files:
        for n, line in _records(path):
            try:
                rec = json.loads(line)
                when = datetime.fromisoformat(rec["time"])
            except (ValueError, KeyError, TypeError):
                yield f"{path}:{n}: (not a record)"
                continue
            if since is not None and when < since:
                continue
            if member is not None and rec.get("member") != member:
                continue
            yield format_record(rec)


def format_record(rec: dict[str, Any]) -> str:
    kind = rec.get("kind")
    who = "/".join(str(x) for x in (rec.get("pool"), rec.get("member")) if x)
    if kind == "transition":
        code = ""
        if rec.get("code"):
            code = f"  {rec['code']}" + (f" (0x{rec['code_value']:X})" if isinstance(rec.get("code_value"), int)
                                         else "")
        return (f"{rec['time']}  #{rec['seq']:<5} {who:<20} {rec['from']:>12} -> {rec['to']:<12} "
                f"on {rec['event']}{code}  attempt={rec['attempt']} gen={rec['generation']}")
    if kind == "gap":
        return f"{rec['time']}  #{rec['seq']:<5} {who:<20} GAP: {rec.get('lost')} record(s) could not be written"
    if kind == "opened":
        return f"{rec['time']}  #{rec['seq']:<5} {who:<20} log opened by pid {rec.get('pid')}"
    extra = " ".join(f"{k}={rec[k]}" for k in sorted(rec) if k not in _FRAME_FIELDS)
    return f"{rec.get('time')}  #{rec.get('seq'):<5} {who:<20} {kind} {extra}".rstrip()


#: The fields every record has, not repeated in a note's one-line form.
_FRAME_FIELDS = frozenset({"kind", "time", "pool", "member", "seq", "prev", "hash"})
