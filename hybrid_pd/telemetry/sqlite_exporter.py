"""An OpenTelemetry ``SpanExporter`` that writes spans into one SQL database.

Several processes (prefill engine, decode engine, proxy, bench workers) write the same
database at once: a SQLite file (the embedded default) or a PostgreSQL database (the
central store).  What makes that safe and cheap:

* on SQLite, WAL journal, ``busy_timeout`` and ``synchronous=NORMAL`` set in a
  ``connect`` hook on *our* engine only -- WAL lets readers (the dashboard) run beside
  writers, the busy timeout makes a writer wait for the lock instead of failing at once;
  on PostgreSQL, ``lock_timeout`` plays the busy timeout's part (:mod:`.store`);
* one transaction per batch (``engine.begin()`` + executemany), so a batch is stored
  whole or not at all, and the write lock is taken once per batch, not per span;
* a bounded retry on "database is locked" (PostgreSQL: lock timeout, deadlock);
* schema creation serialised across processes (on PostgreSQL by an advisory lock).

It must never block or break serving.  It runs on the BatchSpanProcessor's worker
thread, never on a serving thread, and ``export`` never raises: on a locked, full or
unwritable database (or any other error) it drops the batch, counts the drop
(:mod:`hybrid_pd.telemetry.counters`: exporter attributes, Prometheus, OTel metric, and
a rate-limited log line), returns ``SpanExportResult.FAILURE`` and carries on with the
next batch.  The worst case per batch is ``(max_retries + 1) * busy_timeout`` plus the
back-off (about 20 s with the defaults).

The target is a SQLAlchemy URL, or a plain file path meaning SQLite.  PostgreSQL is the
same code with another URL (``postgresql+psycopg://user@host/db``; psycopg 3, installed
by ``scripts/setup.sh``): same tables, columns and indexes, and both are tested.  The
sink keeps the name ``sqlite`` on either backend (counters, ``Telemetry.sinks``).  A
database whose schema version is newer than ours is refused with
:class:`SchemaVersionError`.

Drops are stored too, so a reader of the file (the dashboard) can tell that spans are
missing: table ``telemetry_drops``, one row per (sink, reason) per write, holding how many
spans were dropped between ``first_ns`` and ``last_ns``.  Rows are written in the same
transaction as the next batch of spans (a batch that could not be written keeps its
drops for the next one) and once more at shutdown; drops of a database that never
becomes writable reach only the counters.  The table is additive (like an index), so it
does not bump the schema version: older readers ignore it.

Who wrote the spans goes to table ``processes`` (:mod:`.schema`): one row per (service,
role, engine id, pid, host), the resource's identity (``set_origin``) and each engine id
the process's spans name.  Identities not yet written ride along with the next batch's
transaction (an insert that ignores duplicates, so restarts and concurrent writers are
harmless); after that a batch costs one set look-up per span.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.schema import CreateIndex, CreateTable

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import counters, store
from hybrid_pd.telemetry.schema import (
    SCHEMA_VERSION,
    metadata_obj,
    processes_table,
    schema_version_table,
    spans_table,
)
from hybrid_pd.telemetry.store import to_url

logger = logging.getLogger(__name__)

# Lives here rather than in schema.py only because this module is its one writer; it is
# part of the same MetaData, so ensure_schema creates it with the other tables.
drops_table = Table(
    "telemetry_drops",
    metadata_obj,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("recorded_ns", BigInteger, nullable=False),  # when this row was written
    Column("first_ns", BigInteger, nullable=False),  # first and last drop it counts
    Column("last_ns", BigInteger, nullable=False, index=True),
    Column("service", String(128)),
    Column("role", String(32)),
    Column("engine_id", String(256)),
    Column("pid", Integer),
    Column("sink", String(64), nullable=False),  # sqlite, otlp-grpc, otlp-http, console
    Column("reason", String(64), nullable=False),  # queue_full, locked, export_failed, ...
    Column("spans", Integer, nullable=False),
)

SINK = "sqlite"
_LOG_EVERY_S = 10.0  # at most one drop warning per this many seconds (plus the first)


class SchemaVersionError(RuntimeError):
    """The database was written by a newer hybrid-pd whose schema we do not understand."""


def _writer_tag() -> str:
    try:
        return f"hybrid-pd {version('hybrid-pd')}"
    except PackageNotFoundError:  # running from a source tree without install
        return "hybrid-pd (source)"


def _reason(exc: BaseException) -> str:
    """A low-cardinality label for the drop counter."""
    return "schema" if isinstance(exc, SchemaVersionError) else store.reason(exc)


def _as_int(v: Any) -> int | None:
    # bool is an int subclass but a True "layer" is a bug upstream, not layer 1.
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _as_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _json_safe(v: Any) -> Any:
    # Strict JSON has no NaN/Infinity; SQLite's json_extract() rejects them.  Store them as
    # the strings "nan"/"inf"/"-inf" so plain-SQL users can still parse every row.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [_json_safe(x) for x in v]
    return v


def attributes_json(attrs: Mapping[str, Any] | None) -> str:
    """All attributes as strict JSON text (the ``attributes`` column)."""
    if not attrs:
        return "{}"
    d = dict(attrs)
    try:
        return json.dumps(d, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError):
        return json.dumps(
            {k: _json_safe(v) for k, v in d.items()}, separators=(",", ":"), default=str
        )


# (service, role, engine_id, pid, host): one ``processes`` row.
ProcessKey = tuple[str | None, str | None, str | None, int | None, str | None]


def _host(resource: Resource | None) -> str | None:
    return _as_str(resource.attributes.get(A.RESOURCE_HOST_NAME)) if resource is not None else None


def process_keys(spans: Sequence[ReadableSpan], rows: Sequence[Mapping[str, Any]]) -> set[ProcessKey]:
    """The ``processes`` identities of a batch (``rows`` = ``span_to_row`` of ``spans``)."""
    return {(r["service"], r["role"], r["engine_id"], r["pid"], _host(s.resource))
            for s, r in zip(spans, rows, strict=True)}


def span_to_row(span: ReadableSpan) -> dict[str, Any]:
    """One ``spans`` row from a finished span (pure; tests call it directly)."""
    ctx = span.get_span_context()
    attrs = span.attributes or {}
    res = span.resource.attributes if span.resource is not None else {}
    start = span.start_time or 0
    end = span.end_time or start
    events = None
    if span.events:
        events = json.dumps(
            [
                {"name": e.name, "time_ns": e.timestamp, "attributes": _json_safe(dict(e.attributes or {}))}
                for e in span.events
            ],
            separators=(",", ":"),
            default=str,
        )
    row: dict[str, Any] = {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": start,
        "end_ns": end,
        "duration_ns": end - start,
        "status": span.status.status_code.name,
        "status_message": span.status.description or None,
        "service": _as_str(res.get(A.RESOURCE_SERVICE_NAME)),
        "pid": _as_int(res.get(A.RESOURCE_PID)),
        "attributes": attributes_json(attrs),
        "events": events,
    }
    for col, key in A.PROMOTED_COLUMNS.items():
        v = attrs.get(key)
        if v is None and key in (A.ROLE, A.ENGINE_ID):
            v = res.get(key)  # role/engine live on the resource unless a span overrides
        row[col] = _as_str(v) if col in ("request_id", "layer_kind", "role", "engine_id") else _as_int(v)
    return row


class SQLiteSpanExporter(SpanExporter):
    """Spans -> table ``spans`` of one (shared) database.  See the module docstring.

    Readable counters: ``exported``, ``dropped``, ``dropped_by_reason``, ``last_error``.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | URL,
        *,
        # Generous: P, D and the proxy share one file, and on a loaded 2-core box a
        # writer holding the lock can be descheduled for seconds (1 s x 3 tries dropped
        # batches in the e2e runs).  The wait is on the export thread, never on serving.
        busy_timeout_ms: int = 5000,
        max_retries: int = 3,
        retry_backoff_s: float = 0.05,
        engine: Engine | None = None,
    ) -> None:
        self.url = to_url(db)
        self.busy_timeout_ms = busy_timeout_ms
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite and self.url.database not in (None, "", ":memory:"):
            # Best effort: a missing run directory should not lose the run's spans.  A
            # failure here surfaces later as an "unwritable" drop, never as an exception.
            try:
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass
        self.engine = engine or store.make_engine(self.url, busy_timeout_ms)
        store.configure(self.engine, busy_timeout_ms)

        self.exported = 0
        self.dropped = 0
        self.dropped_by_reason: dict[str, int] = {}
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._schema_ready = False
        self._shutdown = False
        self._last_log = -math.inf
        self._origin: dict[str, Any] = {}
        # processes identities: written (committed) and waiting for the next transaction.
        self._processes_written: set[ProcessKey] = set()
        self._processes_pending: set[ProcessKey] = set()
        # Drops not yet in telemetry_drops: (sink, reason) -> [spans, first_ns, last_ns].
        self._unsaved: dict[tuple[str, str], list[int]] = {}
        try:
            self.ensure_schema()
        except SchemaVersionError:
            self.engine.dispose()
            raise  # a configuration error: refuse loudly at start, not per batch
        except Exception as exc:  # locked/unwritable now: retried at the next export
            self.last_error = store.short(exc)
            logger.warning(
                "telemetry database %s not ready (%s); spans will be dropped and counted "
                "until it is", self.url.render_as_string(hide_password=True), self.last_error,
            )

    def ensure_schema(self) -> None:
        """Create tables/indexes if missing and check the schema version (idempotent)."""
        if self._schema_ready:
            return
        for attempt in range(self.max_retries + 1):
            try:
                with self.engine.begin() as conn:
                    store.lock_schema(conn)
                    for table in metadata_obj.sorted_tables:
                        conn.execute(CreateTable(table, if_not_exists=True))
                        for index in sorted(table.indexes, key=lambda i: str(i.name)):
                            conn.execute(CreateIndex(index, if_not_exists=True))
                    current = conn.execute(
                        select(func.max(schema_version_table.c.version))
                    ).scalar()
                    if current is not None and current > SCHEMA_VERSION:
                        raise SchemaVersionError(
                            f"telemetry database {self.url.render_as_string(hide_password=True)} "
                            f"has schema version {current}, newer than this hybrid-pd's "
                            f"version {SCHEMA_VERSION}; upgrade hybrid-pd or use another "
                            f"--telemetry-db"
                        )
                    if current is None or current < SCHEMA_VERSION:
                        # (Version 1 is the first; later versions add their migration here.)
                        conn.execute(
                            insert(schema_version_table),
                            [{"version": SCHEMA_VERSION, "applied_ns": time.time_ns(),
                              "writer": _writer_tag()}],
                        )
                self._schema_ready = True
                return
            except IntegrityError:
                continue  # another process inserted the version row first: re-read it
            except OperationalError as exc:
                if attempt < self.max_retries and store.is_locked(exc):
                    self._backoff(attempt)
                    continue
                raise
        # Only reachable after repeated IntegrityError: someone keeps racing us; re-check.
        with self.engine.connect() as conn:
            current = conn.execute(select(func.max(schema_version_table.c.version))).scalar()
        if current is None or current > SCHEMA_VERSION:
            raise SchemaVersionError(f"unexpected schema version {current!r} after retries")
        self._schema_ready = True

    def _backoff(self, attempt: int) -> None:
        # Jitter so that processes that collided do not collide again in lockstep.
        time.sleep(self.retry_backoff_s * (2**attempt) * (0.5 + random.random()))

    # ------------------------------------------------------------------ drop records

    def set_origin(self, resource: Resource | None) -> None:
        """Who the drop rows are from (service, role, engine, pid of the provider)."""
        res = resource.attributes if resource is not None else {}
        self._origin = {
            "service": _as_str(res.get(A.RESOURCE_SERVICE_NAME)),
            "role": _as_str(res.get(A.RESOURCE_ROLE)),
            "engine_id": _as_str(res.get(A.RESOURCE_ENGINE_ID)),
            "pid": _as_int(res.get(A.RESOURCE_PID)),
        }
        o = self._origin
        self._want_processes({(o["service"], o["role"], o["engine_id"], o["pid"], _host(resource))})

    def _want_processes(self, keys: set[ProcessKey]) -> None:
        with self._lock:
            self._processes_pending |= keys - self._processes_written

    def _take_process_rows(self) -> tuple[set[ProcessKey], list[dict[str, Any]]]:
        with self._lock:
            keys, self._processes_pending = self._processes_pending, set()
        now = time.time_ns()
        return keys, [{"service": k[0], "role": k[1], "engine_id": k[2], "pid": k[3], "host": k[4],
                       "first_seen_ns": now} for k in sorted(keys, key=str)]

    def _processes_done(self, keys: set[ProcessKey], committed: bool) -> None:
        with self._lock:
            if committed:
                self._processes_written |= keys
            else:  # written with the next transaction
                self._processes_pending |= keys - self._processes_written

    def note_drop(self, sink: str, reason: str, n: int) -> None:
        """Remember ``n`` spans dropped by ``sink`` now; written with the next batch."""
        if n <= 0:
            return
        now = time.time_ns()
        with self._lock:
            cur = self._unsaved.setdefault((sink, reason), [0, now, now])
            cur[0] += n
            cur[2] = now

    def _take_drop_rows(self) -> list[dict[str, Any]]:
        with self._lock:
            taken, self._unsaved = self._unsaved, {}
        now = time.time_ns()
        return [{"recorded_ns": now, "first_ns": first, "last_ns": last, **self._origin,
                 "sink": sink, "reason": reason, "spans": n}
                for (sink, reason), (n, first, last) in taken.items()]

    def _give_back(self, rows: list[dict[str, Any]]) -> None:
        """Drop rows whose transaction failed go back to be written next time."""
        for r in rows:
            key = (r["sink"], r["reason"])
            with self._lock:
                cur = self._unsaved.setdefault(key, [0, r["first_ns"], r["last_ns"]])
                cur[0] += r["spans"]
                cur[1] = min(cur[1], r["first_ns"])
                cur[2] = max(cur[2], r["last_ns"])

    def write_drops(self) -> bool:
        """Write the drops (and ``processes`` rows) not yet recorded, one attempt (bounded
        by the busy timeout)."""
        rows = self._take_drop_rows()
        keys, process_rows = self._take_process_rows()
        if not rows and not keys:
            return True
        try:
            self.ensure_schema()
            with self.engine.begin() as conn:  # table order: see export()
                store.insert_ignoring_duplicates(conn, processes_table, process_rows)
                if rows:
                    conn.execute(insert(drops_table), rows)
            self._processes_done(keys, True)
            return True
        except Exception as exc:  # the counters still have them; never raise here
            self._give_back(rows)
            self._processes_done(keys, False)
            logger.warning("telemetry: could not record %d drop rows: %s", len(rows), store.short(exc))
            return False

    # ------------------------------------------------------------------------- exporting

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        if n == 0:
            return SpanExportResult.SUCCESS
        if not self._origin:
            self.set_origin(spans[0].resource)
        if self._shutdown:
            self._drop(n, "shutdown", "exporter already shut down")
            return SpanExportResult.FAILURE
        try:
            rows = [span_to_row(s) for s in spans]
            self._want_processes(process_keys(spans, rows))
        except Exception as exc:  # a malformed span must not kill the worker thread
            self._drop(n, "error", f"row conversion failed: {type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            drop_rows = self._take_drop_rows()
            keys, process_rows = self._take_process_rows()
            try:
                self.ensure_schema()
                with self.engine.begin() as conn:
                    # Tables in ensure_schema's order (metadata's sorted_tables): its
                    # CREATE INDEX IF NOT EXISTS takes a share lock on each table in
                    # turn on PostgreSQL, and writing them in another order deadlocked.
                    store.insert_ignoring_duplicates(conn, processes_table, process_rows)
                    conn.execute(insert(spans_table), rows)
                    if drop_rows:
                        conn.execute(insert(drops_table), drop_rows)
                drop_rows = []
                self._processes_done(keys, True)
                keys = set()
                with self._lock:
                    self.exported += n
                counters.record_exported(SINK, n)
                return SpanExportResult.SUCCESS
            except SchemaVersionError as exc:
                last = exc
                break
            except DBAPIError as exc:
                last = exc
                if attempt < self.max_retries and store.is_locked(exc):
                    self._backoff(attempt)
                    continue
                break
            except Exception as exc:  # never let telemetry raise into the SDK's thread
                last = exc
                break
            finally:
                self._give_back(drop_rows)  # empty after a commit
                self._processes_done(keys, False)
        assert last is not None
        self._drop(n, _reason(last), store.short(last))
        return SpanExportResult.FAILURE

    def _drop(self, n: int, reason: str, detail: str) -> None:
        with self._lock:
            self.dropped += n
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n
            self.last_error = detail
            total = self.dropped
            now = time.monotonic()
            should_log = now - self._last_log >= _LOG_EVERY_S
            if should_log:
                self._last_log = now
        counters.record_dropped(SINK, reason, n)
        self.note_drop(SINK, reason, n)
        if should_log:
            logger.warning(
                "telemetry: dropped %d spans (%s: %s); %d dropped so far by %s",
                n, reason, detail, total, self.url.render_as_string(hide_password=True),
            )

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing buffered here; the BatchSpanProcessor owns the queue

    def shutdown(self) -> None:
        if not self._shutdown:
            self._shutdown = True
            self.write_drops()  # last chance for drops counted since the last batch
        self.engine.dispose()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "exported": self.exported,
                "dropped": self.dropped,
                "dropped_by_reason": dict(self.dropped_by_reason),
                "last_error": self.last_error,
            }
