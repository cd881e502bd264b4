"""The ``kolm`` command, run as a user runs it: a subprocess of the installed entry point.

Exit codes: 0 success; 1 a verification or audit failed; 2 bad input or another error.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kolm_ledger._samples import sample_statement
from kolm_ledger.formats import receipts
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.canonical import canonical_json
from kolm_ledger.formats.checkpoint import verify_checkpoint
from kolm_ledger.keys import TrustRoot
from kolm_ledger.verify.receipt import STEPS, verify_bundle

_SCRIPT = Path(sys.executable).with_name("kolm")
KOLM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kolm"]
ROLES = ("admin", "compile", "infer", "log")
SIGNER = {"label": "compile", "eval": "compile", "artifact": "compile", "prediction": "infer"}
SIGNER["key"] = "admin"


def kolm(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [*KOLM, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
        check=False,
    )


def ok(*args: object) -> str:
    p = kolm(*args)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def write_statement(d: Path, kind: str, i: int) -> Path:
    path = d / f"{kind}-{i}.json"
    path.write_bytes(sample_statement(kind, i, random.Random(i)).to_bytes())
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "keys"
    out = ok("keys", "init", d)
    assert f"wrote {d / 'trust.json'}" in out
    return d


@pytest.fixture(scope="module")
def ledger_db(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite ledger with one receipt of every kind, appended through the CLI."""
    d = tmp_path_factory.mktemp("ledger")
    url = f"sqlite:///{d / 'ledger.db'}"
    for i, kind in enumerate(receipts.KINDS):
        out = ok(
            "ledger",
            "append",
            "--db",
            url,
            "--key",
            keys / f"{SIGNER[kind]}.key",
            write_statement(d, kind, i),
        )
        assert out == f"{i}\n"
    return url


def test_keys_init_writes_keys_and_the_trust_root(keys: Path) -> None:
    files = sorted(p.name for p in keys.iterdir())
    assert files == sorted(
        [*(f"{r}.key" for r in ROLES), *(f"{r}.pub" for r in ROLES), "trust.json"]
    )
    for r in ROLES:
        assert stat.S_IMODE((keys / f"{r}.key").stat().st_mode) == 0o600, r
        assert (keys / f"{r}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    doc = json.loads((keys / "trust.json").read_text())
    assert set(doc) == {"version", "keys"}
    assert doc["version"] == 1
    assert [k["role"] for k in doc["keys"]] == list(ROLES)
    for k in doc["keys"]:
        assert set(k) == {
            "keyid",
            "role",
            "algorithm",
            "public_key_pem",
            "not_before",
            "not_after",
            "origin",
        }
        assert k["algorithm"] == ("ed25519" if k["role"] == "log" else "ecdsa-p256-sha256")
        assert k["public_key_pem"] == (keys / f"{k['role']}.pub").read_text()
        assert (k["origin"] is not None) == (k["role"] == "log")
        assert k["not_before"].endswith("Z")
        assert k["not_after"] is None
    assert TrustRoot.load(keys / "trust.json").get(doc["keys"][0]["keyid"]).role == "admin"


def test_keys_init_refuses_to_overwrite(keys: Path) -> None:
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    p = kolm("keys", "init", keys)
    assert p.returncode == 2
    assert "refusing to overwrite" in p.stderr
    assert "Traceback" not in p.stderr
    assert {q.name: q.read_bytes() for q in keys.iterdir()} == before


def test_keys_init_with_an_origin(tmp_path: Path) -> None:
    ok("keys", "init", tmp_path / "k", "--origin", "example.org/log")
    root = TrustRoot.load(tmp_path / "k" / "trust.json")
    assert [k.origin for k in root.log_keys()] == ["example.org/log"]


@pytest.mark.parametrize(
    ("origin", "why"),
    [
        ("a b", "contains whitespace"),
        ("a\tb", "contains whitespace"),
        ("log+1", "contains '+'"),
        ("", "must be a non-empty string"),
    ],
)
def test_keys_init_refuses_an_origin_that_is_no_note_key_name(
    tmp_path: Path, origin: str, why: str
) -> None:
    """Before, ``keys init --origin "a b"`` succeeded and ``kolm ledger vkey`` then failed."""
    p = kolm("keys", "init", tmp_path / "k", "--origin", origin)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "origin (the log's signed-note key name): key name" in p.stderr and why in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "k").exists()  # refused before anything was written
    ok("keys", "init", tmp_path / "good", "--origin", "example.org/log")
    assert ok("ledger", "vkey", "--trust", tmp_path / "good" / "trust.json").startswith(
        "example.org/log+"
    )


def test_serve_without_a_tls_flag_is_refused_even_on_loopback(tmp_path: Path) -> None:
    """SECURITY.md: plain text needs an explicit --insecure, on loopback too (all services)."""
    ok("keys", "init", tmp_path / "keys")
    k = tmp_path / "keys"
    (tmp_path / "arts").mkdir()
    for cmd in (
        ["ledger", "serve", "--db", f"sqlite:///{tmp_path / 'l.db'}", "--trust",
         k / "trust.json", "--log-key", k / "log.key", "--listen", "127.0.0.1:0"],
        ["infer", "serve", "--artifacts", tmp_path / "arts", "--ledger", "127.0.0.1:1",
         "--key", k / "infer.key", "--trust", k / "trust.json", "--listen", "127.0.0.1:0"],
        ["compile", "serve", "--ledger", "127.0.0.1:1", "--keys", k, "--work",
         tmp_path / "work", "--listen", "127.0.0.1:0"],
    ):  # fmt: skip
        p = kolm(*cmd)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        assert "plain-text gRPC needs an explicit --insecure" in p.stderr, p.stderr


def test_append_checkpoint_bundle_verify(keys: Path, ledger_db: str, tmp_path: Path) -> None:
    trust = TrustRoot.load(keys / "trust.json")
    note = ok("ledger", "checkpoint", "--db", ledger_db)
    cp = verify_checkpoint(note.encode(), trust).checkpoint
    assert cp.size == 5
    assert note.startswith("kolm.dev/ledger\n5\n")
    for index, kind in enumerate(receipts.KINDS):
        out = ok("ledger", "bundle", "--db", ledger_db, "--index", index)
        b = Bundle.from_bytes(out.encode())
        v = verify_bundle(b, trust)
        assert (v.index, v.kind) == (index, kind)
        path = tmp_path / f"r{index}.kolm-receipt.json"
        path.write_text(out)
        verdict = ok("verify", path, "--trust", keys / "trust.json")
        assert verdict.count("\n") == 1, verdict
        assert verdict.startswith(f"OK: {kind} receipt at index {index} signed by {SIGNER[kind]}")
        assert "kolm.dev/ledger size 5" in verdict
    # appending the same statement with the same key signs it afresh (ECDSA is randomized),
    # so it is a new entry
    out = ok(
        "ledger",
        "append",
        "--db",
        ledger_db,
        "--key",
        keys / "compile.key",
        write_statement(tmp_path, "label", 0),
    )
    assert out == "5\n"


def _bundle(ledger_db: str, index: int) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(ok("ledger", "bundle", "--db", ledger_db, "--index", index))
    return obj


def _flip_b64(s: str, at: int = 10) -> str:
    raw = bytearray(base64.b64decode(s))
    raw[at % len(raw)] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _tampered_bundles(ledger_db: str) -> dict[str, tuple[int, bytes]]:
    """name -> (the step ``kolm verify`` must fail at, the bundle file bytes)."""
    good = _bundle(ledger_db, 1)
    out: dict[str, tuple[int, bytes]] = {}

    def add(name: str, step: int, obj: Any) -> None:
        out[name] = (step, obj if isinstance(obj, bytes) else json.dumps(obj).encode())

    add("not json", 1, b"{ nope")
    add("truncated", 1, json.dumps(good).encode()[:-40])
    b = json.loads(json.dumps(good))
    b["envelope"]["payload"] = base64.b64encode(b"{}").decode()
    add("payload not a statement", 2, b)
    b = json.loads(json.dumps(good))
    payload = json.loads(base64.b64decode(b["envelope"]["payload"]))
    payload["predicate"]["n"] += 1
    b["envelope"]["payload"] = base64.b64encode(canonical_json(payload)).decode()
    add("payload changed", 3, b)
    b = json.loads(json.dumps(good))
    b["envelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    add("payload not in RFC 8785 form", 2, b)
    b = json.loads(json.dumps(good))
    b["envelope"]["signatures"][0]["sig"] = _flip_b64(b["envelope"]["signatures"][0]["sig"], 20)
    add("signature flipped", 3, b)
    b = json.loads(json.dumps(good))
    b["envelope"]["signatures"][0]["keyid"] = "00" * 32
    add("unknown key", 3, b)
    # the tlog-proof text: header, "index N", the inclusion hashes, a blank line, the note
    text: str = good["tlog_proof"]
    lines = text.split("\n")
    first_hash = next(i for i, line in enumerate(lines) if line.startswith("index ")) + 1
    b = json.loads(json.dumps(good))
    lines[first_hash] = _flip_b64(lines[first_hash])
    b["tlog_proof"] = "\n".join(lines)
    add("inclusion hash flipped", 7, b)
    b = json.loads(json.dumps(good))
    b["tlog_proof"] = text.replace("index 1\n", "index 2\n")
    add("index changed", 7, b)
    b = json.loads(json.dumps(good))
    b["tlog_proof"] = text.replace("\u2014 ", "\u2014 x", 1)
    add("checkpoint signed by an unknown key name", 6, b)
    return out


def test_verify_a_tampered_bundle_names_the_step(
    keys: Path, ledger_db: str, tmp_path: Path
) -> None:
    good = _bundle(ledger_db, 1)
    assert set(good) >= {"envelope"}
    cases = _tampered_bundles(ledger_db)
    assert len(cases) >= 8, sorted(cases)
    for name, (step, data) in cases.items():
        path = tmp_path / "bad.kolm-receipt.json"
        path.write_bytes(data)
        p = kolm("verify", path, "--trust", keys / "trust.json")
        assert p.returncode == 1, (name, p.stdout, p.stderr)
        assert p.stdout.count("\n") == 1, (name, p.stdout)
        assert p.stdout.startswith(f"FAILED at step {step}: step {step} ({STEPS[step - 1]})"), (
            name,
            p.stdout,
        )
    # a trust root that does not hold the signing key: step 3
    other = tmp_path / "other-keys"
    ok("keys", "init", other)
    path = tmp_path / "good.kolm-receipt.json"
    path.write_text(json.dumps(good))
    p = kolm("verify", path, "--trust", other / "trust.json")
    assert p.returncode == 1
    assert p.stdout.startswith("FAILED at step 3")
    # a file that is not there, a trust root that is not there
    p = kolm("verify", tmp_path / "missing.json", "--trust", keys / "trust.json")
    assert p.returncode == 1
    assert "cannot read bundle" in p.stdout
    p = kolm("verify", path, "--trust", tmp_path / "missing-trust.json")
    assert p.returncode == 2
    assert "kolm: error: cannot read trust root" in p.stderr


def test_audit_exit_codes(keys: Path, ledger_db: str, tmp_path: Path) -> None:
    out = ok("audit", "--db", ledger_db, "--trust", keys / "trust.json")
    assert out.startswith("OK: ")
    assert "artifact 1, eval 1, key 1, label" in out
    assert "checkpoints" in out
    # a copy with one byte of entry 2 flipped (triggers dropped, as an attacker would)
    src = Path(ledger_db.removeprefix("sqlite:///"))
    dst = tmp_path / "tampered.db"
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    con = sqlite3.connect(dst)
    con.execute("DROP TRIGGER entries_no_update")
    (env,) = con.execute("SELECT envelope FROM entries WHERE idx = 2").fetchone()
    env = bytearray(env)
    env[60] ^= 0x01
    con.execute("UPDATE entries SET envelope = ? WHERE idx = 2", (bytes(env),))
    con.commit()
    con.close()
    p = kolm("audit", "--db", f"sqlite:///{dst}", "--trust", keys / "trust.json")
    assert p.returncode == 1, (p.stdout, p.stderr)
    first, *rest = p.stdout.splitlines()
    assert first.startswith("FAILED: ")
    assert "failing indices: [2]" in first
    assert rest
    assert all(line.startswith("  ") for line in rest)
    assert any(line.startswith("  entry 2: ") for line in rest)


def test_bad_input_exits_2(keys: Path, ledger_db: str, tmp_path: Path) -> None:
    st = write_statement(tmp_path, "label", 7)
    for args, want in [
        (("ledger", "checkpoint", "--db", "nonsense://"), "kolm: error: "),
        (("ledger", "checkpoint", "--db", "mysql://u@h/db"), "want sqlite or postgresql"),
        (("ledger", "bundle", "--db", ledger_db, "--index", 999), "no entry at index 999"),
        (
            ("ledger", "append", "--db", ledger_db, "--key", keys / "infer.key", st),
            "may not sign 'label'",
        ),
        (
            ("ledger", "append", "--db", ledger_db, "--key", tmp_path / "nope.key", st),
            "cannot read key file",
        ),
        (
            ("ledger", "append", "--db", ledger_db, "--key", keys / "compile.key", keys / "x"),
            "cannot read statement",
        ),
        (
            (
                "ledger",
                "append",
                "--db",
                ledger_db,
                "--key",
                keys / "compile.key",
                keys / "trust.json",
            ),
            "statement",
        ),
    ]:
        p = kolm(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert want in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr
    p = kolm("ledger", "checkpoint", "--db", f"sqlite:///{tmp_path / 'empty.db'}")
    assert p.returncode == 2
    assert "empty" in p.stderr
    p = kolm("nonsense")
    assert p.returncode == 2  # argparse


@pytest.mark.postgres
def test_append_and_audit_on_postgresql(keys: Path, pg_url: str, tmp_path: Path) -> None:
    for i, kind in enumerate(receipts.KINDS):
        out = ok(
            "ledger",
            "append",
            "--db",
            pg_url,
            "--key",
            keys / f"{SIGNER[kind]}.key",
            write_statement(tmp_path, kind, 100 + i),
        )
        assert out == f"{i}\n"
    note = ok("ledger", "checkpoint", "--db", pg_url)
    assert (
        verify_checkpoint(note.encode(), TrustRoot.load(keys / "trust.json")).checkpoint.size == 5
    )
    bundle = tmp_path / "b.json"
    bundle.write_text(ok("ledger", "bundle", "--db", pg_url, "--index", 3))
    assert ok("verify", bundle, "--trust", keys / "trust.json").startswith("OK: prediction")
    out = ok("audit", "--db", pg_url, "--trust", keys / "trust.json")
    assert out.startswith("OK: 5 entries")
    # tamper with entry 3 as an attacker with database access would
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    eng = sa.create_engine(pg_url, poolclass=NullPool)
    with eng.begin() as c:
        c.execute(sa.text("DROP TRIGGER entries_append_only ON entries"))
        c.execute(sa.text("UPDATE entries SET chain_hash = :h WHERE idx = 3"), {"h": bytes(32)})
    eng.dispose()
    p = kolm("audit", "--db", pg_url, "--trust", keys / "trust.json")
    assert p.returncode == 1
    assert "failing indices: [3, 4]" in p.stdout  # 4 no longer links to the rewritten 3


def test_demo(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    p = kolm("demo", "--trust-core", "--dir", d, "--receipts", 40)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert (d / "ledger.db").is_file()
    assert (d / "tampered.db").is_file()
    assert (d / "keys" / "trust.json").is_file()
    bundles = list(d.glob("receipt-*.kolm-receipt.json"))
    assert len(bundles) == 1
    for r in ("admin", "compile", "infer", "log"):
        assert stat.S_IMODE((d / "keys" / f"{r}.key").stat().st_mode) == 0o600
    trust = d / "keys" / "trust.json"
    assert ok("verify", bundles[0], "--trust", trust).startswith("OK: ")
    assert ok("audit", "--db", f"sqlite:///{d / 'ledger.db'}", "--trust", trust).startswith(
        "OK: 200 entries"
    )
    p = kolm("audit", "--db", f"sqlite:///{d / 'tampered.db'}", "--trust", trust)
    assert p.returncode == 1
    assert "failing indices: [66]" in p.stdout  # the demo flips entry size // 3
    # the demo refuses a directory that already holds one
    p = kolm("demo", "--dir", d, "--receipts", 1)
    assert p.returncode != 0
    assert "already holds a demo" in p.stderr
    shutil.rmtree(d)


def test_infer_serve_spool_first_needs_a_spool(tmp_path: Path) -> None:
    ok("keys", "init", tmp_path / "keys")
    (tmp_path / "arts").mkdir()
    p = kolm("infer", "serve", "--artifacts", tmp_path / "arts", "--ledger", "127.0.0.1:1",
             "--key", tmp_path / "keys" / "infer.key", "--trust", tmp_path / "keys" / "trust.json",
             "--insecure", "--receipt-ack", "spool")  # fmt: skip
    assert p.returncode != 0
    assert "receipt ack 'spool' needs a spool (--spool FILE)" in p.stderr, p.stderr
