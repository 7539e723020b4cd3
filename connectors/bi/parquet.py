"""A batch target writing Parquet files (a data lake folder), with its positions beside them.

Layout under ``path``::

    <table>/date=<YYYY-MM-DD>/<topic>+<partition>+<start:020d>.parquet   the rows
    _positions/<consumer>/<topic>+<partition>.json                        {"next_offset": N, …}
    _positions/<consumer>/.lock                                           held while writing

``<table>`` is :func:`~connectors.bi.columns.table_name` of the event type, the date the UTC
date the event occurred (else the Kafka record's timestamp, else 1970-01-01) and ``<start>``
the position the batch starts the partition from, so one batch writes, per partition, one file
per table and date, and writing the same batch again gives the same names. Each file holds the
metadata columns, ``_landed_at``, then the fields of every schema version among its rows (by
name; a later version's new field adds a column, null in older rows).

Commit protocol of :meth:`ParquetTarget.write` (a file system has no transaction, so the
positions file of a partition is its commit record)::

    lock the consumer's .lock (flock)                              one writer at a time
    check each partition's stored position is the expected one   else PositionConflict
    each data file: .<name>.tmp-<random>, fsync, rename, fsync directory
    before_commit(rejected)                                        dead-letters rejected rows
    each positions file: tmp, fsync, rename, fsync directory       the commit

A process killed between the renames and a positions file leaves data files whose start is at
or past the partition's stored position: :meth:`ParquetTarget.positions`, which the sink calls
before it reads a partition, deletes them (and leftover ``.tmp-`` files), so the rewrite of
those records lands them exactly once. It takes the lock too, so it never deletes the files
of a write still in progress. A reader that must never see uncommitted rows reads only files
whose start is below the partition's stored ``next_offset``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.bi import columns as c
from pipeline.errors import (
    ConfigError,
    PayloadError,
    PermanentError,
    PipelineError,
    SchemaError,
    TransientError,
)
from pipeline.sink.target import TP, Batch, BeforeCommit, PositionConflict, Rejected
from pipeline.worker.connector import Event

if TYPE_CHECKING:
    from pipeline.config import Settings

__all__ = ["ParquetTarget", "arrow_type"]

POSITIONS_DIR = "_positions"
_LOCK_FILE = ".lock"
LANDED_AT = c.Column("_landed_at", c.TIMESTAMP, False, doc="when this target wrote the row")
_EPOCH = dt.date(1970, 1, 1)
_DATA_FILE = re.compile(r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<start>\d{20})\.parquet$")
_TMP_FILE = re.compile(r"^\.(?P<final>.+)\.tmp-[0-9a-f]+$")
_POSITION_FILE = re.compile(r"^(?P<topic>.+)\+(?P<partition>\d+)\.json$")
# what Arrow raises for a value it cannot store in a column's type
_REFUSED = (pa.ArrowException, TypeError, ValueError, OverflowError, ArithmeticError)
_NO_COMPRESSION = ("none", "uncompressed")


def arrow_type(col: c.Column) -> Any:
    """The Arrow type of a column kind (see :mod:`connectors.bi.columns`)."""
    kind = col.kind
    if kind == c.DECIMAL:
        precision = col.precision or 38
        if precision > 38:
            return pa.decimal256(precision, col.scale)
        return pa.decimal128(precision, col.scale)
    simple: dict[str, Callable[[], Any]] = {
        c.STRING: pa.string, c.INT: pa.int32, c.LONG: pa.int64, c.FLOAT: pa.float32,
        c.DOUBLE: pa.float64, c.BOOLEAN: pa.bool_, c.BYTES: pa.binary, c.DATE: pa.date32,
        c.UUID: pa.string, c.JSON: pa.string,
        c.TIME: lambda: pa.time64("us"),
        c.TIMESTAMP: lambda: pa.timestamp("us", tz="UTC"),
        c.LOCAL_TIMESTAMP: lambda: pa.timestamp("us"),
    }
    return simple.get(kind, pa.string)()


class ParquetTarget:
    """Lands batches as Parquet files under ``path`` (``workers.<name>.options.path``).

    ``compression``: a Parquet codec (zstd, snappy, gzip, brotli, lz4, or none);
    ``lock_timeout_s``: how long a call waits for another process's write. One consumer group
    per folder: the data files are not kept per consumer (positions and lock are). The lock is
    an ``flock``, which a local file system honours (not every network one)."""

    name = "parquet"

    def __init__(
        self, path: str | os.PathLike[str], compression: str = "zstd", lock_timeout_s: float = 10.0
    ) -> None:
        self.root = Path(path)
        self.lock_timeout_s = lock_timeout_s
        codec = compression.lower()
        if codec not in _NO_COMPRESSION:
            try:
                ok = bool(pa.Codec.is_available(codec))
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(
                    f"parquet target: compression {compression!r} is not available; use one "
                    "of zstd, snappy, gzip, brotli, lz4, none"
                )
        self.compression = "none" if codec in _NO_COMPRESSION else codec

    # -- BatchTarget -----------------------------------------------------------------------------
    def open(self, settings: Settings, consumer: str) -> None:
        """Create ``path`` and check that files can be written in it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = _mkstemp(self.root, ".probe")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                f"parquet target: cannot create or write the folder {self.root} "
                f"({exc.strerror or exc}); set workers.<name>.options.path to a writable folder"
            ) from exc

    def positions(self, consumer: str, tps: Sequence[TP]) -> dict[TP, int | None]:
        """The stored next offset of each partition; files an unfinished write left behind
        (data files starting at or past it, ``.tmp-`` files) are deleted first."""
        with self._lock(consumer):
            stored = {tp: self._read_position(consumer, tp) for tp in tps}
            try:
                self._remove_orphans(consumer, stored)
            except OSError as exc:
                raise _transient(exc, "removing files of an unfinished write", self.root) from exc
        return stored

    def write(self, batch: Batch, before_commit: BeforeCommit) -> None:
        """Land the batch: data files, then (after ``before_commit``) each partition's position.

        Raises PositionConflict (nothing written) when a stored position is not the expected
        one, TransientError when the file system fails (the files of partitions whose position
        was not stored are removed again). ``batch.rejected`` is filled afresh on every call."""
        with self._lock(batch.consumer):
            self._write(batch, before_commit)

    def _write(self, batch: Batch, before_commit: BeforeCommit) -> None:
        stored = {tp: self._read_position(batch.consumer, tp) for tp in batch.positions}
        stale = [tp for tp, (expected, _new) in batch.positions.items() if stored[tp] != expected]
        if stale:
            raise PositionConflict(
                "stored position of "
                + "; ".join(
                    f"{t}[{p}] is {_show(stored[(t, p)])}, the batch expected "
                    f"{_show(batch.positions[(t, p)][0])}"
                    for t, p in stale
                ),
                stale,
            )
        landed_at = dt.datetime.now(dt.UTC)
        rejected: list[Rejected] = []
        files: list[tuple[TP, Path, Any]] = []
        for (table, day, tp), events in _groups(batch).items():
            start = _start_offset(batch, tp)
            built, bad = _table_of(events, landed_at, start)
            rejected.extend(bad)
            if built is not None:
                name = f"{tp[0]}+{tp[1]}+{start:020d}.parquet"
                files.append((tp, self.root / table / f"date={day.isoformat()}" / name, built))
        batch.rejected[:] = rejected

        placed: dict[TP, list[Path]] = {}
        committed: set[TP] = set()
        current = self.root
        try:
            try:
                for tp, final, table in files:
                    current = final
                    self._place(final, functools.partial(self._write_parquet, table))
                    placed.setdefault(tp, []).append(final)
                for folder in sorted({final.parent for _tp, final, _t in files}):
                    current = folder
                    _fsync_dir(folder)
            except OSError as exc:
                raise _transient(exc, "writing a data file", current) from exc
            before_commit(batch.rejected)
            try:
                for tp, (_expected, new) in batch.positions.items():
                    current = self._position_file(batch.consumer, tp)
                    body = {"next_offset": new, "updated_at": landed_at.isoformat()}
                    self._place(current, functools.partial(_write_bytes, json.dumps(body)))
                    _fsync_dir(current.parent)
                    committed.add(tp)
            except OSError as exc:
                raise _transient(exc, "storing a position", current) from exc
        except Exception:
            # uncommitted files do not stay visible (a process killed here leaves them to
            # positions(), which deletes them before the partition is read again)
            for tp, paths in placed.items():
                if tp not in committed:
                    for p in paths:
                        with contextlib.suppress(OSError):
                            p.unlink()
            raise

    def reset(self, consumer: str) -> None:
        """Delete every data file and the consumer's positions (positions first: a process
        killed in between leaves data without positions, which :meth:`positions` deletes)."""
        folder = current = self._positions_dir(consumer)
        with self._lock(consumer):  # the lock file stays: another process may wait on it
            try:
                for current in sorted(folder.iterdir()):
                    if current.name != _LOCK_FILE:
                        current.unlink()
                for current in self._table_dirs():
                    shutil.rmtree(current)
            except OSError as exc:
                raise _transient(exc, "resetting", current) from exc

    def close(self) -> None:
        """Nothing to release: every call is complete, its lock released, when it returns."""

    @contextlib.contextmanager
    def _lock(self, consumer: str) -> Iterator[None]:
        """Hold the consumer's lock file (``flock``, so every process and thread on this host
        waits for it): the check of the expected positions and the commit are one step, and
        :meth:`positions` never deletes the files of a write still in progress (of an instance
        the group replaced that is still landing). Not re-entrant; a TransientError after
        ``lock_timeout_s``."""
        folder = self._positions_dir(consumer)
        try:
            _makedirs(folder)
            fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _transient(exc, "opening the lock file", folder) from exc
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TransientError(
                            f"parquet target: {folder / _LOCK_FILE} stayed locked for "
                            f"{self.lock_timeout_s:g}s (another instance is landing this "
                            "consumer's partitions); check for a stuck worker on the folder"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- files -----------------------------------------------------------------------------------
    def _positions_dir(self, consumer: str) -> Path:
        return self.root / POSITIONS_DIR / _safe_name(consumer)

    def _position_file(self, consumer: str, tp: TP) -> Path:
        return self._positions_dir(consumer) / f"{tp[0]}+{tp[1]}.json"

    def _read_position(self, consumer: str, tp: TP) -> int | None:
        path = self._position_file(consumer, tp)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _transient(exc, "reading a position", path) from exc
        try:
            value = json.loads(text)["next_offset"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"next_offset {value!r} is not an offset")
        except (ValueError, KeyError, TypeError) as exc:
            raise PipelineError(
                f"parquet target: positions file {path} is corrupt ({exc}); restore it (the "
                "highest start offset of the partition's files shows how far it got) or delete "
                "it and the partition's data files to land the partition again"
            ) from exc
        return value

    def _table_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.iterdir()
            if p.is_dir() and p.name != POSITIONS_DIR and not p.name.startswith(".")
        )

    def _data_files(self) -> Iterator[Path]:
        for table in self._table_dirs():
            for day in table.iterdir():
                if day.is_dir() and day.name.startswith("date="):
                    yield from (f for f in day.iterdir() if f.is_file())

    def _remove_orphans(self, consumer: str, stored: dict[TP, int | None]) -> None:
        for f in list(self._data_files()):
            tmp = _TMP_FILE.match(f.name)
            m = _DATA_FILE.match(tmp.group("final") if tmp else f.name)
            if m is None:
                continue
            tp = (m.group("topic"), int(m.group("partition")))
            if tp not in stored:
                continue
            pos = stored[tp]
            if tmp or pos is None or int(m.group("start")) >= pos:
                f.unlink(missing_ok=True)
        pdir = self._positions_dir(consumer)
        if pdir.is_dir():
            for f in list(pdir.iterdir()):
                tmp = _TMP_FILE.match(f.name)
                m = _POSITION_FILE.match(tmp.group("final")) if tmp else None
                if m and (m.group("topic"), int(m.group("partition"))) in stored:
                    f.unlink(missing_ok=True)

    def _write_parquet(self, table: Any, f: BinaryIO) -> None:
        pq.write_table(table, f, compression=self.compression)

    def _place(self, final: Path, fill: Callable[[BinaryIO], None]) -> None:
        """Write ``final`` atomically: a hidden tmp file beside it, filled, fsynced, renamed
        (the caller fsyncs the folder). On failure the tmp file is removed, the error raised."""
        _makedirs(final.parent)
        fd, tmp = _mkstemp(final.parent, f".{final.name}")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# -- rows -----------------------------------------------------------------------------------------
def _groups(batch: Batch) -> dict[tuple[str, dt.date, TP], list[Event]]:
    """Events by (table, UTC date, partition): one file each, rows in offset order."""
    out: dict[tuple[str, dt.date, TP], list[Event]] = {}
    for e in batch.events:
        key = (c.table_name(e.event_type), _day(e), (e.topic, e.partition))
        out.setdefault(key, []).append(e)
    for events in out.values():
        events.sort(key=lambda e: e.offset)
    return out


def _day(e: Event) -> dt.date:
    """The UTC date the event occurred (else of its Kafka timestamp, else 1970-01-01)."""
    if e.occurred_at is not None:
        at = e.occurred_at
        return (at.astimezone(dt.UTC) if at.tzinfo is not None else at).date()
    if e.timestamp_ms > 0:
        return dt.datetime.fromtimestamp(e.timestamp_ms / 1000, dt.UTC).date()
    return _EPOCH


def _start_offset(batch: Batch, tp: TP) -> int:
    """The position the batch expects the partition at (the same on every attempt), else the
    lowest offset it holds of the partition."""
    expected = batch.positions.get(tp, (None, 0))[0]
    if expected is not None:
        return expected
    offsets = [e.offset for e in batch.events if (e.topic, e.partition) == tp]
    return min(offsets) if offsets else 0


_META = (*c.META, LANDED_AT)
_META_NAMES = frozenset(col.name for col in _META)


def _table_of(
    events: list[Event], landed_at: dt.datetime, start: int
) -> tuple[Any, list[Rejected]]:
    """The Arrow table of one file (None when no row is left) and the events left out: those
    without a usable schema or payload, and those holding a value Arrow refuses."""
    rejected: list[Rejected] = []
    rows: list[tuple[Event, dict[str, Any]]] = []
    fields: list[c.Column] = []
    seen: dict[int, list[c.Column]] = {}  # by id(schema): one walk per schema version
    for e in events:
        if e.schema is None:
            rejected.append(Rejected(e, SchemaError(
                f"event {e.event_id} ({e.event_type}): no writer schema known, so its fields "
                "have no columns")))
            continue
        cols = seen.get(id(e.schema))
        if cols is None:
            cols = seen[id(e.schema)] = c.columns_of(e.schema)
        clash = [col.name for col in cols if col.name in _META_NAMES]
        if clash:
            rejected.append(Rejected(e, SchemaError(
                f"event {e.event_id} ({e.event_type} v{e.schema.version}): field(s) "
                f"{', '.join(clash)} have the name of a metadata column of the parquet target")))
            continue
        try:
            payload = e.payload
        except PermanentError as exc:  # a body that does not decode
            rejected.append(Rejected(e, exc))
            continue
        added, widened = c.merge(fields, cols)
        wide = {col.name: col for col in widened}
        fields = [wide.get(col.name, col) for col in fields] + added
        rows.append((e, payload))

    bad: dict[int, PayloadError] = {}
    values: dict[str, list[Any]] = {}
    arrays: dict[str, Any] = {}
    for col in fields:
        values[col.name], arrays[col.name] = _column(
            col, [p.get(col.name) for _e, p in rows], rows, bad)
    rejected.extend(Rejected(rows[i][0], bad[i]) for i in sorted(bad))
    kept = [e for i, (e, _p) in enumerate(rows) if i not in bad]
    if not kept:
        return None, rejected
    if bad or any(a is None for a in arrays.values()):  # again, without rejected rows
        arrays = {
            col.name: pa.array([v for i, v in enumerate(values[col.name]) if i not in bad],
                               type=arrow_type(col))
            for col in fields
        }
    for col in _META:
        arrays[col.name] = pa.array([_meta_value(col.name, e, landed_at) for e in kept],
                                    type=arrow_type(col))
    cols_out = [*_META, *fields]
    schema = pa.schema(
        [
            pa.field(col.name, arrow_type(col), nullable=col.nullable,
                     metadata={"doc": col.doc} if col.doc else None)
            for col in cols_out
        ],
        metadata=_file_metadata(kept, start, landed_at),
    )
    table = pa.Table.from_pydict({col.name: arrays[col.name] for col in cols_out}, schema=schema)
    return table, rejected


def _meta_value(name: str, e: Event, landed_at: dt.datetime) -> Any:
    if name == "_landed_at":
        return landed_at
    if name == "_schema_version":
        return e.schema.version if e.schema is not None else None
    return getattr(e, name[1:])  # _event_id → event.event_id …


def _file_metadata(events: list[Event], start: int, landed_at: dt.datetime) -> dict[str, str]:
    first = events[0]
    return {
        "event_type": ",".join(sorted({e.event_type for e in events})),
        "topic": first.topic,
        "partition": str(first.partition),
        "start_offset": str(start),
        "end_offset": str(max(e.offset for e in events)),  # the last row's offset (inclusive)
        "schema_versions": ",".join(
            str(v) for v in sorted({e.schema.version for e in events if e.schema is not None})
        ),
        "landed_at": landed_at.isoformat(),
    }


def _prepare(col: c.Column, value: Any) -> Any:
    """A decoded Avro value in the form Arrow takes for the column (may raise TypeError)."""
    if value is None:
        return None
    if col.kind == c.JSON:
        return c.to_json(value)
    if col.kind in (c.UUID, c.STRING) and isinstance(value, uuid.UUID):
        return str(value)
    return value


def _column(
    col: c.Column,
    values: list[Any],
    rows: list[tuple[Event, dict[str, Any]]],
    bad: dict[int, PayloadError],
) -> tuple[list[Any], Any]:
    """The column's values as Arrow takes them, and their array (None when some are refused).

    A row whose value cannot be converted, or that Arrow refuses, goes to ``bad`` (values are
    tried one by one only when the whole column fails)."""
    typ = arrow_type(col)
    out: list[Any] = []
    for i, v in enumerate(values):
        try:
            out.append(_prepare(col, v))
        except _REFUSED as exc:
            bad.setdefault(i, _refused(col, typ, rows[i][0], v, exc))
            out.append(None)
    try:
        return out, pa.array(out, type=typ)
    except _REFUSED:
        pass
    for i, v in enumerate(out):
        if i in bad:
            continue
        try:
            pa.array([v], type=typ)
        except _REFUSED as exc:
            bad[i] = _refused(col, typ, rows[i][0], values[i], exc)
    return out, None


def _refused(col: c.Column, typ: Any, e: Event, value: Any, exc: BaseException) -> PayloadError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return PayloadError(
        f"event {e.event_id} ({e.event_type} {e.topic}[{e.partition}]@{e.offset}): field "
        f"{col.name!r} holds {shown} ({type(value).__name__}), which a parquet {typ} column "
        f"cannot store: {exc}",
        event_type=e.event_type,
        path=col.name,
    )


# -- file system helpers --------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    """A consumer group name as one path component."""
    safe = quote(name, safe="")
    if not safe.strip("."):  # "", "." and ".." are no file names
        return "%" if not safe else "%2E" * len(safe)
    return safe


def _write_bytes(text: str, f: BinaryIO) -> None:
    f.write(text.encode())


def _mkstemp(folder: Path, prefix: str) -> tuple[int, str]:
    path = folder / f"{prefix}.tmp-{secrets.token_hex(8)}"
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), str(path)


def _makedirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsyncing each parent that got an entry."""
    if folder.is_dir():
        return
    _makedirs(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:
        if not folder.is_dir():
            raise
        return
    _fsync_dir(folder.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _show(position: int | None) -> str:
    return "none" if position is None else str(position)


def _transient(exc: OSError, doing: str, where: Path) -> TransientError:
    path = exc.filename or where
    return TransientError(
        f"parquet target: {doing} failed at {path}: {exc.strerror or exc}; check that the "
        "folder exists and is writable by this process, and that its disk has free space"
    )
