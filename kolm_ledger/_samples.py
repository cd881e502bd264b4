"""Synthetic but well-formed receipts of every kind, for the demo, tests and benchmarks."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from datetime import datetime

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.formats.canonical import digest_hex
from kolm_ledger.formats.receipts import (
    Statement,
    artifact_statement,
    eval_statement,
    key_statement,
    label_statement,
    prediction_statement,
)

__all__ = ["sample_statement", "sample_statements"]

_INTENTS = [
    "card_arrival",
    "lost_or_stolen_card",
    "exchange_rate",
    "top_up_failed",
    "pending_transfer",
    "balance_not_updated",
]


def _h(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def sample_statement(
    kind: str, i: int, rng: random.Random, time: datetime | None = None
) -> Statement:
    """One plausible statement of ``kind`` (deterministic given ``i``, ``rng`` and ``time``;
    ``time``: the receipt's own time, default now)."""
    if kind == "label":
        label = rng.choice(_INTENTS)
        votes = {label: 4, rng.choice(_INTENTS): 1}
        return label_statement(
            input_value=f"synthetic ticket {i}: where is my card?",
            output_value=label,
            task={"name": "demo-router", "spec_digest": _h("spec")},
            teacher={
                "backend": "simulated",
                "model": "gold@0.85",
                "simulated": True,
                "params": {"temperature": 1.0},
            },
            k=5,
            votes=votes,
            sample_digests=[_h(i, s) for s in range(5)],
            verifier={"name": "label_set", "version": "1", "spec_digest": _h("verifier")},
            agreement=0.8,
            job_id=f"job-{i // 100}",
            time=time,
        )
    if kind == "eval":
        n = 200
        correct = rng.randint(150, 195)
        return eval_statement(
            artifact_digest=_h("artifact", i),
            holdout_digest=_h("holdout"),
            n=n,
            correct=correct,
            k_score=100 * correct / n,
            interval=(70.0, 95.0),
            outcome_root=_h("outcomes", i),
            teacher_k_score=88.0,
            time=time,
        )
    if kind == "artifact":
        return artifact_statement(
            artifact_digest=_h("artifact", i),
            file_name=f"router-{i}.kolm",
            file_digest=_h("file", i),
            base_model={
                "id": "sentence-transformers/all-MiniLM-L6-v2",
                "revision": "main",
                "weights_digest": _h("weights"),
            },
            training_set_root=_h("labels", i),
            label_count=1000,
            eval_receipt=_h("eval", i),
            k_score=91.5,
            verifier={"name": "label_set", "version": "1"},
            compile_config_digest=_h("config"),
            kolm_version="0.1.0",
            checkpoint={"origin": "kolm.dev/ledger", "size": i},
            time=time,
        )
    if kind == "prediction":
        out = rng.choice(_INTENTS)
        return prediction_statement(
            output_digest=digest_hex(out),
            artifact_digest=_h("artifact", i % 7),
            input_commitment=_h("commit", i),
            output=out,
            verifier_verdict={"ok": True, "verifier": "label_set"},
            backend="student",
            confidence=round(rng.random(), 4),
            latency_ms=round(rng.uniform(1, 9), 3),
            request_id=f"req-{i}",
            time=time,
        )
    if kind == "key":
        return key_statement(
            action="register",
            public_key=PrivateKey.generate().public_key(),
            role=rng.choice(["compile", "infer"]),
            time=time,
        )
    raise ValueError(kind)


def sample_statements(
    kind: str, n: int, seed: int = 0, time: datetime | None = None
) -> Iterator[Statement]:
    """``n`` statements of ``kind`` (dated ``time``, default now)."""
    rng = random.Random(f"{kind}:{seed}")
    for i in range(n):
        yield sample_statement(kind, i, rng, time)
