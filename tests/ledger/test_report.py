"""``kolm report``: a self-contained HTML audit report, checked as text and in headless Chromium."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kolm_ledger import Ledger, PrivateKey, Store, TrustRoot, init_keys
from kolm_ledger.audit.report import (
    FIGURE_IDS,
    collect_from_store,
    render_html,
    svg_heatmap,
    volume_buckets,
)
from kolm_ledger.formats import receipts
from kolm_ledger.formats.merkle import root_from_leaves

LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]
JOB = "job-report-1"


def _h(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


@dataclass
class Built:
    db: str
    trust_path: Path
    trust: TrustRoot
    digest: str
    bare_digest: str  # an artifact whose eval receipt carries no extras


def _build(tmp: Path, n_labels: int = 60) -> Built:
    keys = tmp / "keys"
    trust = init_keys(keys)
    db = f"sqlite:///{tmp / 'ledger.db'}"
    t = [datetime.now(UTC)]
    ledger = Ledger(Store(db), trust, PrivateKey.load(keys / "log.key"), clock=lambda: t[0])
    compile_key = PrivateKey.load(keys / "compile.key")
    infer_key = PrivateKey.load(keys / "infer.key")
    rng = random.Random(5)

    def append(sts: list[receipts.Statement], key: PrivateKey) -> list[bytes]:
        res = ledger.append([receipts.sign_statement(s, key) for s in sts])
        t[0] += timedelta(hours=5)
        return [r.leaf_hash for r in res]

    leaves: list[bytes] = []
    for start in range(0, n_labels, 10):  # labels arrive in batches over a few days
        batch = []
        for i in range(start, min(start + 10, n_labels)):
            label = LABELS[i % len(LABELS)]
            top = rng.choice([3, 4, 5])
            other = LABELS[(i + 1) % len(LABELS)]
            votes = {label: top, other: 5 - top} if top < 5 else {label: 5}
            batch.append(
                receipts.label_statement(
                    input_value=f"ticket {i}",
                    output_value=label,
                    task={"name": "router", "spec_digest": _h("spec")},
                    teacher={"backend": "simulated", "model": "gold@0.85"},
                    k=5,
                    votes=votes,
                    sample_digests=[_h(i, s) for s in range(5)],
                    verifier={"name": "label_set", "version": "1"},
                    agreement=top / 5,
                    job_id=JOB,
                )
            )
        leaves += append(batch, compile_key)
    digest = _h("artifact")
    conf = [[12 if i == j else (1 if j == (i + 1) % 4 else 0) for j in range(4)] for i in range(4)]
    per_label = {
        lab: {"precision": 0.92 - 0.05 * i, "recall": 0.9 - 0.03 * i, "f1": 0.9, "support": 13}
        for i, lab in enumerate(LABELS)
    }
    n, correct = 52, 48
    (eval_leaf,) = append(
        [
            receipts.eval_statement(
                artifact_digest=digest,
                holdout_digest=_h("holdout"),
                n=n,
                correct=correct,
                k_score=100 * correct / n,
                interval=(81.6, 96.4),
                outcome_root=_h("outcomes"),
                teacher_k_score=94.2,
                extra={
                    "per_label": per_label,
                    "confusion": {"labels": LABELS, "matrix": conf},
                    "gate": GATE,
                },
            )
        ],
        compile_key,
    )
    art = receipts.artifact_statement(
        artifact_digest=digest,
        file_name="router.kolm",
        file_digest=_h("file"),
        base_model={"id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "main"},
        training_set_root=root_from_leaves(leaves).hex(),
        label_count=len(leaves),
        eval_receipt=eval_leaf.hex(),
        k_score=100 * correct / n,
        verifier={"name": "label_set", "version": "1"},
        compile_config_digest=_h("config"),
        kolm_version="0.1.0",
        checkpoint={"origin": "kolm.dev/ledger", "size": len(leaves) + 1},
        extra={
            "job_id": JOB,
            "label_acceptance": {
                "accepted": len(leaves),
                "rejected": {"too_few_valid": 4, "no_agreement": 3, "tie": 1},
            },
            "cost": {
                "teacher_cost_per_call": 0.0004,
                "teacher_cost_per_voted_answer": 0.002,
                "student_cost_per_call": 2.5e-8,
                "student_latency_ms": 1.8,
                "assumed_dollars_per_cpu_hour": 0.05,
                "teacher_samples_bought_by_this_job": 340,
                "teacher_requests_billed_by_this_job": 68,
                "teacher_requests_failed_not_billed": 3,
                "cost_paid_by_this_job": 0.136,
            },
        },
    )
    append([art], compile_key)
    # a second artifact with a bare eval receipt (no per_label / confusion) and no labels
    bare = _h("bare")
    (bare_eval,) = append(
        [
            receipts.eval_statement(
                artifact_digest=bare,
                holdout_digest=_h("holdout"),
                n=10,
                correct=7,
                k_score=70.0,
                interval=(39.7, 89.2),
                outcome_root=_h("o2"),
                teacher_k_score=None,
            )
        ],
        compile_key,
    )
    append(
        [
            receipts.artifact_statement(
                artifact_digest=bare,
                file_name="bare.kolm",
                file_digest=_h("bare-file"),
                base_model={"id": "m", "revision": "r"},
                training_set_root=root_from_leaves([]).hex(),
                label_count=0,
                eval_receipt=bare_eval.hex(),
                k_score=70.0,
                verifier={"name": "label_set", "version": "1"},
                compile_config_digest=_h("c2"),
                kolm_version="0.1.0",
                checkpoint={"origin": "kolm.dev/ledger", "size": 1},
            )
        ],
        compile_key,
    )
    for day in range(3):  # predictions
        preds = [
            receipts.prediction_statement(
                output_digest=_h("out", day, i),
                artifact_digest=digest,
                input_commitment=_h("c", day, i),
                output=LABELS[i % 4],
                verifier_verdict={"ok": True},
                backend="student",
                confidence=0.9,
                latency_ms=3.0,
                request_id=f"r{day}-{i}",
            )
            for i in range(15 + 10 * day)
        ]
        append(preds, infer_key)
    ledger.store.close()
    return Built(db, keys / "trust.json", trust, digest, bare)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report_html(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kolm",
            "report",
            "--db",
            built.db,
            built.digest,
            "--trust",
            str(built.trust_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK: wrote")
    return out


EXTERNAL = re.compile(
    r"""(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""",
    re.I,
)


# the eval receipt's gate (selective prediction), as the compile's package stage writes it
GATE = {
    "rule": "calibrated",
    "target_cover_k_score": 99.0,
    "t_prob": 0.81,
    "t_sim": 0.42,
    "temperature": 1.3,
    "k": 5,
    "holdout": {
        "n": 52,
        "n_cover": 47,
        "coverage": 90.4,
        "cover_k_score": 97.87,
        "cover_interval": [88.9, 99.6],
        "k_score": 92.31,
        "curve": {"prob": [[25.0, 100.0], [50.0, 100.0], [75.0, 97.4], [100.0, 92.31]]},
    },
}


def test_report_content(report_html: Path, built: Built) -> None:
    text = report_html.read_text(encoding="utf-8")
    for fid in FIGURE_IDS:
        if fid == "fig-per-field":  # an extract artifact's (tests/e2e/test_structured_tasks)
            assert fid not in text
            continue
        assert f'<svg id="{fid}"' in text, fid
    # self-contained: no script, no external reference of any kind
    assert "<script" not in text.lower()
    assert not EXTERNAL.search(text)
    assert "http://" not in text and "https://" not in text
    assert "default-src 'none'" in text
    assert "OK: provenance recomputed from the receipts" in text
    assert "Verdict: provenance and ledger audit pass" in text
    assert built.digest in text
    assert "K-score <b>92.31</b> on n = 52" in text
    assert "training-set root" in text and "MISMATCH" not in text
    # acceptance from the artifact extras, votes from the label receipts
    assert "too few valid answers" in text and "60 label receipts" in text
    # the rate on its own 0-100 % scale: 60 accepted of 68 inputs
    assert "88.2%" in text
    # the cost comparison is a table: per answer, the student's edge, payback
    assert '<table class="grid" id="cost-table">' in text
    assert "$0.002000" in text and "80,000×" in text
    assert "payback: answers served by the student</td><td>69" in text
    assert "340 samples in 68 billed requests (3 failed, not billed)" in text
    assert "4 of 5" in text and "5 of 5" in text
    assert "precision" in text and "lost_or_stolen_card" in text
    # 60 labels + 2 evals + 2 artifacts + 15+25+35 predictions
    assert "139 entries" in text and "prediction 75" in text


def test_report_draws_the_risk_coverage_curve(report_html: Path) -> None:
    text = report_html.read_text()
    assert 'id="fig-risk-coverage"' in text and "ranked by prob" in text
    assert "coverage 90.4% (47 of 52), cover K-score 97.87 [88.9, 99.6]" in text
    assert "<th>target cover K-score</th><td>99</td>" in text  # RFC 8785: 99.0 is 99


def test_report_without_eval_extras_or_labels(built: Built) -> None:
    store = Store(built.db)
    try:
        data = collect_from_store(store, built.bare_digest, built.trust, source="test")
    finally:
        store.close()
    text = render_html(data)
    assert "no per_label metrics" in text and "no confusion matrix" in text
    assert "carries no gate" in text and 'id="fig-risk-coverage"' not in text
    assert 'id="fig-confusion"' not in text and 'id="fig-per-label"' not in text
    assert 'id="fig-kscore"' in text and 'id="fig-volume"' in text
    assert "No label receipts found" in text
    assert "teacher n/a" in text


def test_report_shows_a_broken_chain(built: Built, tmp_path: Path) -> None:
    """A report over a ledger whose artifact claims the wrong label count says FAILED."""
    store = Store(built.db)
    try:
        data = collect_from_store(store, built.digest, built.trust)
    finally:
        store.close()
    data.chain.failures.append("artifact claims 61 labels, ledger holds 60")
    text = render_html(data)
    assert "Verdict: FAILED" in text and "artifact claims 61 labels" in text


def test_unknown_artifact_is_an_error(built: Built) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kolm", "report", "--db", built.db, "0" * 64,
         "--trust", str(built.trust_path), "--out", "/dev/null"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "no artifact receipt" in r.stderr


def test_report_reaches_a_mutual_tls_ledger(built: Built, tmp_path: Path) -> None:
    """``kolm report --ledger`` with ``--tls-dir``/``--role``, like audit, verify and
    provenance (before, report had no TLS options and could not reach such a ledger)."""
    from test_ledger_service import ThreadedServer

    from kolm_ledger.service.tls import init_certs, server_credentials

    certs = tmp_path / "certs"
    init_certs(certs)
    db = tmp_path / "ledger.db"
    shutil.copy(built.db.removeprefix("sqlite:///"), db)
    log_key = PrivateKey.load(built.trust_path.parent / "log.key")
    srv = ThreadedServer(
        f"sqlite:///{db}", built.trust, log_key, credentials=server_credentials(certs, "ledger")
    )
    try:
        base = [sys.executable, "-m", "kolm", "report", built.digest, "--ledger",
                f"localhost:{srv.port}", "--trust", str(built.trust_path)]  # fmt: skip

        def report(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*base, *extra], capture_output=True, text=True, timeout=120, check=False
            )

        out = tmp_path / "r.html"
        r = report("--tls-dir", str(certs), "--role", "auditor", "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("OK: wrote") and "audit ok" in r.stdout
        text = out.read_text(encoding="utf-8")
        assert "Verdict: provenance and ledger audit pass" in text
        assert f"ledger service localhost:{srv.port}" in text
        # without a certificate the TLS ledger cannot be read: a clean error, exit 2
        r = report("--out", str(tmp_path / "plain.html"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    finally:
        srv.stop()


def test_acceptance_rate_gets_its_own_scale_and_rejections_their_reasons() -> None:
    from kolm_ledger.audit.report import _acceptance, svg_bars

    # what the compile pipeline signs in the artifact receipt (labels)
    ap = {
        "labels": {
            "sampled": 1000, "accepted": 940, "rejected": 60, "acceptance_rate": 0.94,
            "logged": 940, "seed_pairs": 0, "append_failed": 0,
            "rejected_reasons": {"too_few_valid": 41, "no_agreement": 12, "teacher_error": 7},
            "holdout": {"rows": 10, "mapped": 2, "dropped": 0, "unlabeled": 0, "leaked": 1},
        }
    }  # fmt: skip
    acc = _acceptance(ap, 940)
    assert all("rate" not in name for name, _ in acc.counts)  # not a sliver on the count axis
    assert ("sampled", 1000.0) in acc.counts and acc.rate == 0.94
    assert acc.reasons == [
        ("no agreement", 12.0), ("teacher refused / malformed", 7.0),
        ("too few valid answers", 41.0),
    ]  # fmt: skip
    # on a 0-100 scale a 94 % rate is a 94 % bar
    svg = svg_bars("r", [("accepted", 94.0)], max_value=100.0, fmt="{:.1f}%")
    width = float(re.search(r'<rect x="200" y="8" width="([0-9.]+)"', svg).group(1))  # type: ignore[union-attr]
    assert width == pytest.approx(0.94 * (640 - 200 - 70), abs=0.2)


def test_confusion_labels_are_not_cut_off() -> None:
    long = ["balance_not_updated_after_cheque_or_cash_deposit", "card_arrival"]
    svg = svg_heatmap("c", long, [[3, 1], [0, 4]])
    assert svg.count(f">{long[0]}</text>") == 2  # row and column, whole
    left = float(re.search(r'<text x="([0-9.]+)" y="[0-9.]+" text-anchor="end"', svg).group(1))  # type: ignore[union-attr]
    assert left >= 6 * len(long[0])  # room for the whole row label left of the grid
    top = int(re.search(r"translate\([0-9.]+,([0-9]+)\) rotate", svg).group(1))  # type: ignore[union-attr]
    assert top >= 5 * len(long[0])  # room for the rotated column label above it
    width = int(re.search(r'<svg id="c" class="fig" width="([0-9]+)"', svg).group(1))  # type: ignore[union-attr]
    x_last = float(re.findall(r"translate\(([0-9.]+),", svg)[-1])
    assert width - x_last >= 3 * len(long[1])  # and right of the last one, which leans right


def test_volume_buckets_and_heatmap_escape() -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    name, b = volume_buckets([(t0 + timedelta(days=d), "label") for d in range(10)])
    assert name == "day" and len(b) == 10 and all(c["label"] == 1 for _, c in b)
    name, b = volume_buckets([(t0, "eval"), (t0 + timedelta(minutes=30), "eval")])
    assert name == "minute" and len(b) == 31
    svg = svg_heatmap("h", ["<a>", "b"], [[1, 0], [0, 2]])
    assert "<a>" not in svg and "&lt;a&gt;" in svg


# ---- headless Chromium -------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "chromium is not installed: the report's rendering test needs it "
        "(Debian: apt-get install -y chromium)"
    )


def _png_stats(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the unfiltered scanlines) of an 8-bit PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        typ = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if typ == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif typ == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    return w, h, len(set(raw))


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_html: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    base = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = report_html.as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for fid in FIGURE_IDS:
        if fid == "fig-per-field":  # an extract artifact's figure, not this classify report's
            continue
        assert re.search(rf'<svg[^>]*\bid="{fid}"', dom.stdout), f"{fid} not in the rendered DOM"
    assert "Provenance chain" in dom.stdout
    png = tmp_path / "report.png"
    shot = subprocess.run(
        [*base, f"--screenshot={png}", "--window-size=1200,2400", "--hide-scrollbars", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    data = png.read_bytes()
    assert len(data) > 20_000, f"screenshot is only {len(data)} bytes"
    w, h, distinct = _png_stats(data)
    assert (w, h) == (1200, 2400)
    assert distinct > 50, f"screenshot looks blank ({distinct} distinct byte values)"
