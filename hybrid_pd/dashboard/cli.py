"""``hybrid-pd dashboard``: start the Streamlit app on loopback, headless, read-only.

    hybrid-pd dashboard --db runs/spans.db [--port 8501]

The database travels to the app in ``$HYBRID_PD_TELEMETRY_DB`` (the app's only input);
the app opens it read-only (``queries.open_engine``), so this command never writes.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from hybrid_pd.dashboard.queries import is_sqlite_target
from hybrid_pd.settings import ENV_TELEMETRY_DB

APP = Path(__file__).with_name("app.py")
HOST = "127.0.0.1"  # loopback only: spans name engines and hosts, not for the open network
TOOLBAR_MODE = "viewer"  # app.py sets it too, for `streamlit run app.py` started by hand


def free_port(host: str = HOST) -> int:
    """A port free right now (the box is shared with other test runs; never assume 8501)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def streamlit_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", HOST,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        # No file watcher: nothing to reload in production, and it costs a thread per file.
        "--server.fileWatcherType", "none",
        # The viewer's toolbar: no "Deploy", rerun or clear-cache buttons for a reader.
        "--client.toolbarMode", TOOLBAR_MODE,
    ]


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "dashboard",
        help="Streamlit dashboard over a telemetry spans database (read-only, 127.0.0.1)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", default=os.environ.get(ENV_TELEMETRY_DB),
                   help="spans database: a SQLite path or a SQLAlchemy URL "
                   f"(default: ${ENV_TELEMETRY_DB})")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.db:
        db = str(args.db)
        # Resolve relative paths here: streamlit's working directory is ours, but the
        # printed command should make sense to copy into another shell too.
        if is_sqlite_target(db) and "://" not in db:
            db = str(Path(db).expanduser().resolve())
        env[ENV_TELEMETRY_DB] = db
    port = args.port or free_port()
    shown = env.get(ENV_TELEMETRY_DB, "(none; set --db)")
    print(f"[hybrid-pd dashboard] database: {shown}", flush=True)
    print(f"[hybrid-pd dashboard] open http://{HOST}:{port}/", flush=True)
    try:
        return subprocess.call(streamlit_command(port), env=env)
    except KeyboardInterrupt:
        return 130
