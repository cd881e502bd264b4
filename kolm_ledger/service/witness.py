"""The C2SP tlog-witness HTTP process (https://c2sp.org/tlog-witness): it remembers,
per log origin, the newest checkpoint it cosigned, and cosigns a new one only when the log's
signature and the consistency proof from that size verify. The request and cosignature
formats are in :mod:`kolm_ledger.formats.witness`; the log's side of the protocol is
:mod:`kolm_ledger.log.witnessing`.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kolm_ledger.errors import (
    CheckpointError,
    ConsistencyProofError,
    FormatError,
    KeyFormatError,
    KolmError,
    SignatureError,
)
from kolm_ledger.formats import merkle
from kolm_ledger.formats.checkpoint import Checkpoint
from kolm_ledger.formats.note import (
    Note,
    NoteVerifier,
    strict_b64decode,
)
from kolm_ledger.formats.witness import (
    MAX_BODY,
    MAX_PROOF_LINES,
    SIZE_CONTENT_TYPE,
    Cosigner,
)

__all__ = [
    "Witness",
    "start_witness",
]


class _Reject(Exception):
    def __init__(self, status: int, message: str, content_type: str = "text/plain") -> None:
        super().__init__(message)
        self.status = status
        self.content_type = content_type


def _parse_request(body: bytes) -> tuple[int, list[bytes], bytes]:
    if len(body) > MAX_BODY:
        raise _Reject(400, f"request is {len(body)} bytes, over {MAX_BODY}")
    head, sep, note = body.partition(b"\n\n")
    if not sep:
        raise _Reject(400, "request has no empty line before the checkpoint")
    lines = head.split(b"\n")
    first = lines[0].decode("ascii", "replace")
    word, _, num = first.partition(" ")
    if word != "old" or not num.isdigit() or (num != "0" and num.startswith("0")):
        raise _Reject(400, f"first line {first[:40]!r} is not 'old <size>'")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise _Reject(400, f"{len(lines) - 1} consistency proof lines, at most {MAX_PROOF_LINES}")
    try:
        proof = [strict_b64decode(ln.decode("ascii"), "proof line") for ln in lines[1:]]
    except (FormatError, UnicodeDecodeError) as e:
        raise _Reject(400, f"consistency proof: {e}") from e
    if any(len(h) != 32 for h in proof):
        raise _Reject(400, "consistency proof hashes must be 32 bytes")
    return int(num), proof, note


class Witness:
    """The witness state machine (transport-free): verify, check consistency, persist, cosign."""

    def __init__(
        self,
        cosigner: Cosigner,
        state_path: str | os.PathLike[str],
        log_keys: Sequence[NoteVerifier],
    ) -> None:
        if not log_keys:
            raise KeyFormatError("a witness needs at least one log verifier key")
        self.cosigner = cosigner
        self.state_path = Path(state_path)
        self.log_keys = list(log_keys)
        self._lock = threading.Lock()
        self.state: dict[str, dict[str, object]] = {}
        if self.state_path.exists():
            try:
                self.state = json.loads(self.state_path.read_text())
            except ValueError as e:
                raise FormatError(f"witness state {self.state_path} is not JSON: {e}") from e

    def latest(self, origin: str) -> tuple[int, bytes]:
        """(size, root) of the newest cosigned checkpoint of ``origin`` (0, empty root)."""
        s = self.state.get(origin)
        if s is None:
            return 0, merkle.empty_root()
        return int(str(s["size"])), base64.b64decode(str(s["root"]))

    def _persist(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        data = json.dumps(self.state, sort_keys=True, indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)
        dfd = os.open(self.state_path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def add_checkpoint(self, body: bytes) -> tuple[int, str, bytes]:
        """Handle one ``add-checkpoint`` request body: (HTTP status, content type, body)."""
        try:
            return 200, "text/plain; charset=utf-8", self._add(body)
        except _Reject as e:
            return e.status, e.content_type, (str(e) + "\n").encode()

    def _add(self, body: bytes) -> bytes:
        old, proof, raw = _parse_request(body)
        try:
            note = Note.from_bytes(raw)
            cp = Checkpoint.from_text(note.text)
        except FormatError as e:
            raise _Reject(400, f"checkpoint: {e}") from e
        keys = [k for k in self.log_keys if k.name == cp.origin]
        if not keys:
            raise _Reject(404, f"unknown log origin {cp.origin[:80]!r}")
        try:
            note.verify(keys)
        except (CheckpointError, SignatureError) as e:
            raise _Reject(403, f"checkpoint signature: {e}") from e
        if old > cp.size:
            raise _Reject(400, f"old size {old} is larger than the checkpoint size {cp.size}")
        with self._lock:
            size, root = self.latest(cp.origin)
            if old != size:
                raise _Reject(409, str(size), SIZE_CONTENT_TYPE)
            if old == cp.size:
                if root != cp.root and not (old == 0 and cp.root == merkle.empty_root()):
                    raise _Reject(409, str(size), SIZE_CONTENT_TYPE)
                if proof:
                    raise _Reject(422, "consistency proof between equal sizes must be empty")
            elif old == 0:
                if proof:
                    raise _Reject(422, "consistency proof from size 0 must be empty")
            else:
                try:
                    merkle.verify_consistency(old, cp.size, proof, root, cp.root)
                except (ConsistencyProofError, FormatError, KolmError) as e:
                    raise _Reject(422, f"consistency proof does not verify: {e}") from e
            self.state[cp.origin] = {
                "size": cp.size,
                "root": base64.b64encode(cp.root).decode(),
                "checkpoint": note.to_bytes().decode(),
            }
            self._persist()  # before answering
            sig = self.cosigner.cosign(note.text)
        return sig.to_line().encode()


class _Handler(BaseHTTPRequestHandler):
    witness: Witness
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        if urllib.parse.urlparse(self.path).path.rstrip("/").endswith("/add-checkpoint") is False:
            self._send(404, "text/plain", b"not found\n")
            return
        try:
            n = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            self._send(400, "text/plain", b"missing or too large Content-Length\n")
            return
        status, ct, body = self.witness.add_checkpoint(self.rfile.read(n))
        self._send(status, ct, body)

    def _send(self, status: int, ct: str, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ct)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # the log went away mid-request (killed, timed out). Our state is persisted
            # already; the log re-offers its newest checkpoint and gets the cosignature again
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # quiet by default
        pass


def start_witness(witness: Witness, listen: str = "127.0.0.1:0") -> ThreadingHTTPServer:
    """Serve ``witness`` over HTTP in a daemon thread; ``server_address`` has the port."""
    host, _, port = listen.rpartition(":")
    handler = type("WitnessHandler", (_Handler,), {"witness": witness})
    srv = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), handler)
    threading.Thread(target=srv.serve_forever, name="kolm-witness", daemon=True).start()
    return srv
