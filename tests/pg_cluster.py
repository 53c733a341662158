"""A throwaway PostgreSQL cluster for the tests (importable as ``pg_cluster``).

``initdb`` into a temporary directory, ``pg_ctl start`` on 127.0.0.1 only (and a unix
socket in that directory), databases made on demand, ``pg_ctl stop -m fast`` and the
directory removed at the end.  The server binaries come from Debian's ``postgresql``
package (``scripts/setup.sh`` installs it as root); the driver is psycopg 3 (the
dashboard and test extras).

PostgreSQL refuses to run as root, and the tests often do: then every server command
runs as an unprivileged system user (``postgres``, which the Debian package creates, else
``nobody``) and the temporary directory is made its own.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from helpers import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "hybrid_pd"
FIX = "run `bash scripts/setup.sh` (it installs psycopg, and as root Debian's postgresql package)"


def _version_key(bin_dir: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,): the newest installed major version wins.
    return tuple(int(x) for x in re.findall(r"\d+", Path(bin_dir).parent.name))


def find_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None.

    PATH first (resolving Debian's /usr/local or wrapper links to the real directory,
    where pg_ctl also finds ``postgres``), then ``/usr/lib/postgresql/*/bin``, newest first.
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    candidates += [Path(d) for d in sorted(glob.glob(PG_BIN_GLOB), key=_version_key, reverse=True)]
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in SERVER_TOOLS):
            return d
    return None


def missing_requirements() -> str | None:
    """Why no cluster can be made here (a sentence naming the missing piece), or None."""
    missing = []
    if find_bin_dir() is None:
        missing.append(f"PostgreSQL server binaries ({', '.join(SERVER_TOOLS)}; looked on PATH "
                       f"and in {PG_BIN_GLOB})")
    if importlib.util.find_spec("psycopg") is None:
        missing.append("the psycopg driver (pip package 'psycopg[binary]')")
    if os.geteuid() == 0 and _server_user() is None:
        missing.append("an unprivileged user to run the server as ('postgres' or 'nobody')")
    if not missing:
        return None
    return f"PostgreSQL tests need {' and '.join(missing)}: {FIX}"


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


class PgCluster:
    """One running throwaway cluster; :meth:`create_database` hands out SQLAlchemy URLs."""

    def __init__(self) -> None:
        bin_dir, user = find_bin_dir(), _server_user()
        if bin_dir is None or user is None:
            raise RuntimeError(missing_requirements() or "PostgreSQL not usable here")
        self.bin_dir, self.user = bin_dir, user
        # Not pytest's tmp_path: its parents are root-only (0700), so the server user
        # could not reach a directory below them.
        self.root = Path(tempfile.mkdtemp(prefix="hybrid-pd-pg-"))
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = 0
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                  # C locale: text compares bytewise, as in SQLite, so ORDER BY on text
                  # gives the same order on both stores.  --no-sync: a throwaway cluster.
                  "--locale=C", "--encoding=UTF8", "--no-sync")
        self._start()

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        as_user = {} if os.geteuid() != 0 else {"user": self.user.pw_uid, "group": self.user.pw_gid,
                                                "extra_groups": []}
        proc = subprocess.run([str(self.bin_dir / tool), *args], cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, check=False, **as_user)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}{log}")
        return proc.stdout

    def _start(self) -> None:
        for attempt in range(3):  # a picked port can be taken before the server binds it
            self.port = free_port()
            # fsync and full-page writes off: nothing here needs to survive a power cut, and
            # the tests then measure PostgreSQL's locking, not this disk.
            opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                    f"-c unix_socket_directories={self.root} -c fsync=off "
                    "-c full_page_writes=off -c synchronous_commit=off")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                          "-w", "-t", "60", "start")
                return
            except RuntimeError:
                if attempt == 2 or "could not bind" not in self.log.read_text(errors="replace"):
                    raise

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database ``name`` (lower-case identifier); returns its URL."""
        from sqlalchemy import create_engine

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r} is not a plain identifier")
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def race_schema(url: str, barrier: Any, out: Any) -> None:
    """A spawned process opening ``url`` at the same moment as the others, then writing
    5 spans (tests/test_postgres_store.py).  Here, not in the test module, because a
    spawned child imports the module of its function: this one is light.

    Every database error SQLAlchemy sees is recorded, the ones ``ensure_schema`` would
    retry included; ``max_retries=0`` so that a lost race would also show as a failure.
    """
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from sqlalchemy import create_engine, event

    from hybrid_pd.telemetry.sqlite_exporter import SQLiteSpanExporter

    engine = create_engine(url)
    errors: list[str] = []
    event.listen(engine, "handle_error", lambda ctx: errors.append(
        f"{type(ctx.original_exception).__name__}: {str(ctx.original_exception).splitlines()[0]}"))
    barrier.wait(timeout=120)
    exporter = SQLiteSpanExporter(url, engine=engine, max_retries=0)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for _ in range(5):
        with provider.get_tracer("race").start_as_current_span("hybrid_pd.kv.read"):
            pass
    out.put({"ready": exporter._schema_ready, "errors": errors, "exported": exporter.exported,
             "last_error": exporter.last_error})
    provider.shutdown()
