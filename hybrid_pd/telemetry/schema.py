"""The telemetry database schema: the ONE ``MetaData`` (STYLE §4), tables and named indexes.

The database is a public interface -- people query it with plain SQL -- so the column
names of ``spans`` are a contract.  The issue's contract columns are::

    trace_id, span_id, parent_span_id, name, start_ns, end_ns, status, service,
    request_id, layer, layer_kind, bytes, descriptors, attributes

``attributes`` is the JSON text of *all* span attributes; the promoted columns
(``attributes.PROMOTED_COLUMNS``) copy a few of them out so the dashboard can filter
and sort on an index.  Ids are lower-case hex as in W3C ``traceparent`` (32 / 16
characters), times are Unix epoch nanoseconds (int64; fits until year 2262).

Versioning: ``schema_version`` holds one row per applied version; a database whose
highest version is newer than :data:`SCHEMA_VERSION` is refused (an old binary must not
write rows a newer reader misinterprets).  Tables and indexes are created with
``IF NOT EXISTS`` because several processes (both engines and the proxy) open the same
file at the same moment.  Schemas that must evolve beyond additive changes should move to
Alembic (the SQLAlchemy docs' advice); version 1 is the first.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 1

metadata_obj = MetaData()

# The contract columns (do not rename; tests pin them).
CONTRACT_COLUMNS: tuple[str, ...] = (
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "start_ns",
    "end_ns",
    "status",
    "service",
    "request_id",
    "layer",
    "layer_kind",
    "bytes",
    "descriptors",
    "attributes",
)

spans_table = Table(
    "spans",
    metadata_obj,
    # Surrogate key: SQLite rowid alias, cheap appends.  (trace_id, span_id) is not made
    # UNIQUE on purpose: one bad duplicate must not make a whole batch fail.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trace_id", String(32), nullable=False),
    Column("span_id", String(16), nullable=False),
    Column("parent_span_id", String(16), nullable=True),
    Column("name", Text, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("start_ns", BigInteger, nullable=False),
    Column("end_ns", BigInteger, nullable=False),
    Column("duration_ns", BigInteger, nullable=False),
    Column("status", String(8), nullable=False),  # UNSET | OK | ERROR
    Column("status_message", Text, nullable=True),
    Column("service", Text, nullable=True),  # resource service.name
    Column("role", Text, nullable=True),  # span attr hybrid_pd.role, else resource's
    Column("engine_id", Text, nullable=True),  # same precedence as role
    Column("pid", Integer, nullable=True),  # resource process.pid
    Column("request_id", Text, nullable=True),
    Column("layer", Integer, nullable=True),
    Column("layer_kind", Text, nullable=True),
    Column("bytes", BigInteger, nullable=True),
    Column("descriptors", Integer, nullable=True),
    Column("rank", Integer, nullable=True),
    Column("peer_rank", Integer, nullable=True),
    Column("attributes", Text, nullable=False),  # JSON object of all span attributes
    Column("events", Text, nullable=True),  # JSON list (exceptions); NULL when none
)

# Named indexes, one per dashboard query shape:
#   a request's timeline         WHERE request_id = ? ORDER BY start_ns
#   the recent window            WHERE start_ns >= ?
#   one span kind over time      WHERE name = ? AND start_ns >= ?
#   one trace (Jaeger-like view) WHERE trace_id = ?
Index("ix_spans_request_id_start_ns", spans_table.c.request_id, spans_table.c.start_ns)
Index("ix_spans_start_ns", spans_table.c.start_ns)
Index("ix_spans_name_start_ns", spans_table.c.name, spans_table.c.start_ns)
Index("ix_spans_trace_id", spans_table.c.trace_id)

schema_version_table = Table(
    "schema_version",
    metadata_obj,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_ns", BigInteger, nullable=False),
    Column("writer", Text, nullable=False),  # "hybrid-pd <package version>"
)
