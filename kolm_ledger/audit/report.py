"""``kolm report``: a self-contained HTML audit report of one artifact.

Everything shown is recomputed from the ledger's receipts on the reader's side:

1. the provenance chain artifact → eval → labels, checked by
   :func:`kolm_ledger.audit.provenance.check_provenance` (leaf hashes, signatures and key
   roles, the K-score from ``correct / n``, the training-set Merkle root);
2. the K-score with its 95% interval next to the teacher's on the same holdout;
3. label acceptance (from the artifact receipt's extra fields when it carries them, and
   the label receipts found): the counts, the acceptance rate on its own 0–100 % scale,
   the rejected inputs by reason, and the vote distribution (each label receipt's
   ``votes`` and ``agreement``); the cost comparison (teacher vs student per call, and
   after how many calls the student pays back what its labels cost) as a table;
4. per-label precision / recall and the confusion matrix, when the eval receipt carries
   ``per_label`` and ``confusion`` (rows: reference label, columns: predicted); for an
   ``extract`` or ``generate`` artifact, its ``task_metrics`` instead: the per-field
   precision/recall/F1 table (JSON Pointers) and the schema-valid share, or the pass
   rate, exact match and BLEU;
5. receipt volume over time, by kind;
6. the verdict of a whole-ledger audit (:func:`kolm_ledger.audit.auditor.audit` for a database,
   :func:`kolm_ledger.audit.auditor.audit_remote` for a ledger service).

Figures are inline SVG written here; the page has no script, no external reference and a
Content-Security-Policy that forbids loading anything, so it can be archived and opened
offline. What a receipt does not carry is said, not invented.

Example::

    >>> from kolm_ledger.audit.report import svg_bars
    >>> svg_bars("fig-x", [("a", 1.0), ("b", 3.0)]).startswith('<svg id="fig-x"')
    True
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kolm_ledger.audit.auditor import AuditReport
from kolm_ledger.audit.provenance import ProvenanceReport, check_provenance
from kolm_ledger.errors import KolmError
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import REQUIRED
from kolm_ledger.keys import TrustRoot
from kolm_ledger.log.provenance import Provenance, predicate_of
from kolm_ledger.storage import Entry, Store
from kolm_ledger.verify.trust import TrustState, ledger_trust_state

if TYPE_CHECKING:
    from kolm_ledger.audit.reexec import KScoreCheck
    from kolm_ledger.service.client import LedgerClient

__all__ = [
    "FIGURE_IDS",
    "ReportData",
    "collect_from_client",
    "collect_from_store",
    "render_html",
    "svg_bars",
    "svg_heatmap",
    "svg_stacked",
]

#: every figure the report can hold (a figure is omitted, with a note, when its data is absent)
FIGURE_IDS = (
    "fig-kscore",
    "fig-acceptance",
    "fig-acceptance-rate",
    "fig-rejections",
    "fig-votes",
    "fig-label-balance",
    "fig-per-label",
    "fig-confusion",
    "fig-per-field",
    "fig-volume",
)

_PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563")
_KIND_COLOR = {
    "label": "#2563eb",
    "eval": "#16a34a",
    "artifact": "#d97706",
    "prediction": "#9333ea",
    "key": "#4b5563",
}
_BUCKETS = (
    (60, "minute"),
    (3600, "hour"),
    (86_400, "day"),
    (7 * 86_400, "week"),
    (30 * 86_400, "30 days"),
    (365 * 86_400, "year"),
)


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


# ---- SVG ---------------------------------------------------------------------------------


def svg_bars(
    fig_id: str,
    items: Sequence[tuple[str, float]],
    *,
    max_value: float | None = None,
    fmt: str = "{:g}",
    whiskers: Mapping[str, tuple[float, float]] | None = None,
    colors: Sequence[str] = _PALETTE[:1],
    width: int = 640,
) -> str:
    """Horizontal bar chart: one bar per ``(label, value)``; optional interval whiskers."""
    bar_h, gap, left, right = 22, 8, 200, 70
    h = len(items) * (bar_h + gap) + gap + 18
    top = max(
        [max_value or 0.0] + [v for _, v in items] + [w[1] for w in (whiskers or {}).values()]
    )
    top = top or 1.0
    span = width - left - right
    out = [
        f'<svg id="{_e(fig_id)}" class="fig" width="{width}" height="{h}" '
        f'viewBox="0 0 {width} {h}" role="img">'
    ]
    for i, (label, v) in enumerate(items):
        y = gap + i * (bar_h + gap)
        w = max(0.0, v) / top * span
        color = colors[i % len(colors)]
        text_x = left + max(w, (whiskers or {}).get(label, (0.0, 0.0))[1] / top * span) + 4
        out.append(
            f'<text x="{left - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">'
            f"{_e(label[:32])}</text>"
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}">'
            f"<title>{_e(label)}: {_e(fmt.format(v))}</title></rect>"
            f'<text x="{text_x:.1f}" y="{y + bar_h * 0.7:.1f}">{_e(fmt.format(v))}</text>'
        )
        if whiskers and label in whiskers:
            lo, hi = whiskers[label]
            x1, x2 = left + lo / top * span, left + hi / top * span
            ym = y + bar_h / 2
            out.append(
                f'<path d="M{x1:.1f} {ym - 6}v12M{x1:.1f} {ym}H{x2:.1f}M{x2:.1f} {ym - 6}v12" '
                f'stroke="#111" stroke-width="1.5" fill="none"/>'
            )
    axis_y = h - 16
    out.append(
        f'<line x1="{left}" y1="{axis_y}" x2="{left + span}" y2="{axis_y}" stroke="#999"/>'
        f'<text x="{left}" y="{h - 2}" class="axis">0</text>'
        f'<text x="{left + span}" y="{h - 2}" class="axis" text-anchor="end">'
        f"{_e(fmt.format(top))}</text></svg>"
    )
    return "".join(out)


def svg_grouped(
    fig_id: str,
    rows: Sequence[tuple[str, Sequence[float]]],
    series: Sequence[str],
    *,
    width: int = 640,
) -> str:
    """Horizontal grouped bars of values in [0, 1]: one group per row, one bar per series."""
    bar_h, gap, left, right = 10, 10, 200, 50
    group_h = bar_h * len(series)
    h = len(rows) * (group_h + gap) + gap + 36
    span = width - left - right
    out = [
        f'<svg id="{_e(fig_id)}" class="fig" width="{width}" height="{h}" '
        f'viewBox="0 0 {width} {h}" role="img">'
    ]
    for i, (label, values) in enumerate(rows):
        y = gap + i * (group_h + gap)
        out.append(
            f'<text x="{left - 6}" y="{y + group_h * 0.7:.1f}" text-anchor="end">'
            f"{_e(label[:32])}</text>"
        )
        for j, v in enumerate(values):
            w = max(0.0, min(1.0, v)) * span
            out.append(
                f'<rect x="{left}" y="{y + j * bar_h}" width="{w:.1f}" height="{bar_h - 1}" '
                f'fill="{_PALETTE[j % len(_PALETTE)]}"><title>{_e(label)} {_e(series[j])}: '
                f"{v:.3f}</title></rect>"
            )
    ly = h - 8
    for j, name in enumerate(series):
        x = left + j * 120
        out.append(
            f'<rect x="{x}" y="{ly - 9}" width="10" height="10" fill="{_PALETTE[j % len(_PALETTE)]}"/>'
            f'<text x="{x + 14}" y="{ly}">{_e(name)}</text>'
        )
    out.append(
        f'<line x1="{left}" y1="{h - 26}" x2="{left + span}" y2="{h - 26}" stroke="#999"/>'
        f'<text x="{left + span}" y="{h - 14}" class="axis" text-anchor="end">1.0</text></svg>'
    )
    return "".join(out)


def svg_heatmap(fig_id: str, labels: Sequence[str], matrix: Sequence[Sequence[float]]) -> str:
    """Confusion-matrix heatmap: rows are reference labels, columns predicted labels."""
    n = len(labels)
    cell = max(14, min(40, 480 // max(n, 1)))
    # room for the whole label (up to 64 characters): ~6.5 px a character at the tick size
    longest = max((len(x[:64]) for x in labels), default=8)
    left = max(120, round(longest * 6.5) + 16)
    top = max(60, round(longest * 6.5 * 0.87) + 24)  # column labels are rotated -60°
    # the last rotated column label leans right by about half its length
    w, h = left + n * cell + round(longest * 6.5 * 0.5) + 10, top + n * cell + 10
    peak = max([v for row in matrix for v in row] + [1])
    out = [
        f'<svg id="{_e(fig_id)}" class="fig" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'role="img">',
        f'<text x="{left}" y="12" class="axis">predicted →</text>',
        f'<text x="4" y="{top - 4}" class="axis">reference ↓</text>',
    ]
    for j, lab in enumerate(labels):
        x = left + j * cell + cell / 2
        out.append(
            f'<text transform="translate({x:.1f},{top - 6}) rotate(-60)" class="tick">'
            f"{_e(lab[:64])}</text>"
        )
    for i, row in enumerate(matrix):
        y = top + i * cell
        out.append(
            f'<text x="{left - 4}" y="{y + cell * 0.65:.1f}" text-anchor="end" class="tick">'
            f"{_e(labels[i][:64] if i < n else '?')}</text>"
        )
        for j, v in enumerate(row[:n]):
            t = v / peak
            # white → blue; the diagonal (correct) reads as the dark stripe
            r, g, b = round(255 - t * 218), round(255 - t * 156), round(255 - t * 20)
            fg = "#fff" if t > 0.55 else "#111"
            x = left + j * cell
            out.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({r},{g},{b})" '
                f'stroke="#ddd"><title>{_e(labels[i] if i < n else "?")} → {_e(labels[j])}: '
                f"{v:g}</title></rect>"
            )
            if v and cell >= 20:
                out.append(
                    f'<text x="{x + cell / 2}" y="{y + cell * 0.65:.1f}" text-anchor="middle" '
                    f'class="cell" fill="{fg}">{v:g}</text>'
                )
    out.append("</svg>")
    return "".join(out)


def svg_stacked(
    fig_id: str,
    buckets: Sequence[tuple[str, Mapping[str, int]]],
    kinds: Sequence[str],
    *,
    width: int = 720,
) -> str:
    """Vertical stacked bars: one bar per time bucket, one colour per kind."""
    h, left, bottom, top_pad = 260, 50, 60, 24
    plot_h = h - bottom - top_pad
    n = max(len(buckets), 1)
    slot = (width - left - 10) / n
    bw = max(2.0, slot * 0.8)
    peak = max([sum(c.values()) for _, c in buckets] + [1])
    out = [
        f'<svg id="{_e(fig_id)}" class="fig" width="{width}" height="{h}" '
        f'viewBox="0 0 {width} {h}" role="img">',
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{width - 10}" y2="{top_pad + plot_h}" '
        'stroke="#999"/>',
        f'<text x="{left - 4}" y="{top_pad + 4}" text-anchor="end" class="axis">{peak}</text>',
        f'<text x="{left - 4}" y="{top_pad + plot_h}" text-anchor="end" class="axis">0</text>',
    ]
    label_every = max(1, math.ceil(n / 12))
    for i, (name, counts) in enumerate(buckets):
        x = left + i * slot + (slot - bw) / 2
        y: float = top_pad + plot_h
        for k in kinds:
            c = counts.get(k, 0)
            if not c:
                continue
            bh = c / peak * plot_h
            y -= bh
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                f'fill="{_KIND_COLOR.get(k, "#999")}"><title>{_e(name)} {_e(k)}: {c}</title></rect>'
            )
        if i % label_every == 0:
            tx = x + bw / 2
            out.append(
                f'<text transform="translate({tx:.1f},{top_pad + plot_h + 10}) rotate(35)" '
                f'class="tick">{_e(name)}</text>'
            )
    for j, k in enumerate(kinds):
        x = left + j * 110
        out.append(
            f'<rect x="{x}" y="4" width="10" height="10" fill="{_KIND_COLOR.get(k, "#999")}"/>'
            f'<text x="{x + 14}" y="13">{_e(k)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


# ---- data ---------------------------------------------------------------------------------


@dataclass
class ReportData:
    """What the report shows, gathered from one ledger."""

    artifact_digest: str
    source: str
    generated_at: datetime
    chain: ProvenanceReport
    artifact: Entry
    eval: Entry | None
    artifact_predicate: dict[str, Any]
    eval_predicate: dict[str, Any]
    label_predicates: list[dict[str, Any]]
    audit: AuditReport
    volume: list[tuple[datetime, str]] = field(default_factory=list)
    #: the K-score re-executed on a holdout (:func:`kolm_ledger.audit.reexec.verify_kscore`)
    reexec: KScoreCheck | None = None


def _signer(e: Entry) -> str:
    try:
        return Envelope.from_bytes(e.envelope).signatures[0].keyid
    except (KolmError, IndexError):
        return "?"


def _gather(
    p: Provenance,
    trust: TrustState,
    rep: AuditReport,
    entries: Iterable[Entry],
    source: str,
    now: datetime | None,
) -> ReportData:
    chain = check_provenance(p, trust)
    return ReportData(
        artifact_digest=chain.artifact_digest,
        source=source,
        generated_at=now or datetime.now(UTC),
        chain=chain,
        artifact=p.artifact,
        eval=p.eval,
        artifact_predicate=dict(predicate_of(p.artifact)),
        eval_predicate=dict(predicate_of(p.eval)) if p.eval is not None else {},
        label_predicates=[dict(predicate_of(e)) for e in p.labels],
        audit=rep,
        volume=[(e.integrated_at, e.kind) for e in entries],
    )


def collect_from_store(
    store: Store,
    artifact_digest: str,
    trust: TrustRoot,
    *,
    source: str = "",
    now: datetime | None = None,
) -> ReportData:
    """Gather a report from a ledger database (runs a full local :func:`audit`)."""
    from kolm_ledger.audit.auditor import audit
    from kolm_ledger.log.provenance import provenance

    p = provenance(store, artifact_digest, include_labels=True)
    rep = audit(store, trust)
    state = ledger_trust_state(store, trust)
    return _gather(p, state, rep, store.entries(), source or "ledger database", now)


def collect_from_client(
    client: LedgerClient, artifact_digest: str, trust: TrustRoot, *, now: datetime | None = None
) -> ReportData:
    """Gather a report from a ledger service (runs :func:`audit_remote`)."""
    from kolm_ledger.audit.auditor import audit_remote

    p = client.provenance(artifact_digest, include_labels=True)
    rep = audit_remote(client, trust)
    state = ledger_trust_state(client, trust)
    return _gather(p, state, rep, client.entries(), f"ledger service {client.target}", now)


# ---- sections -----------------------------------------------------------------------------


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _missing(what: str) -> str:
    return f'<p class="missing">{_e(what)}</p>'


def _kv(rows: Iterable[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _short(x: object, n: int = 120) -> str:
    s = x if isinstance(x, str) else json.dumps(x, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"


def _section_chain(d: ReportData) -> str:
    c = d.chain
    ok = (
        '<span class="ok">matches</span>'
        if c.claimed_root == c.recomputed_root
        else ('<span class="bad">MISMATCH</span>')
    )
    ap = d.artifact_predicate
    base = ap.get("base_model") if isinstance(ap.get("base_model"), dict) else {}
    assert isinstance(base, dict)
    items = [
        f"<li><b>artifact</b> {_e(d.artifact_digest)} — receipt at index {d.artifact.index}, "
        f"signed by key {_e(_signer(d.artifact)[:16])}; base model "
        f"{_e(base.get('id', '?'))}@{_e(base.get('revision', '?'))}; kolm "
        f"{_e(ap.get('kolm_version', '?'))}"
    ]
    if d.eval is not None:
        items.append(
            f"<li><b>eval</b> receipt at index {d.eval.index}, signed by key "
            f"{_e(_signer(d.eval)[:16])}: {c.eval_n} holdout examples, K-score "
            f"{c.k_score:.2f} recomputed from correct / n"
        )
    else:
        items.append('<li><b>eval</b> <span class="bad">no eval receipt found</span>')
    items.append(
        f"<li><b>labels</b> {c.label_count} label receipts; training-set root "
        f"<code>{_e(c.recomputed_root[:32])}…</code> recomputed, {ok} the claimed "
        f"<code>{_e(c.claimed_root[:32])}…</code>"
    )
    verdict = (
        '<p class="verdict ok">OK: provenance recomputed from the receipts</p>'
        if c.ok
        else '<p class="verdict bad">FAILED:</p><ul class="fail">'
        + "".join(f"<li>{_e(f)}" for f in c.failures[:100])
        + "</ul>"
    )
    return f'<section id="provenance"><h2>Provenance chain</h2><ol class="chain">{"".join(items)}</ol>{verdict}</section>'


def _section_kscore(d: ReportData) -> str:
    c = d.chain
    items = [("student (this artifact)", c.k_score)]
    whiskers = {"student (this artifact)": c.interval}
    if c.teacher_k_score is not None:
        items.append(("teacher, same holdout", c.teacher_k_score))
    ti = d.eval_predicate.get("teacher_interval")
    if (
        isinstance(ti, dict)
        and _num(ti.get("low")) is not None
        and _num(ti.get("high")) is not None
    ):
        whiskers["teacher, same holdout"] = (float(ti["low"]), float(ti["high"]))
    fig = svg_bars(
        "fig-kscore", items, max_value=100.0, fmt="{:.1f}", whiskers=whiskers, colors=_PALETTE[:2]
    )
    ci = (
        d.eval_predicate.get("interval")
        if isinstance(d.eval_predicate.get("interval"), dict)
        else {}
    )
    assert isinstance(ci, dict)
    text = (
        f"<p>K-score <b>{c.k_score:.2f}</b> on n = {c.eval_n} "
        f"(95% {_e(ci.get('method', 'Wilson'))} interval {c.interval[0]:.1f}–{c.interval[1]:.1f}); "
        f"teacher {'n/a' if c.teacher_k_score is None else f'{c.teacher_k_score:.2f}'}. "
        f"Metric: <code>{_e(d.eval_predicate.get('metric', '?'))}</code></p>"
    )
    return f'<section id="kscore"><h2>K-score</h2>{text}{fig}</section>'


_ACCEPT_KEYS = ("label_acceptance", "acceptance", "labels")
#: rejection codes in words (kolm_compile.voting and the pipeline's teacher_error)
_REASON_WORDS = {
    "too_few_valid": "too few valid answers",
    "no_agreement": "no agreement",
    "tie": "tie",
    "teacher_error": "teacher refused / malformed",
}


@dataclass
class _Acceptance:
    counts: list[tuple[str, float]]
    rate: float | None  # accepted / inputs, in [0, 1]
    reasons: list[tuple[str, float]]


def _acceptance(ap: Mapping[str, Any], found: int) -> _Acceptance:
    """Acceptance from the artifact receipt's extras: counts (one scale), the rate (its own
    0–100 % scale) and the rejection reasons (``rejected_reasons``, or a ``rejected``
    mapping of reason → count)."""
    counts: list[tuple[str, float]] = []
    reasons: dict[str, float] = {}
    rate: float | None = None
    d: Mapping[str, Any] = next((ap[k] for k in _ACCEPT_KEYS if isinstance(ap.get(k), dict)), {})
    for k, v in sorted(d.items()):
        if isinstance(v, dict):
            if k in ("rejected", "rejected_reasons"):
                for code, n in v.items():
                    if (x := _num(n)) is not None:
                        reasons[str(code)] = reasons.get(str(code), 0.0) + x
            continue
        if (n := _num(v)) is None:
            continue
        if "rate" in k:
            rate = n if k == "acceptance_rate" else rate
        else:
            counts.append((k, n))
    for k in ("labels_accepted", "labels_rejected", "accepted", "rejected"):
        if (n := _num(ap.get(k))) is not None:
            counts.append((k, n))
    if not any("accept" in name for name, _ in counts):
        counts.insert(0, ("accepted (label receipts found)", float(found)))
    got = dict(counts)
    if reasons and "rejected" not in got:  # rejected given only as reason → count
        counts.append(("rejected", sum(reasons.values())))
        got["rejected"] = sum(reasons.values())
    if rate is None:
        acc = got.get("accepted")
        total = got.get("sampled") or (
            acc + got["rejected"] if acc is not None and "rejected" in got else None
        )
        if acc is not None and total:
            rate = acc / total
    named = [(_REASON_WORDS.get(k, k), v) for k, v in sorted(reasons.items())]
    return _Acceptance(counts, rate, named)


def _section_labels(d: ReportData) -> str:
    labels = d.label_predicates
    parts = ['<section id="labels"><h2>Labels: acceptance and votes</h2>']
    acc = _acceptance(d.artifact_predicate, len(labels))
    parts.append("<p>Inputs and labels, counted:</p>")
    parts.append(svg_bars("fig-acceptance", acc.counts, fmt="{:g}"))
    if acc.rate is not None:
        parts.append("<p>Acceptance rate (accepted inputs / inputs sent to the teacher):</p>")
        parts.append(
            svg_bars(
                "fig-acceptance-rate",
                [("accepted", 100.0 * acc.rate)],
                max_value=100.0,
                fmt="{:.1f}%",
                colors=_PALETTE[1:2],
            )
        )
    else:
        parts.append(_missing("The artifact receipt carries no acceptance rate or counts."))
    if acc.reasons:
        parts.append("<p>Rejected inputs, by reason:</p>")
        parts.append(svg_bars("fig-rejections", acc.reasons, fmt="{:g}", colors=_PALETTE[4:5]))
    else:
        parts.append(_missing("The artifact receipt records no rejection reasons."))
    if not labels:
        parts.append(_missing("No label receipts found for this artifact's compile job."))
        parts.append("</section>")
        return "".join(parts)
    tops: Counter[str] = Counter()
    winners: Counter[str] = Counter()
    agreements: list[float] = []
    for lp in labels:
        votes = lp.get("votes") if isinstance(lp.get("votes"), dict) else {}
        assert isinstance(votes, dict)
        k = lp.get("k")
        counts = [int(v) for v in votes.values() if _num(v) is not None]
        top = max(counts, default=0)
        tops[f"{top} of {k}"] += 1
        winners[_short(lp.get("output", "?"), 40)] += 1
        if (a := _num(lp.get("agreement"))) is not None:
            agreements.append(a)
    mean = sum(agreements) / len(agreements) if agreements else float("nan")
    parts.append(
        f"<p>{len(labels)} label receipts; mean agreement {mean:.3f} "
        f"(min {min(agreements, default=float('nan')):.2f}). Votes for the winning answer "
        "among the k teacher samples:</p>"
    )
    parts.append(svg_bars("fig-votes", sorted(tops.items(), key=lambda kv: kv[0]), fmt="{:g}"))
    parts.append("<p>Training labels by class:</p>")
    parts.append(
        svg_bars("fig-label-balance", winners.most_common(40), fmt="{:g}", colors=_PALETTE[1:2])
    )
    parts.append("</section>")
    return "".join(parts)


def _money(x: float | None, digits: int = 6) -> str:
    return "n/a" if x is None else f"${x:.{digits}f}"


def _section_cost(d: ReportData) -> str:
    """Teacher vs student per call, and the calls after which the student has paid back
    what its labels cost (a table: the numbers differ by orders of magnitude)."""
    c = d.artifact_predicate.get("cost")
    head = '<section id="cost"><h2>Cost: teacher vs student</h2>'
    if not isinstance(c, dict):
        return head + _missing("The artifact receipt carries no cost report.") + "</section>"
    t_call, t_vote = (
        _num(c.get("teacher_cost_per_call")),
        _num(c.get("teacher_cost_per_voted_answer")),
    )
    s_call = _num(c.get("student_cost_per_call"))
    paid = _num(c.get("cost_paid_by_this_job"))
    spent = paid if paid is not None else _num(c.get("estimated_cost"))
    lat, dph = _num(c.get("student_latency_ms")), _num(c.get("assumed_dollars_per_cpu_hour"))
    rows = [
        ("teacher, per sample", _money(t_call)),
        ("teacher, per voted answer (k samples)", _money(t_vote)),
        ("student, per call", _money(s_call, 9)
         + (f" ({lat:g} ms CPU at ${dph:g}/CPU-hour)" if lat is not None and dph else "")),
    ]  # fmt: skip
    if t_vote is not None and s_call:
        rows.append(("student cheaper per answer by", f"{t_vote / s_call:,.0f}×"))
    samples = c.get("teacher_samples_bought_by_this_job", c.get("teacher_calls_paid_by_this_job"))
    billed, failed = (
        c.get("teacher_requests_billed_by_this_job"),
        c.get("teacher_requests_failed_not_billed"),
    )
    if samples is not None:
        rows.append(
            ("bought by the compile job",
             f"{_e(samples)} samples"
             + (f" in {_e(billed)} billed requests ({_e(failed)} failed, not billed)"
                if billed is not None else ""))
        )  # fmt: skip
    rows.append(("the labels cost (teacher)", _money(spent, 4)))
    if spent is not None and t_vote is not None and s_call is not None and t_vote > s_call:
        calls = math.ceil(spent / (t_vote - s_call)) if spent > 0 else 0
        rows.append(("payback: answers served by the student", f"{calls:,}"))
    else:
        rows.append(("payback", "n/a (no saving per call recorded)"))
    body = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return (
        f'{head}<table class="grid" id="cost-table"><tr><th>measure</th><th>value</th></tr>'
        f"{body}</table><p>{_e(c.get('note', ''))}</p></section>"
    )


def _section_task_metrics(d: ReportData) -> str:
    """extract: the per-field precision/recall/F1 table and the schema-valid share;
    generate: pass rate, exact match and BLEU (the eval receipt's ``task_metrics``)."""
    tm = d.eval_predicate.get("task_metrics")
    if not isinstance(tm, dict):
        return ""
    parts = ['<section id="per-field"><h2>Per-field precision and recall</h2>']
    head = [
        (k, f"{v:.2f}%" if isinstance(v, int | float) and not isinstance(v, bool) else _short(v))
        for k, v in sorted(tm.items())
        if k not in ("fields", "micro")
    ]
    micro = tm.get("micro")
    if isinstance(micro, dict):
        head.append(("micro F1 (every field)", f"{(_num(micro.get('f1')) or 0.0):.4f}"))
    parts.append(_kv(head))
    fields_ = tm.get("fields")
    if isinstance(fields_, dict) and fields_:
        rows: list[tuple[str, Sequence[float]]] = []
        table = []
        for ptr, m in sorted(fields_.items()):
            if not isinstance(m, dict):
                continue
            p, r = _num(m.get("precision")) or 0.0, _num(m.get("recall")) or 0.0
            f1 = _num(m.get("f1")) or 0.0
            rows.append((str(ptr), (p, r)))
            table.append(
                f"<tr><td><code>{_e(ptr)}</code></td><td>{p:.3f}</td><td>{r:.3f}</td>"
                f"<td>{f1:.3f}</td><td>{_e(m.get('support', ''))}</td></tr>"
            )
        parts.append(svg_grouped("fig-per-field", rows, ("precision", "recall")))
        parts.append(
            '<table class="grid" id="field-table"><tr><th>field (JSON Pointer)</th>'
            "<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{''.join(table)}</table>"
        )
    parts.append("</section>")
    return "".join(parts)


def _section_eval_detail(d: ReportData) -> str:
    ep = d.eval_predicate
    if isinstance(ep.get("task_metrics"), dict) and not ep.get("per_label"):
        return _section_task_metrics(d)  # extract / generate: no labels, no confusion
    parts = ['<section id="per-label"><h2>Per-label precision and recall</h2>']
    per = ep.get("per_label")
    if isinstance(per, dict) and per:
        rows: list[tuple[str, Sequence[float]]] = []
        table = []
        for label, m in sorted(per.items()):
            if not isinstance(m, dict):
                continue
            p, r = _num(m.get("precision")) or 0.0, _num(m.get("recall")) or 0.0
            rows.append((str(label), (p, r)))
            f1, sup = _num(m.get("f1")), m.get("support")
            table.append(
                f"<tr><td>{_e(label)}</td><td>{p:.3f}</td><td>{r:.3f}</td>"
                f"<td>{'' if f1 is None else f'{f1:.3f}'}</td><td>{_e(sup if sup is not None else '')}</td></tr>"
            )
        parts.append(svg_grouped("fig-per-label", rows, ("precision", "recall")))
        parts.append(
            '<table class="grid"><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th>'
            f"<th>support</th></tr>{''.join(table)}</table>"
        )
    else:
        parts.append(_missing("The eval receipt carries no per_label metrics."))
    parts.append('</section><section id="confusion"><h2>Confusion matrix</h2>')
    conf = ep.get("confusion")
    labs = conf.get("labels") if isinstance(conf, dict) else None
    mat = conf.get("matrix") if isinstance(conf, dict) else None
    if (
        isinstance(labs, list)
        and isinstance(mat, list)
        and len(mat) == len(labs)
        and all(isinstance(r, list) and len(r) == len(labs) for r in mat)
    ):
        clean = [[_num(v) or 0.0 for v in row] for row in mat]
        parts.append(svg_heatmap("fig-confusion", [str(x) for x in labs], clean))
    elif conf is not None:
        parts.append(
            _missing(
                "The eval receipt's confusion field is malformed (want labels and a square matrix)."
            )
        )
    else:
        parts.append(_missing("The eval receipt carries no confusion matrix."))
    parts.append("</section>")
    return "".join(parts)


def svg_curve(
    fig_id: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    lo: float = 0.0,
    width: int = 640,
    height: int = 260,
) -> str:
    """Line chart of ``(x %, y %)`` series: x (coverage) from 0 to 100, y from ``lo`` to 100."""
    left, right, top, bottom = 50, 20, 10, 30
    sw, sh = width - left - right, height - top - bottom
    span = max(1e-9, 100.0 - lo)

    def xy(x: float, y: float) -> str:
        cy = min(100.0, max(lo, y))
        return f"{left + x / 100 * sw:.1f},{top + (100.0 - cy) / span * sh:.1f}"

    out = [
        f'<svg id="{_e(fig_id)}" class="fig" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">',
        f'<line x1="{left}" y1="{top + sh}" x2="{left + sw}" y2="{top + sh}" stroke="#999"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + sh}" stroke="#999"/>'
        f'<text x="{left}" y="{height - 4}" class="axis">coverage 0%</text>'
        f'<text x="{left + sw}" y="{height - 4}" class="axis" text-anchor="end">100%</text>'
        f'<text x="{left - 4}" y="{top + 10}" class="axis" text-anchor="end">100</text>'
        f'<text x="{left - 4}" y="{top + sh}" class="axis" text-anchor="end">{lo:g}</text>',
    ]
    for i, (name, pts) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        path = " ".join(xy(x, y) for x, y in pts)
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{_e(name)}</title></polyline>"
            f'<text x="{left + sw - 4}" y="{top + sh - 8 - 14 * i}" text-anchor="end" '
            f'fill="{color}">{_e(name[:40])}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _section_cover(d: ReportData) -> str:
    """The selective-prediction gate (issue 17): the cover's figures and the holdout
    risk-coverage curve, from the eval receipt's ``gate``."""
    g = d.eval_predicate.get("gate")
    parts = ['<section id="cover"><h2>Selective prediction: the cover</h2>']
    if not isinstance(g, dict):
        parts.append(_missing("The eval receipt carries no gate (compiled before issue 17)."))
        return "".join(parts) + "</section>"
    rows: list[tuple[str, object]] = [
        ("rule", g.get("rule")),
        ("target cover K-score", g.get("target_cover_k_score", "unset")),
        ("thresholds", f"prob >= {g.get('t_prob')}, kNN similarity >= {g.get('t_sim')}"),
        ("temperature, k", f"{g.get('temperature')}, {g.get('k')}"),
    ]
    for split in ("calibration", "holdout"):
        f = g.get(split)
        if isinstance(f, dict):
            iv = f.get("cover_interval")
            ivs = f" [{iv[0]}, {iv[1]}]" if isinstance(iv, list) and len(iv) == 2 else ""
            rows.append(
                (
                    split,
                    f"coverage {f.get('coverage')}% ({f.get('n_cover')} of {f.get('n')}), "
                    f"cover K-score {f.get('cover_k_score')}{ivs}, overall {f.get('k_score')}",
                )
            )
    parts.append(_kv(rows))
    h = g.get("holdout")
    curve = h.get("curve") if isinstance(h, dict) else None
    series: list[tuple[str, list[tuple[float, float]]]] = []
    if isinstance(curve, dict):
        for name, pts in sorted(curve.items()):
            if not isinstance(pts, list):
                continue
            clean = [
                (x, y)
                for p in pts
                if isinstance(p, list)
                and len(p) == 2
                and (x := _num(p[0])) is not None
                and (y := _num(p[1])) is not None
            ]
            if clean:
                series.append((f"ranked by {name}", clean))
    if series:
        lo = min(y for _, pts in series for _, y in pts)
        parts.append(
            "<p>Risk–coverage on the holdout: keeping the inputs the gate score ranks "
            "highest, the K-score of what is kept (risk = 100 − K-score).</p>"
        )
        parts.append(svg_curve("fig-risk-coverage", series, lo=max(0.0, min(90.0, lo) // 10 * 10)))
    else:
        parts.append(_missing("The eval receipt's gate carries no risk–coverage curve."))
    return "".join(parts) + "</section>"


def volume_buckets(
    volume: Sequence[tuple[datetime, str]], max_buckets: int = 40
) -> tuple[str, list[tuple[str, Counter[str]]]]:
    """Bucket ``(time, kind)`` pairs: the bucket name and ``(bucket label, counts)`` pairs."""
    if not volume:
        return "day", []
    ts = [t.timestamp() for t, _ in volume]
    lo, hi = min(ts), max(ts)
    size, name = _BUCKETS[-1]
    for s, nm in _BUCKETS:
        if (hi // s) - (lo // s) + 1 <= max_buckets:
            size, name = s, nm
            break
    first, last = int(lo // size), int(hi // size)
    counts: dict[int, Counter[str]] = {b: Counter() for b in range(first, last + 1)}
    for (_, kind), t in zip(volume, ts, strict=True):
        counts[int(t // size)][kind] += 1
    fmt = "%Y-%m-%d %H:%M" if size < 86_400 else "%Y-%m-%d"
    return name, [
        (datetime.fromtimestamp(b * size, UTC).strftime(fmt), c) for b, c in sorted(counts.items())
    ]


def _section_volume(d: ReportData) -> str:
    bucket, buckets = volume_buckets(d.volume)
    parts = ['<section id="volume"><h2>Receipt volume over time</h2>']
    if not buckets:
        parts.append(_missing("The ledger is empty."))
    else:
        kinds = sorted({k for _, k in d.volume}, key=lambda k: (k not in _KIND_COLOR, k))
        parts.append(f"<p>{len(d.volume)} entries, by {bucket} of integration time (UTC).</p>")
        parts.append(svg_stacked("fig-volume", buckets, kinds))
    parts.append("</section>")
    return "".join(parts)


def _section_audit(d: ReportData) -> str:
    r = d.audit
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.by_kind.items()))
    cp = r.newest_checkpoint
    rows: list[tuple[str, object]] = [
        ("entries", f"{r.entries} ({kinds})"),
        ("checkpoints verified", r.checkpoints),
        ("newest checkpoint", f"{cp.origin} size {cp.size} root {cp.root.hex()}" if cp else "none"),
    ]
    if r.ok:
        verdict = '<p class="verdict ok">OK: every signature, the hash chain, the Merkle tree and the checkpoints verify</p>'
    else:
        verdict = (
            f'<p class="verdict bad">FAILED: {len(r.failures)} failure(s); failing indices '
            f'{_e(r.failing_indices()[:50])}</p><ul class="fail">'
            + "".join(f"<li>{_e(f)}" for f in r.failures[:200])
            + "</ul>"
        )
    return f'<section id="audit"><h2>Ledger audit</h2>{verdict}{_kv(rows)}</section>'


def _section_reexec(d: ReportData) -> str:
    r = d.reexec
    if r is None:
        return (
            '<section id="reexec"><h2>K-score re-executed</h2><p class="missing">not '
            "re-executed (give --holdout FILE --artifact FILE.kolm)</p></section>"
        )
    cls = "ok" if r.ok else "bad"
    text = f'<p class="verdict {cls}">K-score {_e(r.verdict)}</p>'
    items = "".join(f"<li>{_e(x)}" for x in [*r.lines, *r.failures])
    return f'<section id="reexec"><h2>K-score re-executed</h2>{text}<ul>{items}</ul></section>'


def _section_claims(d: ReportData) -> str:
    ap, ep = d.artifact_predicate, d.eval_predicate
    std_a = set(REQUIRED["artifact"]) | {"time"}
    std_e = set(REQUIRED["eval"]) | {"time", "per_label", "confusion", "task_metrics"}
    rows = [(f"artifact.{k}", _short(v)) for k, v in sorted(ap.items()) if k in std_a]
    rows += [(f"artifact.{k} (extra)", _short(v)) for k, v in sorted(ap.items()) if k not in std_a]
    rows += [(f"eval.{k}", _short(v)) for k, v in sorted(ep.items()) if k not in std_e]
    return f'<section id="claims"><h2>Receipt fields</h2>{_kv(rows)}</section>'


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:980px;color:#111;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
code{font:12px ui-monospace,monospace;background:#f4f4f5;padding:0 .2em}
.meta{color:#555}.ok{color:#15803d}.bad{color:#b91c1c}
.verdict{font-weight:600;padding:.5em .8em;border-radius:4px}
.verdict.ok{background:#dcfce7}.verdict.bad{background:#fee2e2}
.missing{color:#6b7280;font-style:italic}
table{border-collapse:collapse;margin:.6em 0}td,th{padding:.15em .6em;text-align:left;vertical-align:top}
table.kv th{color:#555;font-weight:500;white-space:nowrap}table.kv td{font:12px ui-monospace,monospace;word-break:break-all}
table.grid td,table.grid th{border:1px solid #e5e7eb}
svg.fig{display:block;margin:.6em 0;font:12px system-ui,sans-serif}
svg .axis,svg .tick{fill:#555;font-size:11px}svg .cell{font-size:10px}
"""


def render_html(d: ReportData) -> str:
    """The whole report as one self-contained HTML document (no script, no external URL)."""
    title = f"kolm audit report — artifact {d.artifact_digest[:16]}"
    head = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
    )
    overall = d.chain.ok and d.audit.ok and (d.reexec is None or d.reexec.ok)
    banner = (
        '<p class="verdict ok">Verdict: provenance and ledger audit pass</p>'
        if overall
        else '<p class="verdict bad">Verdict: FAILED — see the sections below</p>'
    )
    meta = (
        f'<h1>{_e(title)}</h1><p class="meta">artifact digest <code>{_e(d.artifact_digest)}</code>'
        f"<br>source: {_e(d.source)}<br>generated {_e(d.generated_at.isoformat(timespec='seconds'))} "
        "by <code>kolm report</code>; every number below was recomputed from signed receipts "
        "against the trust root given</p>"
    )
    body = [
        meta,
        banner,
        _section_chain(d),
        _section_kscore(d),
        _section_cover(d),
        _section_reexec(d),
        _section_labels(d),
        _section_cost(d),
        _section_eval_detail(d),
        _section_volume(d),
        _section_audit(d),
        _section_claims(d),
    ]
    return head + "".join(body) + "</body></html>\n"
