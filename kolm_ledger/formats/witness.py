"""A C2SP transparency-log witness (https://c2sp.org/tlog-witness) and its client.

A witness is an independent process that remembers, per log origin, the newest
checkpoint it cosigned. The log (the ledger) POSTs each new checkpoint to
``/add-checkpoint`` with a consistency proof from that size::

    old <size>\\n
    <base64 consistency proof hash>\\n      (zero or more, at most 63)
    \\n
    <signed checkpoint note>

and the witness answers with cosignature lines, or:

- 400 malformed request or ``old`` > checkpoint size; 404 unknown origin;
- 403 no trusted log signature verifies;
- 409 ``old`` is not the size it last cosigned (body: that size and a newline,
  ``Content-Type: text/x.tlog.size``), or equal sizes with different roots;
- 422 the consistency proof does not verify.

A cosignature (https://c2sp.org/tlog-cosignature, Ed25519) is a signed-note signature
line whose key id is ``SHA-256(name || 0x0A || 0x04 || pubkey)[:4]`` and whose
signature is ``u64 big-endian timestamp || Ed25519 signature`` over::

    cosignature/v1\\n
    time <unix seconds>\\n
    <checkpoint note text>

The witness verifies the log signature and the consistency proof, then persists its
new state atomically (temporary file, fsync, rename, fsync of the directory) before it
answers; one lock makes check-and-persist atomic, so concurrent requests cannot roll
its view back.

Example::

    >>> from kolm_ledger.keys import PrivateKey
    >>> c = Cosigner("witness.example/w1", PrivateKey.generate("ed25519"))
    >>> sig = c.cosign("example.com/log\\n1\\n" + "A" * 43 + "=\\n", 1700000000)
    >>> c.verifier().verify("example.com/log\\n1\\n" + "A" * 43 + "=\\n", sig)
    1700000000
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import struct
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kolm_ledger._crypto import PrivateKey, PublicKey
from kolm_ledger.errors import (
    CheckpointError,
    CheckpointFormatError,
    ConflictError,
    ConsistencyProofError,
    FormatError,
    KeyFormatError,
    KolmError,
    SignatureError,
    UnavailableError,
)
from kolm_ledger.formats import merkle
from kolm_ledger.formats.checkpoint import Checkpoint
from kolm_ledger.formats.note import (
    Note,
    NoteSignature,
    NoteVerifier,
    check_key_name,
    strict_b64decode,
)

__all__ = [
    "ALG_COSIGNATURE_ED25519",
    "MAX_PROOF_LINES",
    "CosignatureVerifier",
    "Cosigner",
    "Witness",
    "WitnessConflict",
    "add_checkpoint",
    "cosignature_key_id",
    "cosigned_message",
    "load_witness_verifiers",
    "start_witness",
    "verify_cosignatures",
]

#: Signature type byte of Ed25519 cosignatures (vkeys and key ids).
ALG_COSIGNATURE_ED25519 = 0x04
#: A request may carry at most this many consistency proof lines.
MAX_PROOF_LINES = 63
_MAX_BODY = 1 << 20
_SIZE_CT = "text/x.tlog.size"


def cosignature_key_id(name: str, public_key: PublicKey) -> bytes:
    """``SHA-256(name || 0x0A || 0x04 || 32-byte Ed25519 public key)[:4]``."""
    if public_key.algorithm != "ed25519":
        raise KeyFormatError(f"cosigner keys must be Ed25519, got {public_key.algorithm}")
    data = name.encode() + b"\n" + bytes([ALG_COSIGNATURE_ED25519]) + public_key.raw()
    return hashlib.sha256(data).digest()[:4]


def cosigned_message(text: str, timestamp: int) -> bytes:
    """The bytes a v1 cosignature signs: header, time line, checkpoint note text."""
    if not 0 <= timestamp < 2**63:
        raise FormatError(f"cosignature timestamp {timestamp} is out of range")
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


@dataclass(frozen=True)
class CosignatureVerifier:
    """A witness public key (Ed25519) under its name."""

    name: str
    key: PublicKey

    def __post_init__(self) -> None:
        check_key_name(self.name, "witness key", KeyFormatError)
        cosignature_key_id(self.name, self.key)  # checks the algorithm

    @property
    def key_id(self) -> bytes:
        """The 4-byte cosignature key id."""
        return cosignature_key_id(self.name, self.key)

    def vkey(self) -> str:
        """``name+hex key id+base64(0x04 || public key)``."""
        blob = base64.b64encode(bytes([ALG_COSIGNATURE_ED25519]) + self.key.raw()).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def from_vkey(cls, vkey: str) -> CosignatureVerifier:
        """Parse a cosigner vkey (signature type 0x04); raises :class:`KeyFormatError`."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise KeyFormatError(f"witness vkey {vkey[:40]!r}: want <name>+<key id>+<key>")
        name, hex_id, blob = parts
        raw = strict_b64decode(blob, f"witness vkey {name[:40]!r}", KeyFormatError)
        if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_ED25519:
            raise KeyFormatError(
                f"witness vkey {name[:40]!r}: want type 0x04 and a 32-byte Ed25519 key"
            )
        v = cls(name, PublicKey.from_ed25519_raw(raw[1:]))
        if v.key_id.hex() != hex_id:
            raise KeyFormatError(
                f"witness vkey {name[:40]!r}: key id {hex_id[:8]} does not match the key "
                f"(computed {v.key_id.hex()})"
            )
        return v

    def matches(self, sig: NoteSignature) -> bool:
        """Whether ``sig`` claims to be by this witness key (name and key id)."""
        return (sig.name, sig.key_id) == (self.name, self.key_id)

    def verify(self, text: str, sig: NoteSignature) -> int:
        """Verify a cosignature over checkpoint ``text``; return its timestamp.

        Raises :class:`SignatureError` naming the witness.
        """
        if not self.matches(sig):
            raise SignatureError(f"cosignature is by {sig.key}, not {self.name}")
        if len(sig.sig) != 8 + 64:
            raise SignatureError(
                f"cosignature by {self.name} has {len(sig.sig)} bytes, want 72 (time + Ed25519)"
            )
        (ts,) = struct.unpack(">Q", sig.sig[:8])
        try:
            self.key.verify(sig.sig[8:], cosigned_message(text, ts))
        except (SignatureError, FormatError) as e:
            raise SignatureError(f"cosignature by witness {self.name} does not verify") from e
        return int(ts)


@dataclass(frozen=True, eq=False)
class Cosigner:
    """A witness's Ed25519 signing key under its name."""

    name: str
    key: PrivateKey

    def verifier(self) -> CosignatureVerifier:
        """The matching verifier."""
        return CosignatureVerifier(self.name, self.key.public_key())

    def cosign(self, text: str, timestamp: int | None = None) -> NoteSignature:
        """A cosignature over checkpoint note ``text`` at ``timestamp`` (default now)."""
        ts = int(time.time()) if timestamp is None else timestamp
        sig = self.key.sign(cosigned_message(text, ts))
        return NoteSignature(self.name, self.verifier().key_id, struct.pack(">Q", ts) + sig)


def load_witness_verifiers(path: str | os.PathLike[str]) -> list[CosignatureVerifier]:
    """A witnesses file: one vkey per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise KeyFormatError(f"cannot read witnesses file {path}: {e.strerror}") from e
    out = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                out.append(CosignatureVerifier.from_vkey(line))
            except KeyFormatError as e:
                raise KeyFormatError(f"{path} line {i}: {e}") from e
    return out


def verify_cosignatures(note: Note, witnesses: Sequence[CosignatureVerifier]) -> list[str]:
    """Names of the ``witnesses`` whose cosignature on ``note`` verifies.

    Cosignatures by unknown keys are ignored; one by a known witness key that does not
    verify raises :class:`CheckpointError`.
    """
    ok: list[str] = []
    for sig in note.signatures:
        for w in witnesses:
            if w.matches(sig):
                try:
                    w.verify(note.text, sig)
                except SignatureError as e:
                    raise CheckpointError(str(e)) from e
                if w.name not in ok:
                    ok.append(w.name)
    return ok


# ---- the witness ----------------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, message: str, content_type: str = "text/plain") -> None:
        super().__init__(message)
        self.status = status
        self.content_type = content_type


def _parse_request(body: bytes) -> tuple[int, list[bytes], bytes]:
    if len(body) > _MAX_BODY:
        raise _Reject(400, f"request is {len(body)} bytes, over {_MAX_BODY}")
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
                raise _Reject(409, str(size), _SIZE_CT)
            if old == cp.size:
                if root != cp.root and not (old == 0 and cp.root == merkle.empty_root()):
                    raise _Reject(409, str(size), _SIZE_CT)
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
        if not 0 <= n <= _MAX_BODY:
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


# ---- the client (used by the ledger) --------------------------------------------------------


class WitnessConflict(ConflictError):
    """The witness last cosigned another size (``.size``): resend from there."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def add_checkpoint(
    url: str, old: int, proof: Sequence[bytes], note: bytes, *, timeout: float = 5.0
) -> list[NoteSignature]:
    """POST a checkpoint to the witness at ``url``; return its cosignature lines.

    Raises :class:`WitnessConflict` on 409 with a size, :class:`UnavailableError` when
    the witness cannot be reached or refuses.
    """
    body = f"old {old}\n".encode()
    body += b"".join(base64.b64encode(h) + b"\n" for h in proof) + b"\n" + note
    u = urllib.parse.urlparse(url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    try:
        conn = conn_cls(u.netloc, timeout=timeout)
        try:
            conn.request(
                "POST", u.path.rstrip("/") + "/add-checkpoint", body, {"Content-Type": "text/plain"}
            )
            r = conn.getresponse()
            data = r.read()
            ct = r.getheader("Content-Type", "")
        finally:
            conn.close()
    except OSError as e:
        raise UnavailableError(f"witness {url} unreachable: {e}") from e
    text = data.decode("utf-8", "replace")
    if r.status == 409 and ct.startswith(_SIZE_CT) and text.strip().isdigit():
        raise WitnessConflict(f"witness {url} last cosigned size {text.strip()}", int(text))
    if r.status != 200:
        raise UnavailableError(f"witness {url} answered {r.status}: {text.strip()[:200]}")
    try:
        return [NoteSignature.from_line(ln, "cosignature") for ln in text.splitlines() if ln]
    except CheckpointFormatError as e:
        raise UnavailableError(f"witness {url} sent a malformed cosignature: {e}") from e
