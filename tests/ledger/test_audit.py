"""``audit``: clean ledgers pass; every kind of tampering by someone with database access fails.

The tamper campaign builds ONE base ledger per engine (a couple of hundred receipts of
all five kinds, one checkpoint per batch, a key registered along the way), drops the
append-only triggers as an attacker would, and then for each generated case opens a
transaction on the base, applies one mutation, runs the audit on that same connection
(so it reads the mutated, uncommitted state), checks that the audit fails, names the
index of the entry that was touched (or the node / checkpoint), and blames no entry
before it, and rolls the transaction back. No copy per case, so PostgreSQL cases cost
about what SQLite ones do; CI runs 1,000 cases per engine, ``make soak``
(:func:`tamper_campaign`) more, with other seeds.

Cases come from a seeded generator (:func:`cases`): random byte flips in every hashed or
checked column, deleted rows (with and without closing the gap), reordered rows,
inserted forged rows (signed by an untrusted key, or validly signed but never logged),
truncation, rewritten or deleted Merkle nodes, subject-index rows and checkpoints.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from support.db import drop_triggers, raw, run_sql

from kolm_ledger._crypto import P256_ORDER, PrivateKey
from kolm_ledger._samples import sample_statement
from kolm_ledger.audit.auditor import AuditReport, Failure, audit
from kolm_ledger.errors import CheckpointError
from kolm_ledger.formats import dsse, receipts
from kolm_ledger.formats.checkpoint import Checkpoint, check_consistent, sign_checkpoint
from kolm_ledger.formats.dsse import Envelope, Signature
from kolm_ledger.formats.leaf import chain_next, entry_leaf_hash, statement_digest
from kolm_ledger.formats.merkle import CompactRange
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Store, micros
from kolm_ledger.storage.models import APPEND_ONLY_TABLES, node_id
from kolm_ledger.timefmt import MAX_TIME_SKEW, from_micros

ORIGIN = "audit.kolm.dev/ledger"
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
KEYS = {
    name: PrivateKey.generate("ed25519" if name.startswith("log") else "ecdsa-p256-sha256")
    for name in ("admin", "compile", "infer", "rogue", "log", "log_rogue")
}
EXTRA_INFER = PrivateKey.generate()  # registered by a key receipt in the base ledger
REVOKED = PrivateKey.generate()  # a compile key registered, used, then revoked in the base
#: every private key that signed something in the base ledger, by key id (re-signing)
BY_KEYID = {k.keyid(): k for k in (*KEYS.values(), EXTRA_INFER, REVOKED)}
TRUST = TrustRoot(
    tuple(
        TrustedKey.for_key(
            KEYS[r].public_key(), r, not_before=EPOCH, origin=ORIGIN if r == "log" else None
        )
        for r in ("admin", "compile", "infer", "log")
    )
)
SIGNER = {"label": "compile", "eval": "compile", "artifact": "compile", "prediction": "infer"}
SIGNER["key"] = "admin"
BASE_SIZE = 200
SQLITE_CASES = 1000
PG_CASES = 1000


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


def signed(kind: str, i: int, key: PrivateKey | None = None, at: datetime = T0) -> Any:
    # dated ``at`` (the clock starts at T0): a receipt's time lies in [its key's
    # not_before, its integration time + 5 minutes]
    st = sample_statement(kind, i, random.Random(f"{kind}-{i}"), at)
    return receipts.sign_statement(st, key or KEYS[SIGNER[kind]])


def audit_url(url: str) -> AuditReport:
    store = Store(url, migrate=False)
    try:
        return audit(store, TRUST)
    finally:
        store.close()


# ---- the base ledger ------------------------------------------------------------------


@dataclass
class Row:
    index: int
    leaf_hash: bytes
    chain_hash: bytes
    kind: str
    key_id: str
    integrated_at: int
    envelope: bytes


@dataclass
class Base:
    """What the tamper generator needs to know about the base ledger."""

    rows: list[Row]
    checkpoints: dict[int, dict[str, bytes]]  # size -> stored note, root, chain_head
    nodes: dict[tuple[int, int], bytes]
    subjects: dict[int, list[str]] = field(default_factory=dict)
    revocation: int = -1  # the index of the key receipt that revokes REVOKED

    @property
    def sizes(self) -> list[int]:
        return sorted(self.checkpoints)

    @property
    def n(self) -> int:
        return len(self.rows)


def build_base(url: str) -> Base:
    """~200 receipts of all five kinds in batches of 1-12, one clock tick per batch; a key
    registered along the way, and another registered, used and revoked."""
    clock = Clock()
    store = Store(url)
    led = Ledger(store, TRUST, KEYS["log"], clock=clock)
    rng = random.Random(2026)
    envs = []
    kinds = [receipts.KINDS[i % 5] for i in range(BASE_SIZE - 14)]
    rng.shuffle(kinds)
    # dated after the keys' registrations took effect (their not_before)
    late = T0 + timedelta(minutes=2)

    def key_receipt(action: str, key: PrivateKey, role: str) -> Any:
        st = receipts.key_statement(action=action, public_key=key.public_key(), role=role, time=T0)
        return receipts.sign_statement(st, KEYS["admin"])

    for i, kind in enumerate(kinds):
        # labels 105-124 are signed by REVOKED (batches hold at most 12, so it is
        # registered (at 100) in an earlier batch, and revoked (at 140) in a later one)
        by_revoked = kind == "label" and 105 <= i < 125
        envs.append(signed(kind, i, REVOKED, late) if by_revoked else signed(kind, i))
        if i == 60:  # register another infer key; later predictions use it
            envs.append(key_receipt("register", EXTRA_INFER, "infer"))
        if i == 100:
            envs.append(key_receipt("register", REVOKED, "compile"))
        if i == 140:
            envs.append(key_receipt("revoke", REVOKED, "compile"))
    envs += [signed("prediction", 1000 + i, EXTRA_INFER, late) for i in range(11)]
    pos = 0
    while pos < len(envs):
        k = rng.randint(1, 12)
        led.append(envs[pos : pos + k])
        pos += k
        clock.t += timedelta(seconds=1)
    rep = audit(store, TRUST)
    assert rep.ok, rep.failures
    assert set(rep.by_kind) == set(receipts.KINDS)
    rows = [
        Row(
            e.index,
            e.leaf_hash,
            e.chain_hash,
            e.kind,
            e.key_id,
            micros(e.integrated_at),
            e.envelope,
        )
        for e in store.entries()
    ]
    base = Base(
        rows,
        {
            c.size: {"note": c.note, "root": c.root, "chain_head": c.chain_head}
            for c in store.checkpoints()
        },
        {(lv, i): h for lv, i, h in store.node_hashes(0, 1 << 62)},
    )
    for idx, digest in store.subject_index():
        base.subjects.setdefault(idx, []).append(digest)
    (base.revocation,) = [
        r.index
        for r in rows
        if r.kind == "key" and b'"action":"revoke"' in Envelope.from_bytes(r.envelope).payload
    ]
    assert sum(r.key_id == REVOKED.keyid() for r in rows) >= 2
    store.close()
    assert base.n == BASE_SIZE
    assert len(base.checkpoints) > 20
    # an attacker with database access starts here
    drop_triggers(url)
    assert audit_url(url).ok
    return base


# ---- mutations ------------------------------------------------------------------------

SQL = list[tuple[str, dict[str, Any]]]


@dataclass
class Expect:
    """What the audit must report.

    ``indices``: entry indices it must name; ``first``: no entry before it may be named;
    ``checkpoint``: a failure must concern the checkpoint of this size; ``text``: some
    failure must contain this.
    """

    indices: set[int] = field(default_factory=set)
    first: int | None = None
    checkpoint: int | None = None
    text: str | None = None


Mutation = Callable[[Base, random.Random], tuple[SQL, Expect]]


def _flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def flip_column(column: str) -> Mutation:
    def m(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
        row = rng.choice(base.rows)
        value = _flip(getattr(row, column), rng)
        sql = f"UPDATE entries SET {column} = :v WHERE idx = :i"
        return [(sql, {"v": value, "i": row.index})], Expect({row.index}, row.index)

    return m


def set_kind(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    row = rng.choice(base.rows)
    kind = rng.choice([k for k in receipts.KINDS if k != row.kind])
    sql = "UPDATE entries SET kind = :k WHERE idx = :i"
    return [(sql, {"k": kind, "i": row.index})], Expect({row.index}, row.index)


def set_key_id(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    row = rng.choice(base.rows)
    other = rng.choice([k.keyid for k in TRUST.keys if k.keyid != row.key_id])
    sql = "UPDATE entries SET key_id = :k WHERE idx = :i"
    return [(sql, {"k": other, "i": row.index})], Expect({row.index}, row.index)


def delete_entry(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    i = rng.randrange(base.n - 1)
    sql: SQL = [("DELETE FROM entries WHERE idx = :i", {"i": i})]
    if rng.random() < 0.5:
        sql.append(("DELETE FROM entry_subjects WHERE idx = :i", {"i": i}))
    return sql, Expect({i}, i)


def delete_and_close_gap(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """Delete an entry and renumber the rest down, so no index is missing."""
    i = rng.randrange(base.n - 1)
    return [
        ("DELETE FROM entries WHERE idx = :i", {"i": i}),
        ("DELETE FROM entry_subjects WHERE idx = :i", {"i": i}),
        ("UPDATE entries SET idx = idx + 1000000 WHERE idx > :i", {"i": i}),
        ("UPDATE entries SET idx = idx - 1000001 WHERE idx >= 1000000", {}),
    ], Expect({i}, i)


def truncate(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    k = rng.randint(1, 25)
    cut = base.n - k
    sql: SQL = [("DELETE FROM entries WHERE idx >= :c", {"c": cut})]
    if rng.random() < 0.5:  # tidy up the subject index and the nodes above the cut as well
        sql.append(("DELETE FROM entry_subjects WHERE idx >= :c", {"c": cut}))
        for lv, ix in sorted(base.nodes):
            if (ix + 1) << lv > cut:
                sql.append(("DELETE FROM nodes WHERE node_id = :n", {"n": node_id(lv, ix)}))
    return sql, Expect({cut}, cut)


def swap(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    i = rng.randrange(base.n - 1)
    j = i + 1 if rng.random() < 0.4 else rng.randrange(i + 1, base.n)
    return [
        ("UPDATE entries SET idx = -1 WHERE idx = :i", {"i": i}),
        ("UPDATE entries SET idx = :i WHERE idx = :j", {"i": i, "j": j}),
        ("UPDATE entries SET idx = :j WHERE idx = -1", {"j": j}),
    ], Expect({i, j}, i)


def _slot_time(base: Base, p: int) -> int:
    """The integration time (µs) a row inserted at ``p`` gets: its predecessor's, so times
    stay non-decreasing and the batch goes on."""
    return base.rows[p - 1].integrated_at if p else base.rows[0].integrated_at


def insert_row(
    base: Base, p: int, env: Envelope, kind: str, digest: bytes | None, at: int | None = None
) -> SQL:
    """``env`` inserted at ``p`` (later rows shifted up) as the log would have written it:
    the v2 leaf (envelope and integration time), a chain hash linked to ``p - 1``, the
    stored statement digest ``digest`` (None: left empty, as a writer dodging the unique
    constraint of one statement, one entry would)."""
    at = _slot_time(base, p) if at is None else at
    data = env.canonical()
    leaf = entry_leaf_hash(data, at)
    prev = base.rows[p - 1].chain_hash if p else bytes(32)
    return [
        ("UPDATE entries SET idx = idx + 1000000 WHERE idx >= :p", {"p": p}),
        ("UPDATE entries SET idx = idx - 999999 WHERE idx >= 1000000", {}),
        (
            "INSERT INTO entries (idx, leaf_hash, chain_hash, kind, key_id, integrated_at, "
            "envelope, statement_digest) VALUES (:p, :l, :c, :k, :kid, :t, :e, :d)",
            {
                "p": p,
                "l": leaf,
                "c": chain_next(prev, leaf),
                "k": kind,
                "kid": env.signatures[0].keyid,
                "t": at,
                "e": data,
                "d": digest,
            },
        ),
    ]


def insert_forged(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """A row inserted at ``p`` (later rows shifted up) with a correctly linked chain hash."""
    p = rng.randrange(base.n + 1)
    rogue = rng.random() < 0.5
    kind = rng.choice(receipts.KINDS[:4])
    env = signed(kind, 5000 + rng.randrange(10**6), KEYS["rogue"] if rogue else None)
    sql = insert_row(base, p, env, kind, statement_digest(env))
    if rogue:  # the untrusted signature is named at p itself
        return sql, Expect({p}, p)
    # a validly signed receipt the log never accepted: p itself checks out, so the first
    # entry named is the one whose chain no longer links (or p, uncovered, at the end)
    return sql, Expect({min(p + 1, base.n)}, p)


def flip_node(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    lv, ix = rng.choice(sorted(base.nodes))
    sql = "UPDATE nodes SET hash = :h WHERE node_id = :n"
    return [(sql, {"n": node_id(lv, ix), "h": _flip(base.nodes[lv, ix], rng)})], Expect(
        text=f"(level {lv}, index {ix})"
    )


def delete_node(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    lv, ix = rng.choice(sorted(base.nodes))
    sql = "DELETE FROM nodes WHERE node_id = :n"
    return [(sql, {"n": node_id(lv, ix)})], Expect(text=f"(level {lv}, index {ix})")


def insert_node(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    lv = rng.randint(1, 6)
    ix = (base.n >> lv) + rng.randint(1, 5)
    sql = "INSERT INTO nodes (node_id, hash) VALUES (:n, :h)"
    return [(sql, {"n": node_id(lv, ix), "h": rng.randbytes(32)})], Expect(
        text=f"(level {lv}, index {ix})"
    )


def flip_checkpoint(column: str) -> Mutation:
    def m(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
        size = rng.choice(base.sizes)
        value = _flip(base.checkpoints[size][column], rng)
        sql = f"UPDATE checkpoints SET {column} = :v WHERE size = :s"
        return [(sql, {"v": value, "s": size})], Expect(checkpoint=size)

    return m


def delete_checkpoint(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    size = rng.choice(base.sizes)
    sql: SQL = [("DELETE FROM checkpoints WHERE size = :s", {"s": size})]
    if size == base.sizes[-1]:  # the newest: its entries are no longer covered
        prev = base.sizes[-2]
        return sql, Expect({prev}, prev, text="not covered by any signed checkpoint")
    return sql, Expect(checkpoint=size, text="no valid signed checkpoint")


def forged_checkpoint(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """A checkpoint signed by an untrusted key with the right origin: new, or replacing one."""
    size = rng.choice([*base.sizes, base.n + rng.randint(1, 9)])
    root, chain = rng.randbytes(32), rng.randbytes(32)
    note = sign_checkpoint(
        Checkpoint(ORIGIN, size, root, chain), [NoteSigner(ORIGIN, KEYS["log_rogue"])]
    ).to_bytes()
    if size in base.checkpoints:
        sql = "UPDATE checkpoints SET note = :n, root = :r, chain_head = :c WHERE size = :s"
    else:
        sql = (
            "INSERT INTO checkpoints (size, root, chain_head, note, created_at) "
            "VALUES (:s, :r, :c, :n, 0)"
        )
    return [(sql, {"n": note, "r": root, "c": chain, "s": size})], Expect(
        checkpoint=size, text="checkpoint signature"
    )


def delete_subjects(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    i = rng.randrange(base.n)
    d = rng.choice(base.subjects[i])
    sql = "DELETE FROM entry_subjects WHERE idx = :i AND digest = :d"
    return [(sql, {"i": i, "d": d})], Expect({i}, i, text="lacks")


def insert_subject(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    i = rng.randrange(base.n)
    d = rng.randbytes(32).hex()
    sql = "INSERT INTO entry_subjects (digest, idx) VALUES (:d, :i)"
    return [(sql, {"i": i, "d": d})], Expect({i}, i, text="it does not name")


def move_subject(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    while True:  # predictions with the same output share their only subject: pick another
        i, j = rng.sample(range(base.n), 2)
        movable = [d for d in base.subjects[i] if d not in base.subjects[j]]
        if movable:
            break
    d = rng.choice(movable)
    sql = "UPDATE entry_subjects SET idx = :j WHERE idx = :i AND digest = :d"
    return [(sql, {"i": i, "j": j, "d": d})], Expect({i, j}, min(i, j))


# ---- issue 14: integration times, one statement one entry, strict receipts ---------------

Y2100 = micros(datetime(2100, 1, 1, tzinfo=UTC))
T0_US = micros(T0)
MAX_MOVE_US = 10**9  # ~17 minutes


def move_time_forward(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """One entry's ``integrated_at`` moved later: to 2100 (the issue's reproduction on a
    revocation un-revoked the key), or by 1 µs to ~17 minutes."""
    row = rng.choice(base.rows)
    t = Y2100 if rng.random() < 0.4 else row.integrated_at + rng.randint(1, MAX_MOVE_US)
    sql = "UPDATE entries SET integrated_at = :t WHERE idx = :i"
    return [(sql, {"t": t, "i": row.index})], Expect({row.index}, row.index)


def move_time_backward(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """One entry's ``integrated_at`` moved earlier: by 1 µs to ~17 minutes, to before the
    trust root's keys were valid, or to the epoch."""
    row = rng.choice(base.rows)
    t = rng.choice(
        [row.integrated_at - rng.randint(1, MAX_MOVE_US), micros(EPOCH) - 1, 0, T0_US - 1]
    )
    sql = "UPDATE entries SET integrated_at = :t WHERE idx = :i"
    return [(sql, {"t": t, "i": row.index})], Expect({row.index}, row.index)


def _two_times(base: Base, rng: random.Random) -> tuple[int, int]:
    while True:  # entries of one batch share their time: pick two that differ
        i, j = sorted(rng.sample(range(base.n), 2))
        if base.rows[i].integrated_at != base.rows[j].integrated_at:
            return i, j


def swap_times(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """Two entries' integration times exchanged (the rows stay where they are)."""
    i, j = _two_times(base, rng)
    sql = "UPDATE entries SET integrated_at = :t WHERE idx = :i"
    return [
        (sql, {"t": base.rows[j].integrated_at, "i": i}),
        (sql, {"t": base.rows[i].integrated_at, "i": j}),
    ], Expect({i, j}, i)


def revocation_to_2100(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """The issue's reproduction: the revocation of a key moved to 2100, which un-revoked it
    (the ledger and the audit judged its later receipts valid) before the leaf bound the time."""
    r = base.revocation
    t = Y2100 + rng.randint(0, 10**12)
    sql = "UPDATE entries SET integrated_at = :t WHERE idx = :i"
    return [(sql, {"t": t, "i": r})], Expect({r}, r)


def retime_and_rehash(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """The thorough writer: moves (or swaps) integration times, then recomputes every leaf
    hash, chain hash and Merkle node from there on, so that every stored hash agrees with
    the rows again. What it cannot redo is the log key's signature on the checkpoints: the
    first one after the change no longer matches the recomputed root."""
    times = [r.integrated_at for r in base.rows]
    what = rng.random()
    if what < 0.2:
        i = base.revocation
        times[i] = Y2100
    elif what < 0.5:
        i = rng.randrange(base.n)
        times[i] = Y2100 if rng.random() < 0.5 else times[i] + rng.randint(1, MAX_MOVE_US)
    elif what < 0.75:
        i = rng.randrange(base.n)
        times[i] -= rng.randint(1, MAX_MOVE_US)
    else:
        i, j = _two_times(base, rng)
        times[i], times[j] = times[j], times[i]
    sql: SQL = []
    tree, chain = CompactRange.empty(), bytes(32)
    nodes: dict[tuple[int, int], bytes] = {}
    for row, t in zip(base.rows, times, strict=True):
        leaf = row.leaf_hash if t == row.integrated_at else entry_leaf_hash(row.envelope, t)
        chain = chain_next(chain, leaf)
        if (leaf, chain, t) != (row.leaf_hash, row.chain_hash, row.integrated_at):
            sql.append(
                (
                    "UPDATE entries SET integrated_at = :t, leaf_hash = :l, chain_hash = :c "
                    "WHERE idx = :i",
                    {"t": t, "l": leaf, "c": chain, "i": row.index},
                )
            )
        for lv, ix, h in tree.append(leaf):
            nodes[lv, ix] = h
    for (lv, ix), h in nodes.items():
        if (lv, ix) in base.nodes and base.nodes[lv, ix] != h:
            sql.append(
                ("UPDATE nodes SET hash = :h WHERE node_id = :n", {"h": h, "n": node_id(lv, ix)})
            )
    first_cp = min(s for s in base.sizes if s > i)
    return sql, Expect(
        first=i, checkpoint=first_cp, text=f"Merkle root recomputed at size {first_cp}"
    )


def duplicate_statement(resign: bool) -> Mutation:
    """A second entry for an already logged (payload, key id): its signature malleated to
    ``(r, n - s)`` (high-S: anyone can, no key needed), or signed afresh by its key (a
    producer colluding with the writer); the stored statement digest left empty to dodge
    the unique constraint. The ledger answers either with the existing entry; the audit
    names the copy."""

    def m(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
        o = rng.randrange(base.n)
        orig = Envelope.from_bytes(base.rows[o].envelope)
        if resign:
            env = dsse.sign(orig.payload, orig.payload_type, BY_KEYID[orig.signatures[0].keyid])
            assert env.signatures[0].sig != orig.signatures[0].sig
        else:
            env = high_s(orig)
        p = rng.randint(o + 1, base.n)
        return insert_row(base, p, env, base.rows[o].kind, None), Expect(
            {p}, p, text=f"repeats the statement (payload and key id) of entry {o}"
        )

    return m


def high_s(env: Envelope) -> Envelope:
    """``env`` with its ECDSA signature ``(r, s)`` replaced by ``(r, n - s)``: the same
    statement, a second valid signature before low-S was required."""
    (sig,) = env.signatures
    r, s_ = decode_dss_signature(sig.sig)
    new = encode_dss_signature(r, P256_ORDER - s_)
    return Envelope(env.payload, env.payload_type, (Signature(sig.keyid, new),))


def _planted(base: Base, rng: random.Random, payload: bytes, kind: str) -> tuple[int, SQL]:
    p = rng.randrange(base.n + 1)
    env = dsse.sign(payload, dsse.IN_TOTO_PAYLOAD_TYPE, KEYS[SIGNER[kind]])
    return p, insert_row(base, p, env, kind, statement_digest(env))


#: (fault, phrase the audit names): each turns an RFC 8785 statement into bytes that a
#: lenient JSON reader accepts (or reads differently) and the strict parser refuses
PAYLOAD_FAULTS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    (
        "duplicate predicateType",
        lambda c: c.replace(
            b'"predicateType":',
            b'"predicateType":"urn:kolm:receipt:prediction:v1","predicateType":',
            1,
        ),
        "duplicate key 'predicateType'",
    ),
    ("NaN", lambda c: b'{"a":NaN,' + c[1:], "NaN is not a JSON number"),
    ("Infinity", lambda c: b'{"a":-Infinity,' + c[1:], "Infinity is not a JSON number"),
    ("1e400", lambda c: b'{"a":1e400,' + c[1:], "outside the IEEE-754 double range"),
    ("lone surrogate", lambda c: b'{"a":"\\ud800",' + c[1:], "lone surrogate"),
    ("CESU-8", lambda c: b'{"a":"\xed\xa0\xbd\xed\xb8\x80",' + c[1:], "not valid UTF-8"),
    ("whitespace", lambda c: b"{ " + c[1:], "not in RFC 8785 canonical form"),
    ("member order", lambda c: b'{"zz":0,' + c[1:], "not in RFC 8785 canonical form"),
    ("number form", lambda c: c[:-1] + b',"zz":1.0}', "not in RFC 8785 canonical form"),
]


def plant_non_canonical(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """A receipt the ledger refuses at append (a payload that is not the RFC 8785 form of a
    strictly parsed statement), correctly signed by a trusted key, written into the
    database as the log would have: leaf, chain and statement digest all consistent."""
    kind = rng.choice(receipts.KINDS[:4])
    c = sample_statement(kind, 7000 + rng.randrange(10**6), rng, T0).to_bytes()
    _, fault, phrase = rng.choice(PAYLOAD_FAULTS)
    p, sql = _planted(base, rng, fault(c), kind)
    return sql, Expect({p}, p, text=phrase)


def plant_misdated(base: Base, rng: random.Random) -> tuple[SQL, Expect]:
    """A correctly signed receipt whose own ``time`` is later than its integration time plus
    the allowed skew (a future-dated receipt), or earlier than its key's ``not_before``
    (1970, or just before), written in as the log would have."""
    kind = rng.choice(receipts.KINDS[:4])
    p = rng.randrange(base.n + 1)
    at = from_micros(_slot_time(base, p))
    if rng.random() < 0.7:
        t = at + MAX_TIME_SKEW + timedelta(microseconds=rng.randint(1, 10**14))
        text = "later than its integration time"
    else:
        t = rng.choice([datetime(1970, 1, 1, tzinfo=UTC), EPOCH - timedelta(microseconds=1)])
        text = "before its key's not_before"
    env = signed(kind, 8000 + rng.randrange(10**6), None, t)
    return insert_row(base, p, env, kind, statement_digest(env)), Expect({p}, p, text=text)


#: mutation name -> (weight, mutation)
MUTATIONS: dict[str, tuple[int, Mutation]] = {
    "flip-envelope": (22, flip_column("envelope")),
    "flip-leaf-hash": (8, flip_column("leaf_hash")),
    "flip-chain-hash": (8, flip_column("chain_hash")),
    "set-kind": (3, set_kind),
    "set-key-id": (3, set_key_id),
    "delete-entry": (6, delete_entry),
    "delete-and-renumber": (4, delete_and_close_gap),
    "truncate": (5, truncate),
    "swap-rows": (8, swap),
    "insert-forged": (8, insert_forged),
    "flip-node": (4, flip_node),
    "delete-node": (2, delete_node),
    "insert-node": (2, insert_node),
    "flip-checkpoint-note": (4, flip_checkpoint("note")),
    "flip-checkpoint-root": (2, flip_checkpoint("root")),
    "flip-checkpoint-chain": (2, flip_checkpoint("chain_head")),
    "delete-checkpoint": (3, delete_checkpoint),
    "forged-checkpoint": (3, forged_checkpoint),
    "delete-subject": (2, delete_subjects),
    "insert-subject": (2, insert_subject),
    "move-subject": (2, move_subject),
    # issue 14 (a writer without keys; weights sum to about a third of the campaign)
    "move-time-forward": (6, move_time_forward),
    "move-time-backward": (5, move_time_backward),
    "swap-times": (5, swap_times),
    "revocation-to-2100": (3, revocation_to_2100),
    "retime-and-rehash": (6, retime_and_rehash),
    "duplicate-high-s": (5, duplicate_statement(resign=False)),
    "duplicate-resigned": (3, duplicate_statement(resign=True)),
    "plant-non-canonical-payload": (8, plant_non_canonical),
    "plant-misdated-receipt": (6, plant_misdated),
}

#: the issue-14 mutations by class (counted apart in ``make soak``'s results)
ISSUE14_CLASSES: dict[str, str] = {
    "move-time-forward": "integration time",
    "move-time-backward": "integration time",
    "swap-times": "integration time",
    "revocation-to-2100": "integration time",
    "retime-and-rehash": "integration time",
    "duplicate-high-s": "one statement one entry",
    "duplicate-resigned": "one statement one entry",
    "plant-non-canonical-payload": "strict payload",
    "plant-misdated-receipt": "receipt time",
}


def case_list(n: int, seed: int) -> list[tuple[str, int]]:
    """An explicit, seeded case list: (mutation name, case seed), every mutation present."""
    rng = random.Random(seed)
    names = list(MUTATIONS)
    weights = [MUTATIONS[k][0] for k in names]
    picked = names + rng.choices(names, weights, k=n - len(names))
    return [(name, rng.randrange(2**32)) for name in picked]


def cases(engine: str, n: int, seed: int) -> list[Any]:
    """:func:`case_list` as pytest parameters with readable ids."""
    marks = [pytest.mark.postgres] if engine == "postgresql" else []
    return [
        pytest.param(name, case_seed, id=f"{engine}-{k:04d}-{name}", marks=marks)
        for k, (name, case_seed) in enumerate(case_list(n, seed))
    ]


def check_report(rep: AuditReport, expect: Expect, what: str) -> None:
    assert not rep.ok, f"{what}: tampering not detected"
    named = rep.failing_indices()
    assert expect.indices <= set(named), f"{what}: want {expect.indices} named, got {named}"
    if expect.first is not None and named:
        assert min(named) >= expect.first, f"{what}: blames {min(named)} < {expect.first}"
    for f in rep.failures:
        if f.index is not None:
            assert str(f).startswith(f"entry {f.index}: "), str(f)
        assert f.reason
    if expect.checkpoint is not None:
        sizes = {f.checkpoint_size for f in rep.failures}
        assert expect.checkpoint in sizes, f"{what}: checkpoint {expect.checkpoint} not named"
    if expect.text is not None:
        assert any(expect.text in str(f) for f in rep.failures), (
            f"{what}: no failure says {expect.text!r}: {[str(f) for f in rep.failures[:5]]}"
        )


# ---- engines --------------------------------------------------------------------------


class TxStore(Store):
    """A store whose every read runs on ``conn``, inside the transaction open on it."""

    def __init__(self, url: str, conn: sa.Connection) -> None:
        super().__init__(url, migrate=False)
        self._conn = conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        yield self._conn


class Engine:
    """One base ledger; each case mutates it in a transaction, audits, and rolls back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.base = build_base(url)
        self.eng = raw(url)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> tuple[int, ...]:
        with self.eng.connect() as c:
            return tuple(
                int(c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in APPEND_ONLY_TABLES
            )

    def audit_mutated(self, sql: SQL) -> AuditReport:
        """Apply ``sql`` in a transaction, audit inside it, roll back."""
        with self.eng.connect() as conn:
            tx = conn.begin()
            try:
                for q, params in sql:
                    conn.execute(sa.text(q), params)
                store = TxStore(self.url, conn)
                try:
                    return audit(store, TRUST)
                finally:
                    store.close()
            finally:
                tx.rollback()

    def check_untouched(self) -> None:
        """Every case rolled back: the base still audits clean, row counts unchanged."""
        assert self._fingerprint() == self.fingerprint
        assert audit_url(self.url).ok

    def close(self) -> None:
        self.eng.dispose()


class SQLiteEngine(Engine):
    def __init__(self, directory: Path) -> None:
        super().__init__(f"sqlite:///{directory / 'base.db'}")


class PostgresEngine(Engine):
    def __init__(self) -> None:
        admin_url = os.environ.get(
            "KOLM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        )
        self.admin = raw(admin_url).execution_options(isolation_level="AUTOCOMMIT")
        self.name = f"kolm_test_tamper_{uuid.uuid4().hex[:10]}"
        with self.admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        try:
            super().__init__(f"{admin_url.rsplit('/', 1)[0]}/{self.name}")
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        with self.admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()

    def close(self) -> None:
        super().close()
        self._drop()


@pytest.fixture(scope="module")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteEngine]:
    eng = SQLiteEngine(tmp_path_factory.mktemp("tamper"))
    try:
        yield eng
        eng.check_untouched()
    finally:
        eng.close()


@pytest.fixture(scope="module")
def pg_engine() -> Iterator[PostgresEngine]:
    eng = PostgresEngine()
    try:
        yield eng
        eng.check_untouched()
    finally:
        eng.close()


def run_case(engine: Engine, name: str, seed: int) -> None:
    rng = random.Random(seed)
    sql, expect = MUTATIONS[name][1](engine.base, rng)
    check_report(engine.audit_mutated(sql), expect, f"{name} (seed {seed})")


@pytest.mark.parametrize(("name", "seed"), cases("sqlite", SQLITE_CASES, seed=1))
def test_tampering_is_detected_sqlite(sqlite_engine: SQLiteEngine, name: str, seed: int) -> None:
    run_case(sqlite_engine, name, seed)


@pytest.mark.parametrize(("name", "seed"), cases("postgresql", PG_CASES, seed=2))
def test_tampering_is_detected_postgresql(pg_engine: PostgresEngine, name: str, seed: int) -> None:
    run_case(pg_engine, name, seed)


def test_the_campaign_is_big_enough() -> None:
    assert SQLITE_CASES >= 1000 and PG_CASES >= 1000
    assert len(MUTATIONS) == 30
    assert set(ISSUE14_CLASSES) <= set(MUTATIONS)
    # every mutation is drawn in CI, the issue-14 ones about a third of the time
    for n, seed in ((SQLITE_CASES, 1), (PG_CASES, 2)):
        names = [name for name, _ in case_list(n, seed)]
        assert set(names) == set(MUTATIONS)
        assert sum(name in ISSUE14_CLASSES for name in names) > n // 5


def tamper_campaign(engine: str, n: int, seed: int, workdir: Path) -> dict[str, object]:
    """``n`` cases on a fresh base ledger of ``engine`` ("sqlite" | "postgresql").

    What ``make soak`` runs: every case must be detected (the audit fails) and named
    (:func:`check_report`: the touched index, node or checkpoint, nothing before it).
    """
    t0 = time.monotonic()
    eng: Engine = SQLiteEngine(workdir) if engine == "sqlite" else PostgresEngine()
    by_mutation: dict[str, int] = {}
    by_class: dict[str, int] = {}  # issue-14 cases detected and named, per class
    detected = named = 0
    misses: list[str] = []
    try:
        for name, case_seed in case_list(n, seed):
            by_mutation[name] = by_mutation.get(name, 0) + 1
            sql, expect = MUTATIONS[name][1](eng.base, random.Random(case_seed))
            rep = eng.audit_mutated(sql)
            detected += not rep.ok
            try:
                check_report(rep, expect, f"{name} (seed {case_seed})")
                named += 1
                if name in ISSUE14_CLASSES:
                    cls = ISSUE14_CLASSES[name]
                    by_class[cls] = by_class.get(cls, 0) + 1
            except AssertionError as e:
                misses.append(str(e).splitlines()[0])
        eng.check_untouched()
    finally:
        eng.close()
    return {
        "engine": engine,
        "cases": n,
        "detected": detected,
        "named": named,
        "detection_rate": round(detected / n, 6),
        "naming_rate": round(named / n, 6),
        "mutations": len(by_mutation),
        "by_class": by_class,
        "misses": misses[:10],
        "seconds": round(time.monotonic() - t0, 1),
    }


# ---- clean audits and specific reports ------------------------------------------------


def test_clean_audit(db_url: str) -> None:
    clock = Clock()
    store = Store(db_url)
    try:
        led = Ledger(store, TRUST, KEYS["log"], clock=clock)
        for b in range(6):
            led.append([signed(receipts.KINDS[(b + i) % 5], 10 * b + i) for i in range(b + 2)])
            clock.t += timedelta(milliseconds=1)
        rep = audit(store, TRUST)
        assert rep.ok, rep.failures
        assert rep.failures == []
        assert rep.entries == rep.size == store.size() == 27
        assert rep.checkpoints == 6
        assert sum(rep.by_kind.values()) == 27
        assert set(rep.by_kind) == set(receipts.KINDS)
        cp = led.checkpoint().checkpoint
        assert rep.newest_checkpoint == cp
        assert rep.root == cp.root
        assert audit(store, TRUST, origin=ORIGIN).ok
        # expecting another log makes every checkpoint fail, each named by its size
        other = audit(store, TRUST, origin="elsewhere.example/log")
        sizes = [c.size for c in store.checkpoints()]
        assert sizes == [2, 5, 9, 14, 20, 27]
        assert {f.checkpoint_size for f in other.failures} >= set(sizes)
    finally:
        store.close()


def test_empty_ledger_audits_clean(db_url: str) -> None:
    store = Store(db_url)
    try:
        rep = audit(store, TRUST)
        assert rep.ok
        assert (rep.entries, rep.checkpoints, rep.newest_checkpoint) == (0, 0, None)
    finally:
        store.close()


def test_untrusted_signer_and_post_revocation_entries_are_named(tmp_path: Path) -> None:
    """The audit replays key receipts itself: a revoked key's later receipts are named."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    clock = Clock()
    store = Store(url)
    led = Ledger(store, TRUST, KEYS["log"], clock=clock)
    led.append([signed("prediction", i) for i in range(3)])
    stale = led.trust  # a replica that never learns of the revocation
    clock.t += timedelta(seconds=1)
    st = receipts.key_statement(
        action="revoke", public_key=KEYS["infer"].public_key(), role="infer", time=clock.t
    )
    led.append([receipts.sign_statement(st, KEYS["admin"])])
    clock.t += timedelta(seconds=1)
    led.trust = stale
    led.append([signed("prediction", 10), signed("label", 11)])
    rep = audit(store, TRUST)
    store.close()
    assert rep.failing_indices() == [4]
    assert "revoked" in str(rep.failures[0])
    # with a trust root that lacks the infer key, every prediction is named
    no_infer = TrustRoot(tuple(k for k in TRUST.keys if k.role != "infer"))
    store = Store(url)
    rep = audit(store, no_infer)
    store.close()
    assert rep.failing_indices() == [0, 1, 2, 3, 4]  # 3: revoking an unknown key


def test_consistent_truncation_needs_a_remembered_checkpoint(tmp_path: Path) -> None:
    """Cutting entries, nodes and checkpoints back to an older checkpoint leaves a log that
    is consistent in itself; only a checkpoint remembered from before (a witness, or
    ``kolm audit --state``) exposes it. This documents that limit of a stateless audit."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    clock = Clock()
    store = Store(url)
    led = Ledger(store, TRUST, KEYS["log"], clock=clock)
    for b in range(4):
        led.append([signed("label", 10 * b + i) for i in range(4)])
        clock.t += timedelta(seconds=1)
    remembered = led.checkpoint().checkpoint
    nodes = [(lv, i) for lv, i, _ in store.node_hashes(0, 1 << 62) if (i + 1) << lv > 8]
    store.close()
    drop_triggers(url)
    run_sql(
        url,
        [
            ("DELETE FROM entries WHERE idx >= 8", {}),
            ("DELETE FROM entry_subjects WHERE idx >= 8", {}),
            ("DELETE FROM checkpoints WHERE size > 8", {}),
            *[("DELETE FROM nodes WHERE node_id = :n", {"n": node_id(lv, i)}) for lv, i in nodes],
        ],
    )
    rep = audit_url(url)
    assert rep.ok, rep.failures
    assert rep.newest_checkpoint is not None
    assert rep.newest_checkpoint.size == 8
    with pytest.raises(CheckpointError, match="smaller than old size 16"):
        check_consistent(remembered, rep.newest_checkpoint, [])


def test_every_failure_names_its_index_or_checkpoint() -> None:
    assert str(Failure(7, "bad")) == "entry 7: bad"
    assert str(Failure(None, "bad", 12)) == "checkpoint 12: bad"
    assert str(Failure(None, "bad")) == "tree: bad"
