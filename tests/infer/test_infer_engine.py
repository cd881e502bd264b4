"""The inference engine: micro-batching, escape hatch, registry (no gRPC).

Also home of the shared test world (imported by test_infer_service.py): one tiny
real student trained once per session on 4 Banking77 labels x 16 examples (the
sample the repository ships in tests/data/banking77), packed
into real signed ``.kolm`` artifacts whose ``eval`` and ``artifact`` receipts are
appended to a real ledger service running in a thread (SQLite).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.data import banking77
from support.receipts import artifact_statement
from support.servers import LedgerThread

from kolm_ledger.formats.canonical import digest_hex
from kolm_ledger.formats.receipts import eval_statement, sign_statement
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys
from kolm_ledger.service.client import LedgerClient

pytestmark = [pytest.mark.ml, pytest.mark.slow]

LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]
PER_LABEL = 16
JOB = "job-infer-test"


def rows(split: str, per_label: int, skip: int = 0) -> list[tuple[str, str]]:
    """``per_label`` (text, label) rows of each of LABELS, after skipping ``skip`` of each."""
    seen: dict[str, int] = {}
    out = []
    for text, y in banking77(split):
        if y in LABELS:
            seen[y] = seen.get(y, 0) + 1
            if skip < seen[y] <= skip + per_label:
                out.append((text, y))
    assert all(seen.get(y, 0) >= skip + per_label for y in LABELS), (split, seen)
    return out


# --------------------------------------------------------------------------- a ledger thread


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """Keys, a running ledger, a trained adapter, and a factory of real artifacts."""

    root: Path
    keys: Path
    trust: TrustRoot
    ledger: LedgerThread
    adapter: Path
    holdout: list[tuple[str, str]]
    k_score: float
    artifacts: dict[str, Path] = field(default_factory=dict)

    def key(self, role: str) -> PrivateKey:
        return PrivateKey.load(self.keys / f"{role}.key")

    def build(
        self,
        name: str,
        *,
        threshold: float = 0.0,
        verifier_labels: list[str] | None = None,
        key: PrivateKey | None = None,
        log_to: LedgerThread | str | None = "default",
        out_dir: Path | None = None,
        gate: tuple[Path, dict[str, Any]] | None = None,
    ) -> tuple[Path, str]:
        """Pack a real artifact and (unless ``log_to=None``) log its receipts.

        ``gate``: a folder holding ``gate/`` (written by ``kolm_compile.gate.build``) and the
        manifest's ``gate`` object, packed in."""
        from kolm_compile.artifact import pack

        d = self.root / "build" / name
        shutil.rmtree(d, ignore_errors=True)
        (d / "adapter").parent.mkdir(parents=True)
        shutil.copytree(self.adapter, d / "adapter")
        verifier = {
            "name": "label_set",
            "version": "1",
            "params": {"labels": verifier_labels or LABELS},
        }
        task = {"name": name, "task": "classify", "labels": LABELS}
        manifest = {
            "format": "kolm/v1",
            "name": name,
            "task_type": "classify",
            "labels": LABELS,
            "base_model": {
                "id": "sentence-transformers/all-MiniLM-L6-v2",
                "revision": "test",
                "weights_digest": "0" * 64,
            },
            "adapter": "adapter",
            "max_length": 32,
            "confidence_threshold": threshold,
            "verifier": verifier,
            "spec_digest": digest_hex(task),
            "job_id": JOB,
            "kolm_version": "0.1.0",
        }
        if gate is not None:
            shutil.copytree(gate[0] / "gate", d / "gate")
            manifest["gate"] = gate[1]
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (d / "task.json").write_text(json.dumps(task, sort_keys=True) + "\n")
        (d / "verifier.json").write_text(json.dumps(verifier, sort_keys=True) + "\n")
        out = (out_dir or self.root / "artifacts") / f"{name}.kolm"
        out.parent.mkdir(parents=True, exist_ok=True)
        digest = pack(d, out, key or self.key("compile"))
        ledger = self.ledger if log_to == "default" else log_to
        if ledger is not None:
            assert isinstance(ledger, LedgerThread)
            self.log_artifact(ledger, out, digest, verifier)
        return out, digest

    def log_artifact(
        self, ledger: LedgerThread, path: Path, digest: str, verifier: dict[str, Any]
    ) -> None:

        ck = self.key("compile")
        n = len(self.holdout)
        correct = round(self.k_score * n / 100)
        ev = sign_statement(
            eval_statement(
                artifact_digest=digest,
                holdout_digest="1" * 64,
                n=n,
                correct=correct,
                k_score=self.k_score,
                interval=(max(0.0, self.k_score - 20), min(100.0, self.k_score + 10)),
                outcome_root="2" * 64,
                teacher_k_score=None,
                extra={"job_id": JOB},
            ),
            ck,
        )
        # the eval's leaf hash binds its integration time (log format v2): log it first
        with LedgerClient(ledger.target) as c:
            ev_leaf = c.append(ev, wait=True).leaf_hash
        art = sign_statement(
            artifact_statement(
                file=path,
                artifact_digest=digest,
                base_model={"id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "test"},
                label_count=PER_LABEL * len(LABELS),
                eval_receipt=ev_leaf.hex(),
                k_score=self.k_score,
                verifier=verifier,
                checkpoint={"size": 0},
                extra={"job_id": JOB},
            ),
            ck,
        )
        with LedgerClient(ledger.target) as c:
            c.append(art, wait=True)


_WORLD: World | None = None
_LOCK = threading.Lock()


def _build_world(root: Path) -> World:
    from kolm_compile._train import TrainConfig, train_classifier
    from kolm_compile.student import Student

    keys = root / "keys"
    trust = init_keys(keys)
    ledger = LedgerThread(
        f"sqlite:///{root / 'ledger.db'}", trust, PrivateKey.load(keys / "log.key")
    )
    train = rows("train", PER_LABEL)
    cfg = TrainConfig(epochs=4, batch_size=16, max_length=32, seed=0, threads=1)
    res = train_classifier(
        [t for t, _ in train], [y for _, y in train], LABELS, cfg, root / "adapter"
    )
    assert res.losses[-1] < res.losses[0], "the student did not learn"
    holdout = rows("test", 6)
    student = res.student or Student.load(res.adapter_dir)
    preds = student.predict([t for t, _ in holdout])
    correct = sum(p == y for (p, _), (_, y) in zip(preds, holdout, strict=True))
    k = 100 * correct / len(holdout)
    assert k > 100 / len(LABELS), f"K-score {k} is no better than chance"
    w = World(root, keys, trust, ledger, res.adapter_dir, holdout, k)
    w.artifacts["router"] = w.build("router")[0]
    return w


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The session's world (built once even when several modules import this fixture)."""
    global _WORLD
    with _LOCK:
        if _WORLD is None:
            _WORLD = _build_world(tmp_path_factory.mktemp("infer-world"))
    yield _WORLD


# --------------------------------------------------------------------------- a fake teacher


class FakeTeacher:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 answering ``answer``."""

    def __init__(self, answer: str = "card_arrival") -> None:
        self.answer = answer
        self.calls = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls += 1
                n = body.get("n", 1)
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": i,
                                "message": {"role": "assistant", "content": fake.answer},
                                "finish_reason": "stop",
                            }
                            for i in range(n)
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": n},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def spec_file(self, d: Path) -> Path:
        """A task spec YAML (JSON is YAML) whose teacher is this server."""
        d.mkdir(parents=True, exist_ok=True)
        (d / "unlabeled.jsonl").write_text(json.dumps({"text": "x", "label": LABELS[0]}) + "\n")
        spec = {
            "name": "router",
            "task": "classify",
            "labels": LABELS,
            "teacher": {
                "backend": "openai",
                "model": "gpt-test",
                "endpoint": self.url,
                "max_retries": 0,
                "timeout_s": 5,
            },
            "data": {"unlabeled": "unlabeled.jsonl"},
        }
        p = d / "teacher.yaml"
        p.write_text(json.dumps(spec))
        return p

    def build(self, d: Path) -> tuple[Any, Any]:
        from kolm_compile.spec import TaskSpec
        from kolm_compile.teachers import build_teacher

        task = TaskSpec.load(self.spec_file(d))
        return build_teacher(task.teacher, task), task

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_teacher() -> Iterator[FakeTeacher]:
    t = FakeTeacher()
    try:
        yield t
    finally:
        t.close()


# --------------------------------------------------------------------------- tampering helpers


def rezip(src: Path, out: Path, edit: Callable[[Path], None]) -> Path:
    """Unzip ``src``, apply ``edit`` to the top folder, zip again (no re-signing)."""
    tmp = out.with_suffix(".d")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(src) as z:
        z.extractall(tmp)
    (top,) = list(tmp.iterdir())
    edit(top)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(top.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(tmp).as_posix())
    shutil.rmtree(tmp)
    return out


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- engine tests


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def engine_for(world: World, **kw: Any) -> Any:
    from kolm_infer.engine import Engine

    return Engine(world.trust, LedgerClient(world.ledger.target), **kw)


def test_load_verifies_and_registers_by_name_and_digest(world: World) -> None:
    async def main() -> None:
        eng = engine_for(world)
        try:
            art = await asyncio.to_thread(eng.load, world.artifacts["router"])
            assert eng.get("router") is art and eng.get(art.digest) is art
            assert art.k_score == pytest.approx(world.k_score)
            assert art.labels == LABELS
            # loading the same artifact again is a no-op
            assert await asyncio.to_thread(eng.load, world.artifacts["router"]) is art
            _, p = await eng.predict("router", "I am still waiting on my card?")
            assert (p.backend, p.reason, p.verified) == ("student", "confident", True)
            assert p.output in LABELS and 0 < p.confidence <= 1
            assert p.verdict["name"] == "label_set" and p.verdict["ok"] is True
            await eng.unload("router")
            with pytest.raises(Exception, match="no artifact named"):
                eng.get("router")
        finally:
            await eng.close()

    run(main())


def test_micro_batching_batches_concurrent_requests(world: World) -> None:
    texts = [t for t, _ in world.holdout]

    async def main() -> dict[int, int]:
        eng = engine_for(world, max_batch=16, max_wait_ms=5)
        try:
            await asyncio.to_thread(eng.load, world.artifacts["router"])
            res = await asyncio.gather(*(eng.predict("router", t) for t in texts * 2))
            assert len(res) == 2 * len(texts)
            # same input, same answer, whatever batch it landed in
            outs = [p.output for _, p in res]
            assert outs[: len(texts)] == outs[len(texts) :]
            return dict(eng.batch_sizes)
        finally:
            await eng.close()

    sizes = run(main())
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 16
    assert sum(n * c for n, c in sizes.items()) == 2 * len(texts)


def test_escape_hatch_goes_to_the_teacher(world: World, fake_teacher: FakeTeacher) -> None:
    strict, _ = world.build("strict", threshold=1.0)
    narrow, _ = world.build("narrow", verifier_labels=LABELS[1:])
    teacher, task = fake_teacher.build(world.root / "teacher")

    async def main() -> None:
        eng = engine_for(world, teacher=teacher, teacher_task=task)
        try:
            await asyncio.to_thread(eng.load, strict)
            await asyncio.to_thread(eng.load, narrow)
            _, p = await eng.predict("strict", "I am still waiting on my card?")
            assert (p.backend, p.reason, p.output, p.verified) == (
                "teacher",
                "low_confidence",
                "card_arrival",
                True,
            )
            assert p.teacher == {"backend": "openai", "model": "gpt-test"}
            # the student says card_arrival, which the narrow verifier refuses
            _, p = await eng.predict("narrow", "I am still waiting on my card?")
            assert (p.backend, p.reason) == ("teacher", "verifier_failed")
            # the teacher's answer is refused too: returned, marked unverified
            assert p.output == "card_arrival" and p.verified is False
        finally:
            await eng.close()
        assert fake_teacher.calls == 2

    run(main())


def test_without_a_teacher_the_answer_is_marked_unverified(world: World) -> None:
    strict = world.root / "artifacts" / "strict.kolm"
    if not strict.exists():
        strict, _ = world.build("strict", threshold=1.0)

    async def main() -> None:
        eng = engine_for(world, on_teacher_failure="student")
        try:
            await asyncio.to_thread(eng.load, strict)
            _, p = await eng.predict("strict", "I am still waiting on my card?")
            assert (p.backend, p.reason, p.verified) == ("student", "teacher_unavailable", False)
            assert p.gate is not None and p.gate["routed"] == "low_confidence"
        finally:
            await eng.close()

    run(main())


def test_engine_refuses_a_tampered_artifact(world: World, tmp_path: Path) -> None:
    from kolm_ledger.errors import ArtifactError

    bad = rezip(
        world.artifacts["router"],
        tmp_path / "bad.kolm",
        lambda top: flip_byte(top / "adapter" / "adapter_model.safetensors"),
    )
    eng = engine_for(world)
    try:
        with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors has digest"):
            eng.load(bad)
        assert eng.list() == []
    finally:
        run(eng.close())


def test_parallel_loads_of_one_artifact_share_one_unpacked_copy(
    world: World, tmp_path: Path
) -> None:
    """Six loads of one artifact at once: one object, one copy in the work folder (the
    issue's six parallel LoadArtifact calls each unpacked their own); unload removes it."""
    from concurrent.futures import ThreadPoolExecutor

    work = tmp_path / "work"
    eng = engine_for(world, workdir=work)
    peak = [0]
    done = threading.Event()

    def watch() -> None:  # the most bytes unpacked at any moment
        while not done.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], sum(f.stat().st_size for f in work.rglob("*")))
            done.wait(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            arts = list(pool.map(lambda _: eng.load(world.artifacts["router"]), range(6)))
        done.set()
        watcher.join()
        assert all(a is arts[0] for a in arts)
        assert [p.name for p in work.iterdir()] == [arts[0].digest]
        one_copy = sum(f.stat().st_size for f in work.rglob("*"))
        assert peak[0] <= one_copy, (peak[0], one_copy)  # never a second copy
        assert arts[0].directory == work / arts[0].digest / "router"
        run(eng.unload("router"))
        assert list(work.iterdir()) == []
    finally:
        run(eng.close())


def test_a_refused_load_leaves_nothing_on_disk(world: World, tmp_path: Path) -> None:
    from kolm_ledger.errors import ArtifactError

    work = tmp_path / "work"
    eng = engine_for(world, workdir=work)
    unlogged, _ = world.build("unlogged-disk", threshold=0.3, log_to=None, out_dir=tmp_path)
    tampered = rezip(
        world.artifacts["router"],
        tmp_path / "bad.kolm",
        lambda top: flip_byte(top / "adapter" / "adapter_model.safetensors"),
    )
    try:
        for bad, why in ((unlogged, "no artifact receipt"), (tampered, "has digest")):
            with pytest.raises(ArtifactError, match=why):
                eng.load(bad)
            assert list(work.iterdir()) == []
    finally:
        run(eng.close())
