"""The telemetry database schema: the ONE ``MetaData``, tables and named indexes.

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

Indexes are not versioned.  Adding one changes no row and no column: an older writer
keeps inserting (SQLite maintains every index on the file, whoever inserts), an older
reader ignores it.  So a new index does not bump :data:`SCHEMA_VERSION` -- a bump would
make every older binary refuse the file for nothing.  A database made before an index
existed gets it the next time any writer opens it (the exporter's ``ensure_schema`` runs
``CREATE INDEX IF NOT EXISTS`` for every index here; on a 10^6-span file that takes a
few seconds, once); until then the read-only dashboard works without it, slower, and
names the missing indexes (:data:`DASHBOARD_INDEXES`).

Tables are additive in the same way: ``processes`` (who wrote the spans: service, role,
engine id, pid, host) came after version 1 and did not bump it; a reader treats a file
without it as one whose hosts are unknown.
"""

from __future__ import annotations

from typing import Any

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
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import functions as sql_functions
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import literal_column
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import NullType

from hybrid_pd.telemetry import attributes as A

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
    # Surrogate key: SQLite rowid alias (INTEGER PRIMARY KEY is 64-bit there), cheap
    # appends; BIGSERIAL on PostgreSQL, whose SERIAL would stop at 2^31 spans in a central
    # store.  (trace_id, span_id) is not made UNIQUE on purpose: one bad duplicate must
    # not make a whole batch fail.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
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


class span_attr(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """One attribute of the JSON ``attributes`` column, as a SQL expression.

    SQLite: ``json_extract(attributes, '$."KEY"')``; PostgreSQL: ``(CAST(attributes AS
    JSONB) ->> 'KEY')``, the text form, which comparisons, GROUP BY and the expression
    index use.  The key is rendered as a literal, never a bound parameter, so a query's
    expression is the very expression an index was built on (SQLite matches expression
    indexes textually).  ``numeric=True`` yields NULL for anything but a JSON number (the
    exporter stores NaN/inf as strings), so ``ORDER BY`` and medians stay numeric.
    ``value=True`` is for loading: the value in its JSON type, as SQLite's json_extract
    gives it (numbers stay numbers); on PostgreSQL ``(... -> 'KEY')``, a JSONB the
    driver decodes (JSON true is True there, 1 in SQLite).
    """

    inherit_cache = True
    type = NullType()

    def __init__(self, key: str, numeric: bool = False, value: bool = False) -> None:
        if "'" in key or '"' in key:
            raise ValueError(f"attribute key {key!r} must not contain quotes")
        if numeric and value:
            raise ValueError("span_attr: numeric and value are exclusive")
        self.attr_key = key
        self.mode = "number" if numeric else "value" if value else "text"
        # The key and the mode as literal clauses: part of the statement's cache key.
        super().__init__(spans_table.c.attributes, literal_column(f"'{key}'"),
                         literal_column(f"'{self.mode}'"))


@compiles(span_attr)
def _span_attr_sqlite(element: span_attr, compiler: SQLCompiler, **kw: Any) -> str:
    col = compiler.process(next(iter(element.clauses)), **kw)
    path = f"""'$."{element.attr_key}"'"""
    value = f"json_extract({col}, {path})"
    if element.mode == "number":
        return f"CASE WHEN json_type({col}, {path}) IN ('integer', 'real') THEN {value} END"
    return value


@compiles(span_attr, "postgresql")
def _span_attr_pg(element: span_attr, compiler: SQLCompiler, **kw: Any) -> str:
    col = f"CAST({compiler.process(next(iter(element.clauses)), **kw)} AS JSONB)"
    if element.mode == "number":
        return (f"(CASE WHEN jsonb_typeof({col} -> '{element.attr_key}') = 'number' "
                f"THEN CAST({col} ->> '{element.attr_key}' AS DOUBLE PRECISION) END)")
    if element.mode == "value":
        return f"({col} -> '{element.attr_key}')"
    return f"({col} ->> '{element.attr_key}')"


CONNECTOR_EXPR = span_attr(A.CONNECTOR)

# Indexes for the dashboard's whole-database pages (10^6 spans, range "all"):
#   transfer aggregates, request list  WHERE name = 'kv.transfer' [AND start_ns ...]
#       -> partial covering index: only transfer spans (~2 % of rows), every column
#          the aggregates read (name included, or SQLite would not count it as
#          covering and would prefer a name index), so no table row is visited;
#   failures                           WHERE status = 'ERROR' [AND start_ns ...]
#       -> partial index holding only the failed spans (one in ~200);
#   ours vs upstream                   WHERE name = ? AND <connector> = ? ORDER BY start_ns
#       -> expression index on the connector attribute (it lives in the JSON only).
#          SQLite 3.40 never counts an expression index as covering, so more columns
#          would not spare the row look-ups; queries.connector_reads keeps them few.
#          json_extract is built into SQLite since 3.38 (and in Python's builds before);
#          a writer whose SQLite lacks it could not insert into a file with this index.
# The partial indexes are used when the query states the same predicate; the dashboard
# writes those constants as literals (queries.py).
Index("ix_spans_transfer_cover", spans_table.c.name, spans_table.c.start_ns,
      spans_table.c.duration_ns,
      spans_table.c.status, spans_table.c.bytes, spans_table.c.engine_id, spans_table.c.rank,
      spans_table.c.request_id,
      sqlite_where=spans_table.c.name == A.SPAN_KV_TRANSFER,
      postgresql_where=spans_table.c.name == A.SPAN_KV_TRANSFER)
Index("ix_spans_error_start_ns", spans_table.c.start_ns,
      sqlite_where=spans_table.c.status == "ERROR",
      postgresql_where=spans_table.c.status == "ERROR")
Index("ix_spans_name_connector_start_ns", spans_table.c.name, CONNECTOR_EXPR,
      spans_table.c.start_ns)

# What the dashboard reports as missing on a database made before these existed.
DASHBOARD_INDEXES: tuple[str, ...] = (
    "ix_spans_transfer_cover", "ix_spans_error_start_ns", "ix_spans_name_connector_start_ns",
)

# One row per writing process and engine id its spans name; spans carry role, engine id
# and pid but not the host, so the dashboard finds an engine's host here.  A vLLM worker
# has two rows: its resource's engine id (``<engine>-rank<r>``) and the engine id its
# spans carry.  Written with "insert, ignore duplicates" by every writer, so restarts and
# several processes at once leave one row per identity (the first one seen).
processes_table = Table(
    "processes",
    metadata_obj,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("service", Text, nullable=True),  # resource service.name
    Column("role", Text, nullable=True),  # as in spans.role
    Column("engine_id", Text, nullable=True),  # as in spans.engine_id
    Column("pid", Integer, nullable=True),  # resource process.pid
    Column("host", Text, nullable=True),  # resource host.name
    Column("first_seen_ns", BigInteger, nullable=False),  # when a writer first recorded it
)


def _key(col: Column[Any], missing: str) -> Any:
    # NULLs never collide in a UNIQUE index (SQLite, PostgreSQL < 15): COALESCE makes an
    # unknown host (or pid, ...) one value, so its row is not inserted again per batch.
    return sql_functions.coalesce(col, literal_column(missing))


Index("ux_processes_identity",
      *(_key(processes_table.c[c], "''") for c in ("service", "role", "engine_id", "host")),
      _key(processes_table.c.pid, "-1"), unique=True)
Index("ix_processes_engine_id", processes_table.c.engine_id)

schema_version_table = Table(
    "schema_version",
    metadata_obj,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_ns", BigInteger, nullable=False),
    Column("writer", Text, nullable=False),  # "hybrid-pd <package version>"
)
