"""The span database's two backends: what differs between SQLite and PostgreSQL.

SQLite is the embedded default (a plain path, or ``sqlite:///PATH``); PostgreSQL is the
central store for several hosts (``postgresql+psycopg://user@dbhost/hybrid_pd``, driver
psycopg 3, which ``scripts/setup.sh`` installs with the dashboard and test extras).  The
tables, inserts and dashboard queries are the same SQLAlchemy Core on both; only this
differs:

* Connection set-up on *our* engine.  SQLite: WAL, ``busy_timeout`` and
  ``synchronous=NORMAL``.  PostgreSQL: ``lock_timeout`` = the same busy timeout, so a
  writer blocked by a table lock gives up like a SQLite writer does ("locked", retried,
  then counted) instead of holding the export thread forever, and a ping before a pooled
  connection is reused (a restarted server would otherwise fail one batch per stale one).
* Schema creation.  ``CREATE TABLE IF NOT EXISTS`` is not atomic on PostgreSQL: of
  several processes creating the same table at once, all but one fail with a
  UniqueViolation on ``pg_type`` (measured: 3 of 3 rounds of 6 processes on a fresh
  database).  :func:`lock_schema` makes them queue on a transaction-scoped advisory lock
  instead; SQLite's write lock already serialises them.
* "Insert, ignore duplicates" (:func:`insert_ignoring_duplicates`, table ``processes``):
  each dialect's own ``INSERT ... ON CONFLICT DO NOTHING``, which stays correct when
  several writers insert the same row at once (a read-then-insert would race).
* Error labels for the drop counters: SQLite's messages, PostgreSQL's SQLSTATE codes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, func, insert, select
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError

# pg_advisory_xact_lock key of the schema transaction: "hybrid_p" in ASCII, an arbitrary
# constant no other application is likely to lock.  Advisory locks are per database.
SCHEMA_LOCK_KEY = 0x6879627269645F70

# SQLSTATE codes (PostgreSQL appendix A) that mean "someone else holds it, try again":
# deadlock_detected, lock_not_available (lock_timeout), serialization_failure.
_PG_RETRY = ("40P01", "55P03", "40001")
# insufficient_privilege, read_only_sql_transaction; class 08 = connection exceptions.
_PG_UNWRITABLE = ("42501", "25006")
_UNREACHABLE = ("connection refused", "connection failed", "could not connect",
                "server closed the connection", "connection is closed")


def to_url(db: str | os.PathLike[str] | URL) -> URL:
    """A SQLAlchemy URL from a URL string/object or a plain path (meaning a SQLite file)."""
    if isinstance(db, URL):
        return db
    s = os.fspath(db)
    if "://" in s:
        return make_url(s)
    return URL.create("sqlite", database=str(Path(s).expanduser().resolve()))


def make_engine(url: URL, busy_timeout_ms: int) -> Engine:
    """A writer's engine for ``url``; the session settings come from :func:`configure`."""
    if url.get_backend_name() == "sqlite":
        return create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})
    try:
        return create_engine(url, pool_pre_ping=True)
    except ImportError as exc:
        hint = ("; PostgreSQL needs psycopg 3: pip install 'psycopg[binary]' "
                "(bash scripts/setup.sh installs it)"
                if url.get_backend_name() == "postgresql" else "")
        raise ImportError(f"telemetry database {url.render_as_string(hide_password=True)}: "
                          f"driver {url.drivername!r} is not installed ({exc}){hint}") from exc


def configure(engine: Engine, busy_timeout_ms: int) -> None:
    """Hook the writer's session settings (module docstring) on ``engine``'s connections."""
    ms = int(busy_timeout_ms)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda dbapi, _rec: _sqlite_pragmas(dbapi, ms))
    elif engine.dialect.name == "postgresql":
        event.listen(engine, "connect",
                     lambda dbapi, _rec: session_sql(dbapi, f"SET lock_timeout = {ms}"))


def _sqlite_pragmas(dbapi_connection: Any, busy_timeout_ms: int) -> None:
    # busy_timeout first so that switching to WAL (which needs a brief exclusive lock on a
    # fresh file) waits for other processes instead of failing.  NORMAL is durable across
    # application crashes in WAL mode (only an OS crash can lose the last transactions)
    # and avoids an fsync per batch.
    session_sql(dbapi_connection, f"PRAGMA busy_timeout={busy_timeout_ms}",
                "PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL")


def session_sql(dbapi_connection: Any, *statements: str) -> None:
    """Run session settings on a new DBAPI connection, outside any transaction.

    In autocommit, as SQLAlchemy's documentation does for connect-time settings: a
    PostgreSQL ``SET`` issued inside the driver's implicit transaction would be undone
    by the pool's rollback when the connection is first returned.
    """
    autocommit = getattr(dbapi_connection, "autocommit", None)
    if autocommit is False:
        dbapi_connection.autocommit = True
    cur = dbapi_connection.cursor()
    try:
        for statement in statements:
            cur.execute(statement)
    finally:
        cur.close()
        if autocommit is False:
            dbapi_connection.autocommit = False


def lock_schema(conn: Connection) -> None:
    """Serialise schema creation across processes (PostgreSQL; module docstring).

    Held until the transaction ends; bounded by ``lock_timeout`` like any other wait.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))


def insert_ignoring_duplicates(conn: Connection, table: Table,
                               rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows``, skipping those that violate a unique index of ``table``."""
    if not rows:
        return
    name = conn.dialect.name
    if name == "postgresql":
        stmt: Any = pg_dialect.insert(table).on_conflict_do_nothing()
    elif name == "sqlite":
        stmt = sqlite_dialect.insert(table).on_conflict_do_nothing()
    else:  # no portable form: one savepoint per row, a duplicate rolls back only itself
        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(insert(table), [row])
            except IntegrityError:
                pass
        return
    conn.execute(stmt, list(rows))


def _sqlstate(exc: BaseException) -> str:
    orig = getattr(exc, "orig", exc)
    # psycopg 3 names it ``sqlstate``, psycopg2 ``pgcode``.
    return str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "orig", exc)).lower()


def is_locked(exc: BaseException) -> bool:
    """Somebody else holds the lock: worth a retry after a back-off."""
    # sqlite3 says "database is locked" (SQLITE_BUSY) or "database table is locked".
    msg = _message(exc)
    return "locked" in msg or "busy" in msg or _sqlstate(exc) in _PG_RETRY


def short(exc: BaseException) -> str:
    """``OperationalError: database is locked`` rather than SQLAlchemy's multi-line text."""
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {str(orig or exc).strip()}"


def reason(exc: BaseException) -> str:
    """A low-cardinality label for the drop counter (``schema`` is the caller's)."""
    msg, state = _message(exc), _sqlstate(exc)
    if is_locked(exc):
        return "locked"
    if "full" in msg or state == "53100":  # disk_full
        return "full"
    if ("unable to open" in msg or "readonly" in msg or "read-only" in msg
            or "permission" in msg or state in _PG_UNWRITABLE or state.startswith("08")
            or any(s in msg for s in _UNREACHABLE)):
        return "unwritable"
    return "error"
