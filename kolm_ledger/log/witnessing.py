"""The log's side of C2SP tlog-witness: POST a checkpoint with a consistency proof to a
witness's ``/add-checkpoint`` and read back its cosignature lines (formats in
:mod:`kolm_ledger.formats.witness`; the witness process is :mod:`kolm_ledger.service.witness`).
"""

from __future__ import annotations

import base64
import http.client
import urllib.parse
from collections.abc import Sequence

from kolm_ledger.errors import (
    CheckpointFormatError,
    ConflictError,
    UnavailableError,
)
from kolm_ledger.formats.note import (
    NoteSignature,
)
from kolm_ledger.formats.witness import (
    SIZE_CONTENT_TYPE,
)

__all__ = [
    "WitnessConflict",
    "add_checkpoint",
]


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
    if r.status == 409 and ct.startswith(SIZE_CONTENT_TYPE) and text.strip().isdigit():
        raise WitnessConflict(f"witness {url} last cosigned size {text.strip()}", int(text))
    if r.status != 200:
        raise UnavailableError(f"witness {url} answered {r.status}: {text.strip()[:200]}")
    try:
        return [NoteSignature.from_line(ln, "cosignature") for ln in text.splitlines() if ln]
    except CheckpointFormatError as e:
        raise UnavailableError(f"witness {url} sent a malformed cosignature: {e}") from e
