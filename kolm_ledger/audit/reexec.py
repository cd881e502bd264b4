"""Re-execution by an auditor: recompute an artifact's K-score, replay one prediction.

A K-score is signed by the compile key and a prediction by the infer key; a key can sign
anything. Re-execution closes that: the student is small and CPU inference at a fixed
thread count is reproducible, so an auditor holding the ``.kolm`` runs it again.

**K-score** (:func:`verify_kscore`, ``kolm kscore verify``): given the artifact, the
holdout file and the eval receipt (from the ledger, or an offline bundle):

1. the artifact passes the one artifact check (:mod:`kolm_ledger.verify.artifact`) by a
   compile key valid at the eval receipt's time; its signed outcomes file
   (:data:`OUTCOMES_FILE`) is read;
2. the eval receipt verifies (signature, compile role, inclusion in a signed checkpoint)
   and evaluates this artifact; the published outcomes give the receipt's
   ``outcome_root``, ``n`` and ``correct``, and ``k_score`` and the Wilson interval follow
   from them;
3. the holdout's example digests give the receipt's ``holdout_digest``; when they do not,
   the first row whose digest is not the published example's is named (row numbers count
   data rows from 1; rows whose label is not one of the artifact's labels are skipped, as
   the compile's ingest stage skips them);
4. the student runs on every holdout input (the recorded thread count and batch size) and
   each example's outcome — ``verifier(output).ok and output == reference`` — is
   recomputed, then ``outcome_root``, ``n``, ``correct``, the K-score and its interval; the
   first example whose outcome is not the published one is named;
5. the environment: the recorded determinism fields (torch version, threads, dtype, batch
   size, CPU, the probe digest) against the auditor's; differences are reported, never
   hidden, and do not by themselves fail the check (labels must still match).

**Replay** (:func:`replay_prediction`, ``kolm verify ... --replay``): after
:func:`kolm_ledger.verify.receipt.verify_prediction` checked the receipt, the input commitment
and the artifact file, the student answers the input again; its output must hash to the
receipt's subject digest, and its confidence must be within :data:`REPLAY_TOLERANCE`
(absolute) of the receipt's. A confidence beyond the tolerance with the same output is an
environment difference (another torch, CPU or batch padding), not tampering. A prediction
answered by the teacher is "not replayable".

**Determinism record** (:func:`determinism_record`): what the evaluation ran on, in the
manifest's ``determinism`` and the eval receipt's ``determinism`` — ``torch`` version,
``threads``, ``dtype``, ``batch_size``, ``cpu`` and ``probe_digest``: the digest of the
student's answers on :data:`PROBE_TEXTS` (a fixed batch), which tells an auditor whether
the arithmetic here is the compile's without the holdout.

Torch-free at import: the runtime predictor (``kolm_compile.student.Student``) and the
verifiers are imported when a check runs (they need ``kolm[ml]``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import InvalidInput, KolmError, VerificationError
from kolm_ledger.formats.canonical import canonical_json, digest_hex
from kolm_ledger.formats.manifest import Manifest
from kolm_ledger.formats.merkle import root_from_leaves

if TYPE_CHECKING:
    import grpc

    from kolm_ledger.formats.bundle import Bundle
    from kolm_ledger.keys import TrustedKey, TrustRoot
    from kolm_ledger.verify.receipt import VerifiedPrediction, VerifiedReceipt

__all__ = [
    "EVAL_BATCH_SIZE",
    "OUTCOMES_FILE",
    "PROBE_ID",
    "PROBE_TEXTS",
    "REPLAY_TOLERANCE",
    "KScoreCheck",
    "ReexecStudent",
    "ReplayMismatch",
    "ReplayResult",
    "determinism_record",
    "environment_differences",
    "eval_receipt_from",
    "example_outcome",
    "holdout_root",
    "kscore_check",
    "load_student",
    "outcome_line",
    "outcomes_root",
    "probe_digest",
    "replay_prediction",
    "verify_kscore",
]

#: the signed per-example outcomes inside a ``.kolm`` (relative to its top folder)
OUTCOMES_FILE = "evaluation/outcomes.jsonl"
#: the batch size of the evaluate stage (the recorded one is used when present)
EVAL_BATCH_SIZE = 64
#: replay: |confidence - receipt confidence| at most this (absolute) counts as the same
REPLAY_TOLERANCE = 1e-4
#: the name of the fixed probe batch below; a new batch gets a new name
PROBE_ID = "kolm-probe/v1"
#: the fixed probe batch: inputs of mixed length, answered in one call at the recorded
#: batch size; the digest of the answers is :func:`probe_digest`
PROBE_TEXTS = (
    "where is my card?",
    "I was charged twice for the same payment",
    "What exchange rate do you use when I pay in another currency?",
    "my top up did not go through and the money left my account anyway, why",
    "refund",
    "The cash machine gave me less money than I asked for and still charged the full amount.",
    "how long does a transfer take to arrive",
)
_DETERMINISM_FIELDS = ("torch", "threads", "dtype", "batch_size", "cpu")


# ---------------------------------------------------------------------------- formats


def outcome_line(example: str, output: Any, correct: bool) -> bytes:
    """One line of the outcomes file (no newline): RFC 8785 of
    ``{"correct", "example", "output"}``; its SHA-256 is the example's leaf hash."""
    return canonical_json({"example": example, "output": output, "correct": bool(correct)})


def outcomes_root(lines: Sequence[bytes]) -> str:
    """Hex RFC 6962 Merkle root over ``SHA-256(line)`` of each outcome line (the eval
    receipt's ``outcome_root``)."""
    return root_from_leaves([hashlib.sha256(x).digest() for x in lines]).hex()


def holdout_root(example_digests: Sequence[str]) -> str:
    """Hex RFC 6962 Merkle root over the holdout's example digests, used directly as the
    leaf hashes (the eval receipt's ``holdout_digest``)."""
    return root_from_leaves([bytes.fromhex(d) for d in example_digests]).hex()


def example_outcome(
    verifier: Any, output: str, reference: str, *, task: str = "classify", input: str | None = None
) -> bool:
    """The K-score's per-example rule (one definition for the evaluate stage and the
    auditor): for ``classify`` and ``extract``, the output passes the verifier and its
    normalized form (the label; the RFC 8785 canonical JSON) equals the reference; for
    ``generate``, the verifier passes given the reference (exact_match, bleu, ... compare
    with it). ``input``: the holdout input, for verifiers that check the output against it
    (json_schema's ``grounded``)."""
    kw: dict[str, Any] = {"reference": reference}
    if input is not None:
        kw["input"] = input
    v = verifier.check(output, **kw)
    if task == "generate":
        return bool(v.ok)
    return bool(v.ok) and v.normalized == reference


def probe_digest(answers: Sequence[tuple[str, float]]) -> str:
    """Hex SHA-256 of RFC 8785 ``[[label, confidence], ...]`` of the answers on
    :data:`PROBE_TEXTS` (confidences as the float64 of the model's float32 value)."""
    return digest_hex([[str(y), float(c)] for y, c in answers])


def _cpu() -> str:
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor()
    return f"{platform.machine()} {name}".strip()


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def determinism_record(
    predict: Callable[[Sequence[str]], Sequence[tuple[str, float]]],
    *,
    threads: int,
    batch_size: int,
    dtype: str,
) -> dict[str, Any]:
    """What an evaluation ran on: the manifest's and the eval receipt's ``determinism``.

    ``predict`` answers a list of texts at the settings given (the caller has set the
    thread count); it is run once on :data:`PROBE_TEXTS`.
    """
    return {
        "batch_size": batch_size,
        "cpu": _cpu(),
        "dtype": dtype,
        "probe": PROBE_ID,
        "probe_digest": probe_digest(list(predict(list(PROBE_TEXTS)))),
        "threads": threads,
        "torch": _torch_version(),
    }


def environment_differences(
    recorded: Mapping[str, Any] | None, here: Mapping[str, Any]
) -> list[str]:
    """Human-readable differences between a recorded determinism record and this one."""
    if not recorded:
        return ["the artifact records no determinism settings (made by an older kolm)"]
    out = [
        f"{k}: {here.get(k)!r} here, {recorded.get(k)!r} at evaluation"
        for k in _DETERMINISM_FIELDS
        if recorded.get(k) != here.get(k)
    ]
    if recorded.get("probe") != here.get("probe"):
        out.append(f"probe batch {recorded.get('probe')!r} is not {here.get('probe')!r}")
    elif recorded.get("probe_digest") != here.get("probe_digest"):
        out.append("the probe batch's answers differ from the evaluation's (other arithmetic)")
    return out


# ---------------------------------------------------------------------------- the student


def _ml(module: str) -> Any:
    """``kolm_compile`` modules, imported only when a re-execution runs (``kolm[ml]``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise KolmError(
            f"re-execution needs the runtime predictor ({module}): install kolm[ml] ({e})"
        ) from e


@dataclass
class ReexecStudent:
    """An artifact that passed the artifact check, unpacked, with its student loaded."""

    path: Path
    digest: str
    signer: TrustedKey
    directory: Path
    manifest: Manifest
    student: Any
    verifier: Any
    threads: int
    batch_size: int
    _tmp: Path | None = None
    _environment: dict[str, Any] | None = None

    @property
    def recorded(self) -> dict[str, Any] | None:
        """The manifest's determinism record (``None`` for an older artifact)."""
        d = self.manifest.determinism
        return dict(d) if d is not None else None

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """``(label, confidence)`` per text at the recorded threads and batch size."""
        tr = _ml("kolm_compile.student")
        with tr.torch_state(self.threads, False):
            return list(self.student.predict(list(texts), batch_size=self.batch_size))

    def environment(self) -> dict[str, Any]:
        """This machine's determinism record at the settings used here (the probe runs
        once per loaded student)."""
        if self._environment is None:
            self._environment = determinism_record(
                self.predict,
                threads=self.threads,
                batch_size=self.batch_size,
                dtype=str(getattr(self.student, "dtype", "float32")),
            )
        return dict(self._environment)

    def read(self, rel: str) -> bytes:
        """A signed file of the artifact (already checked against its digest)."""
        try:
            return (self.directory / rel).read_bytes()
        except OSError as e:
            raise VerificationError(f"{self.path.name}: no signed file {rel}: {e}") from e

    def close(self) -> None:
        """Remove the unpacked copy."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def load_student(
    path: str | Path,
    keys: Sequence[TrustedKey],
    *,
    at: datetime,
    expect_digest: str | None = None,
    threads: int | None = None,
) -> ReexecStudent:
    """Check ``path`` with the one artifact check (signed by one of ``keys``' compile keys
    valid at ``at``; with ``expect_digest``, that artifact), unpack it into a temporary
    folder and load its student at the recorded settings (``threads`` overrides the
    recorded thread count). Call :meth:`ReexecStudent.close` when done."""
    from kolm_ledger.verify.artifact import open_artifact

    p = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix="kolm-reexec-"))
    try:
        with open_artifact(p, keys, at=at, expect_digest=expect_digest) as art:
            root = art.extract(tmp / "a")
            digest, signer = art.digest, art.signer
        manifest = Manifest.read(root, p.name)
        try:
            v = manifest.verifier
            if v is None:
                raise ValueError("manifest.verifier: missing")
            det = manifest.determinism or {}
            n_threads = int(threads or det.get("threads") or 1)
            batch = int(det.get("batch_size") or EVAL_BATCH_SIZE)
            if n_threads < 1 or batch < 1:
                raise ValueError("determinism threads and batch_size must be >= 1")
            adapter = root / manifest.adapter_dir
            base = root / manifest.base if manifest.base else None
        except (ValueError, TypeError) as e:
            raise VerificationError(f"{p.name}: bad manifest.json: {e}") from e
        verifier = _ml("kolm_compile.verifiers").get_verifier(v.name, dict(v.params))
        tr = _ml("kolm_compile.student")
        with tr.torch_state(n_threads, False):
            student = tr.Student.load(adapter, base_model_path=base, threads=n_threads)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReexecStudent(
        p, digest, signer, root, manifest, student, verifier, n_threads, batch, tmp
    )


# ---------------------------------------------------------------------------- K-score


@dataclass
class KScoreCheck:
    """What :func:`verify_kscore` found; ``ok`` when every recomputed value is the signed one."""

    artifact_digest: str
    eval_index: int
    claimed: dict[str, Any]
    n: int = 0
    correct: int = 0
    k_score: float = float("nan")
    interval: tuple[float, float] = (float("nan"), float("nan"))
    holdout_rows: int = 0
    holdout_matches: bool = False
    executed: bool = False
    first_difference: int | None = None  # 0-based example index
    first_difference_row: int | None = None  # 1-based data row of the holdout file
    seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)
    environment_differences: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the K-score re-executed to the signed one."""
        return self.executed and not self.failures

    @property
    def verdict(self) -> str:
        """``re-executed: matches`` / ``re-executed: differs at example i (holdout row r)``
        / ``not re-executed: <why>`` (the holdout is not the evaluated one)."""
        if self.ok:
            return "re-executed: matches"
        if not self.executed:
            return "not re-executed: " + (self.failures[0] if self.failures else "?")
        if self.first_difference is not None:
            return (
                f"re-executed: differs at example {self.first_difference} "
                f"(holdout row {self.first_difference_row})"
            )
        return "re-executed: differs: " + self.failures[0]

    def render(self) -> str:
        """The report ``kolm kscore verify`` prints."""
        out = list(self.lines)
        if self.ok:
            out.append(
                f"OK: K-score re-executed: matches the signed eval receipt "
                f"({self.k_score:.2f}, {self.correct}/{self.n})"
            )
        else:
            out.append(f"FAILED: K-score {self.verdict}")
            out += [f"  {f}" for f in self.failures]
        return "\n".join(out)


def _read_holdout(
    path: Path, text_col: str, label_col: str, task: str = "classify"
) -> list[tuple[int, str, str | None]]:
    """``(row number, text, reference)`` of a holdout file; for ``extract`` the reference is
    the RFC 8785 canonical JSON of the output object (an object in JSON Lines, JSON text in
    a CSV cell), ``None`` where it is not a JSON object."""
    tables = _ml("kolm_compile.tables")
    if task != "extract":
        rows = tables.read_table(path, text_col, label_col, "--holdout")
        return [(n, t, y) for n, (t, y) in enumerate(rows, 1)]
    out: list[tuple[int, str, str | None]] = []
    for n, row in enumerate(tables.read_rows(path), 1):
        text, y = row.get(text_col), row.get(label_col)
        if isinstance(y, str):
            try:
                y = json.loads(y)
            except ValueError:
                y = None
        ref = canonical_json(y).decode() if isinstance(y, dict) else None
        out.append((n, str(text) if text is not None else "", ref))
    return out


def _evaluated(art: ReexecStudent, task: str, ref: str | None) -> bool:
    """Whether the evaluate stage kept a holdout row with reference ``ref``: classify, a
    label of the artifact; extract, an object the schema accepts; generate, any text."""
    if ref is None:
        return False
    if task == "classify":
        return ref in set(art.manifest.labels or ())
    if task == "extract":
        return bool(art.verifier.check(ref).ok)
    return True


def _columns(art: ReexecStudent) -> tuple[str, str]:
    ev = art.manifest.evaluation
    if ev is not None:
        return ev.text_column, ev.label_column
    try:
        task = json.loads(art.read("task.json"))
        data = task.get("data") or {}
        return str(data.get("text_column", "text")), str(data.get("label_column", "label"))
    except (ValueError, AttributeError):
        return "text", "label"


def _parse_outcomes(raw: bytes, name: str) -> list[tuple[bytes, dict[str, Any]]]:
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line:
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or set(obj) != {"correct", "example", "output"}:
                raise ValueError("want an object with correct, example, output")
            if not isinstance(obj["correct"], bool) or not isinstance(obj["example"], str):
                raise ValueError("correct must be a bool and example a hex digest")
            if canonical_json(obj) != line:
                raise ValueError("not its RFC 8785 form")
        except ValueError as e:
            raise VerificationError(f"{name} line {n}: {e}") from e
        out.append((line, obj))
    return out


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def verify_kscore(
    artifact: str | Path,
    holdout: str | Path,
    eval_receipt: VerifiedReceipt,
    trust: TrustRoot,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    threads: int | None = None,
) -> KScoreCheck:
    """Steps 1-5 of the module docstring; the eval receipt was verified by the caller
    (:func:`eval_receipt_from`). Raises :class:`KolmError` only when a step cannot run
    (unreadable file, refused artifact); every difference is in the result."""
    from kolm_ledger.formats.receipts import example_digest

    t0 = time.perf_counter()
    st = eval_receipt.statement
    pred = dict(st.predicate)
    if eval_receipt.kind != "eval":
        raise VerificationError(f"the receipt is a {eval_receipt.kind!r} receipt, want 'eval'")
    subjects = st.subject_digests()
    res = KScoreCheck(subjects[0] if subjects else "", eval_receipt.index, pred)
    fails, lines = res.failures, res.lines
    # (1) the artifact, by a compile key valid when it was evaluated
    art = load_student(artifact, trust.by_role("compile"), at=eval_receipt.time, threads=threads)
    try:
        res.artifact_digest = art.digest
        if art.digest not in subjects:
            raise VerificationError(
                f"the eval receipt at index {eval_receipt.index} evaluates "
                f"{', '.join(s[:16] + '…' for s in subjects)}, not artifact {art.digest[:16]}…"
            )
        published = _parse_outcomes(art.read(OUTCOMES_FILE), OUTCOMES_FILE)
        lines.append(
            f"(1) artifact {art.path.name}: {art.digest[:16]}…, signed by compile key "
            f"{art.signer.keyid[:16]}; {OUTCOMES_FILE}: {len(published)} examples"
        )
        # (2) the eval receipt and the published outcomes agree
        c_n, c_correct, c_score = pred.get("n"), pred.get("correct"), _num(pred.get("k_score"))
        iv = pred.get("interval") if isinstance(pred.get("interval"), Mapping) else {}
        assert isinstance(iv, Mapping)
        lines.append(
            f"(2) eval receipt at index {eval_receipt.index} signed by compile key "
            f"{eval_receipt.keyid[:16]}, in checkpoint size {eval_receipt.checkpoint.size}: "
            f"K-score {c_score} ({c_correct}/{c_n}), 95% [{iv.get('low')}, {iv.get('high')}]"
        )
        pub_root = outcomes_root([x for x, _ in published])
        if pub_root != pred.get("outcome_root"):
            fails.append(
                f"{OUTCOMES_FILE}: root {pub_root[:16]}… is not the eval receipt's "
                f"outcome_root {str(pred.get('outcome_root'))[:16]}…"
            )
        pub_correct = sum(o["correct"] for _, o in published)
        if (len(published), pub_correct) != (c_n, c_correct):
            fails.append(
                f"{OUTCOMES_FILE}: {pub_correct}/{len(published)} correct, the eval receipt "
                f"says {c_correct}/{c_n}"
            )
        # (3) the holdout
        tc, lc = _columns(art)
        tc, lc = text_column or tc, label_column or lc
        task = art.manifest.task_type or "classify"
        rows = [
            (n, t, y)
            for n, t, y in _read_holdout(Path(holdout), tc, lc, task)
            if _evaluated(art, task, y)
        ]
        res.holdout_rows = len(rows)
        digests = [example_digest(t, y) for _, t, y in rows]
        want_ex = [o["example"] for _, o in published]
        if holdout_root(digests) == pred.get("holdout_digest"):
            res.holdout_matches = True
            lines.append(
                f"(3) holdout {Path(holdout).name}: {len(rows)} rows (columns {tc!r}, {lc!r}); "
                f"root matches holdout_digest"
            )
        else:
            i = next(
                (i for i, (a, b) in enumerate(zip(digests, want_ex, strict=False)) if a != b),
                None,
            )
            if i is not None:
                msg = (
                    f"holdout row {rows[i][0]} (example {i}) is not the evaluated example: its "
                    f"digest {digests[i][:16]}…, the evaluation's {want_ex[i][:16]}…"
                )
                res.first_difference, res.first_difference_row = i, rows[i][0]
            elif len(digests) != len(want_ex):
                msg = (
                    f"the holdout has {len(digests)} rows with the artifact's labels, the "
                    f"evaluation had {len(want_ex)}"
                )
            else:
                msg = "the published examples do not give the eval receipt's holdout_digest"
            lines.append(f"(3) holdout {Path(holdout).name}: {msg}")
            fails.append(msg)
            return res
        # (4) re-execute
        answers = art.predict([t for _, t, _ in rows])
        outcomes = [
            example_outcome(art.verifier, y_hat, str(y), task=task, input=t)
            for (y_hat, _), (_, t, y) in zip(answers, rows, strict=True)
        ]
        mine = [
            outcome_line(d, y_hat, o)
            for d, (y_hat, _), o in zip(digests, answers, outcomes, strict=True)
        ]
        res.executed = True
        ks = _ml("kolm_compile.kscore").kscore(outcomes)
        res.n, res.correct, res.k_score = ks.n, ks.correct, ks.score
        res.interval = (ks.low, ks.high)
        res.seconds = time.perf_counter() - t0
        lines.append(
            f"(4) re-executed {ks.n} examples ({art.threads} threads, batch {art.batch_size}): "
            f"{ks.correct} correct, K-score {ks.score:.4f}, 95% [{ks.low:.4f}, {ks.high:.4f}]"
        )
        for i, (a, (b, pub)) in enumerate(zip(mine, published, strict=False)):
            if a != b:
                got = json.loads(a)
                res.first_difference, res.first_difference_row = i, rows[i][0]
                fails.append(
                    f"example {i} (holdout row {rows[i][0]}): the artifact answers "
                    f"{json.dumps(got['output'])[:80]} (correct: {str(got['correct']).lower()}), "
                    f"the published outcome is {json.dumps(pub['output'])[:80]} "
                    f"(correct: {str(pub['correct']).lower()})"
                )
                break
        root = outcomes_root(mine)
        if root != pred.get("outcome_root"):
            fails.append(
                f"outcome_root {root[:16]}… recomputed, the eval receipt says "
                f"{str(pred.get('outcome_root'))[:16]}…"
            )
        for name, have, claimed in (
            ("n", ks.n, c_n),
            ("correct", ks.correct, c_correct),
            ("k_score", ks.score, c_score),
            ("interval.low", ks.low, _num(iv.get("low"))),
            ("interval.high", ks.high, _num(iv.get("high"))),
        ):
            same = (
                claimed is not None
                and not isinstance(claimed, bool)
                and isinstance(claimed, int | float)
                and math.isclose(float(have), float(claimed), rel_tol=0, abs_tol=1e-9)
            )
            if not same:
                fails.append(f"{name}: {have} recomputed, the eval receipt says {claimed}")
        # (5) the environment
        res.environment = art.environment()
        recorded = pred.get("determinism")
        recorded = recorded if isinstance(recorded, Mapping) else art.recorded
        res.environment_differences = environment_differences(recorded, res.environment)
        if res.environment_differences:
            lines.append(
                "(5) environment differs from the evaluation's (labels must match all the "
                "same): " + "; ".join(res.environment_differences)
            )
        else:
            lines.append(
                f"(5) environment: the evaluation's (torch {res.environment['torch']}, "
                f"{res.environment['threads']} threads, {res.environment['dtype']}, batch "
                f"{res.environment['batch_size']}; probe digest matches)"
            )
        res.seconds = time.perf_counter() - t0
        return res
    finally:
        art.close()


def eval_receipt_from(
    artifact_digest: str, *, store: Any = None, client: Any = None
) -> tuple[Bundle, int]:
    """The bundle of the eval receipt the artifact receipt names (its ``eval_receipt``
    leaf hash), from a ledger database (``store``) or service (``client``)."""
    from kolm_ledger.errors import NotFoundError

    if client is not None:
        p = client.provenance(artifact_digest, include_labels=False)
    else:
        from kolm_ledger.log.provenance import provenance

        p = provenance(store, artifact_digest, include_labels=False)
    if p.eval is None:
        raise NotFoundError(f"the ledger has no eval receipt for artifact {artifact_digest[:16]}…")
    if client is not None:
        return client.bundle(index=p.eval.index), p.eval.index
    from kolm_ledger.formats.bundle import Bundle

    return Bundle.from_store(store, p.eval.index), p.eval.index


# ---------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class ReplayResult:
    """The replay step: ``status`` is ``matches``, ``environment`` (same output, confidence
    beyond the tolerance) or ``teacher`` (not replayable)."""

    status: str
    output: Any = None
    confidence: float | None = None
    receipt_confidence: float | None = None
    tolerance: float = REPLAY_TOLERANCE
    environment_differences: tuple[str, ...] = ()
    seconds: float = 0.0

    def render(self) -> str:
        """The ``(replay)`` line of ``kolm verify``."""
        if self.status == "teacher":
            return "(replay) not replayable: answered by the teacher"
        delta = (
            abs(self.confidence - self.receipt_confidence)
            if self.confidence is not None and self.receipt_confidence is not None
            else None
        )
        out = json.dumps(self.output)[:80]
        env = (
            "; environment: " + "; ".join(self.environment_differences)
            if self.environment_differences
            else "; environment: the evaluation's (probe digest matches)"
        )
        if delta is None:
            return (
                f"(replay) the student answers {out} again, confidence {self.confidence:.6f}; "
                f"the receipt records no confidence to compare{env}"
            )
        if self.status == "matches":
            return (
                f"(replay) the student answers {out} again, confidence {self.confidence:.6f} "
                f"(receipt {self.receipt_confidence}, within {self.tolerance:g}){env}"
            )
        return (
            f"(replay) the student answers {out} again; confidence {self.confidence:.6f} "
            f"differs from the receipt's {self.receipt_confidence} by {delta:.2e} > "
            f"{self.tolerance:g}: an environment difference, not tampering{env}"
        )


class ReplayMismatch(VerificationError):
    """The replay step failed: the student's output is not the receipt's (``kolm verify``
    prints ``FAILED at step replay``)."""


def _replay_error(msg: str) -> ReplayMismatch:
    return ReplayMismatch(msg)


def replay_prediction(
    prediction: VerifiedPrediction,
    artifact: str | Path | ReexecStudent,
    input_value: Any,
    trust: TrustRoot,
    *,
    tolerance: float = REPLAY_TOLERANCE,
) -> ReplayResult:
    """The replay step after :func:`kolm_ledger.verify.receipt.verify_prediction` passed with the
    input checked (step 9) and the artifact file (step 10). ``artifact``: the ``.kolm``
    path, or one already loaded with :func:`load_student` (warm replay).

    Raises :class:`ReplayMismatch` when the student's output is not the receipt's; returns a :class:`ReplayResult` otherwise.
    """
    t0 = time.perf_counter()
    if not prediction.input_checked or input_value is None:
        raise InvalidInput("--replay needs the input: give --input FILE and --salt HEX")
    if not isinstance(input_value, str):
        raise InvalidInput(f"replay input is {type(input_value).__name__}, want str")
    if prediction.backend == "teacher":
        return ReplayResult("teacher", seconds=time.perf_counter() - t0)
    own = not isinstance(artifact, ReexecStudent)
    art = (
        load_student(
            Path(artifact),
            trust.by_role("compile"),
            at=prediction.receipt.time,
            expect_digest=prediction.artifact_digest,
        )
        if not isinstance(artifact, ReexecStudent)
        else artifact
    )
    try:
        if art.digest != prediction.artifact_digest:
            raise _replay_error(
                f"the artifact is {art.digest[:16]}…, the prediction names "
                f"{prediction.artifact_digest[:16]}…"
            )
        ((label, conf),) = art.predict([input_value])
        verdict = art.verifier.check(label)
        output = verdict.normalized if verdict.ok else label
        want = prediction.receipt.statement.subjects[0].sha256
        if digest_hex(output) != want:
            said = (
                json.dumps(prediction.output)[:80]
                if prediction.output is not None
                else f"output digest {want[:16]}…"
            )
            raise _replay_error(
                f"the student answers {json.dumps(output)[:80]} (confidence {conf:.6f}) for "
                f"this input; the receipt says {said}"
            )
        rc = _num(prediction.receipt.statement.predicate.get("confidence"))
        recorded = art.recorded
        env = environment_differences(recorded, art.environment())
        close = rc is None or abs(conf - rc) <= tolerance
        return ReplayResult(
            "matches" if close else "environment",
            output,
            conf,
            rc,
            tolerance,
            tuple(env),
            time.perf_counter() - t0,
        )
    finally:
        if own:
            art.close()


def kscore_check(
    artifact: str,
    holdout: str,
    trust: TrustRoot,
    *,
    eval_bundle: str | None = None,
    db: str | None = None,
    ledger: str | None = None,
    ledger_credentials: grpc.ChannelCredentials | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    threads: int | None = None,
) -> KScoreCheck:
    """Find and verify the artifact's eval receipt — from the bundle file ``eval_bundle``,
    the ledger service ``ledger`` (with ``ledger_credentials``; ``None`` is plain text) or
    the ledger database ``db`` — then run :func:`verify_kscore` (``kolm kscore verify`` and
    ``kolm report --holdout``)."""
    from kolm_ledger.errors import BundleFormatError
    from kolm_ledger.formats.bundle import Bundle
    from kolm_ledger.verify.artifact import open_artifact
    from kolm_ledger.verify.receipt import verify_bundle
    from kolm_ledger.verify.trust import ledger_trust_state

    if eval_bundle:
        try:
            bundle = Bundle.from_bytes(Path(eval_bundle).read_bytes())
        except OSError as e:
            raise BundleFormatError(f"cannot read --eval-bundle {eval_bundle}: {e}") from e
    else:

        def lookup(source: Any, **where: Any) -> tuple[TrustRoot, Bundle]:
            # keys by the ledger's trust state (trust.json plus every key receipt); the
            # artifact's digest names its receipts (read here with the keys valid now;
            # verify_kscore judges the signer at the evaluation's time)
            state = ledger_trust_state(source, trust).as_root()
            with open_artifact(artifact, state.by_role("compile"), at=datetime.now(UTC)) as art:
                digest = art.digest
            return state, eval_receipt_from(digest, **where)[0]

        if ledger:
            from kolm_ledger.service.client import LedgerClient

            with LedgerClient(ledger, credentials=ledger_credentials) as c:
                trust, bundle = lookup(c, client=c)
        elif db:
            from kolm_ledger.storage import Store

            store = Store(db, migrate=False)
            try:
                trust, bundle = lookup(store, store=store)
            finally:
                store.close()
        else:
            raise InvalidInput("the eval receipt: give a bundle file, a ledger or a database")
    receipt = verify_bundle(bundle, trust)
    return verify_kscore(
        artifact,
        holdout,
        receipt,
        trust,
        text_column=text_column,
        label_column=label_column,
        threads=threads,
    )
