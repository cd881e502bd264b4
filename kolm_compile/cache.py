"""Teacher responses cached by content hash, so a resumed or repeated job never pays twice.

::

    >>> from kolm_compile.cache import CachedTeacher, TeacherCache
    >>> cache = TeacherCache("job/teacher-cache.sqlite")        # doctest: +SKIP
    >>> teacher = CachedTeacher(build_teacher(spec.teacher, spec), cache)  # doctest: +SKIP
    >>> teacher.sample("ex-1", "where is my card?", 5, spec)   # doctest: +SKIP

One SQLite file (stdlib ``sqlite3``). The key of sample ``i`` of an input is the
hex SHA-256 of the RFC 8785 canonical JSON of ``{"teacher": describe(),
"prompt": teacher.prompt(task, input), "input": input, "index": i}`` (the prompt: the
chat messages, with the ``response_format`` when the openai backend sends one for an
extract task; kolm_compile.teachers.teacher_prompt): a change of model, sampling
params, endpoint, prompt wording, output schema, response format or input is a new key, and
``k`` is not part of it, so raising k from 5 to 7 buys only samples 5 and 6.

Each row holds the sample as canonical JSON and ``SHA-256(canonical {"key",
"value"})``. A read recomputes that digest and raises
:class:`~kolm_ledger.errors.VerificationError` ("teacher cache entry <key>
digest mismatch") when it differs, so an edited, corrupted or moved entry is
never used silently. (The digest is not keyed: it catches accidents and naive
edits, not someone who recomputes it; the label receipts are what is signed.)

Because entries are keyed by content, one cache may serve many jobs: ``kolm compile
run`` uses a per-user cache (:func:`default_teacher_cache`, or ``--teacher-cache PATH``),
so a new job (another spec, a fixed CSV row) asks the teacher only for the samples no
earlier job bought.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import rfc8785

from kolm_compile.teachers import (
    InputRejected,
    PromptTask,
    SampleRequest,
    Teacher,
    TeacherSample,
    TeacherSpend,
    teacher_prompt,
)
from kolm_ledger.errors import FormatError, StorageError, VerificationError

__all__ = ["CachedTeacher", "TeacherCache", "cache_key", "default_teacher_cache"]


def default_teacher_cache() -> Path:
    """The per-user teacher cache of ``kolm compile run``: ``$KOLM_TEACHER_CACHE``, else
    ``$XDG_CACHE_HOME/kolm/teacher-cache.sqlite`` (``~/.cache`` when unset)."""
    explicit = os.environ.get("KOLM_TEACHER_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kolm" / "teacher-cache.sqlite"


_SCHEMA_VERSION = 1


def cache_key(teacher: Mapping[str, Any], prompt: Any, input_text: str, index: int) -> str:
    """Hex SHA-256 of canonical ``{teacher, prompt, input, index}`` (see the module docstring)."""
    body = {"index": index, "input": input_text, "prompt": prompt, "teacher": dict(teacher)}
    return hashlib.sha256(rfc8785.dumps(body)).hexdigest()


def _entry_digest(key: str, value: Mapping[str, Any]) -> str:
    return hashlib.sha256(rfc8785.dumps({"key": key, "value": dict(value)})).hexdigest()


class TeacherCache:
    """A SQLite file of teacher samples, each checked on read.

    Safe to share between threads (one connection behind a lock). Use as a
    context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise StorageError(
                    f"teacher cache {self.path} has schema version {version}, want {_SCHEMA_VERSION}"
                )
            self._db.execute("PRAGMA busy_timeout = 30000")  # jobs may share one cache
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS teacher_cache ("
                " key TEXT PRIMARY KEY, value TEXT NOT NULL, sha256 TEXT NOT NULL"
                ") WITHOUT ROWID"
            )
            self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as e:
            raise StorageError(f"teacher cache {self.path}: {e}") from e
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        """The value stored under ``key``, checked; ``None`` when absent.

        Raises :class:`VerificationError` naming the key when the stored digest
        does not match the stored value.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT value, sha256 FROM teacher_cache WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        text, stored = row
        try:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            digest = _entry_digest(key, value)
        except Exception as e:
            raise VerificationError(
                f"teacher cache entry {key} digest mismatch: stored value does not parse ({e})"
            ) from e
        if digest != stored:
            raise VerificationError(
                f"teacher cache entry {key} digest mismatch: stored {stored}, recomputed {digest}"
            )
        return value

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key``; an existing entry is kept (first write wins)."""
        canonical = rfc8785.dumps(dict(value)).decode("utf-8")
        digest = _entry_digest(key, value)
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO teacher_cache (key, value, sha256) VALUES (?, ?, ?)",
                (key, canonical, digest),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM teacher_cache").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CachedTeacher:
    """Wraps a teacher: samples already in the cache are served from it.

    ``describe()`` and ``backend`` are the wrapped teacher's, so receipts do not
    change with caching; served samples have ``cached=True``. Only the missing
    sample numbers are requested (one request per contiguous run), and each
    completed request is written to the cache at once, so a job that fails
    halfway keeps what it bought. ``hits`` and ``misses`` count samples.

    ``spend`` (the job's :class:`~kolm_compile.teachers.TeacherSpend`) gets every sample
    bought, unless the wrapped teacher records its own (``records_spend``).
    """

    def __init__(
        self, teacher: Teacher, cache: TeacherCache, *, spend: TeacherSpend | None = None
    ) -> None:
        self.teacher = teacher
        self.cache = cache
        self.spend = None if getattr(teacher, "records_spend", False) else spend
        self.backend = teacher.backend
        self._description = teacher.describe()
        self.hits = 0
        self.misses = 0
        self._count_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """The wrapped teacher's description."""
        return self.teacher.describe()

    def sample(
        self, prompt_id: str, input_text: str, k: int, task: PromptTask, *, first_index: int = 0
    ) -> list[TeacherSample]:
        """Like the wrapped teacher's ``sample``, through the cache."""
        return self.sample_many([SampleRequest(prompt_id, input_text, k, first_index)], task)[0]

    def sample_many(
        self,
        requests: Sequence[SampleRequest],
        task: PromptTask,
        *,
        on_result: Callable[[int, list[TeacherSample]], None] | None = None,
        on_error: Callable[[int, InputRejected], None] | None = None,
    ) -> list[list[TeacherSample]]:
        """Like the wrapped teacher's ``sample_many``, through the cache (an input the
        teacher rejected goes to ``on_error`` once, with the samples the cache had)."""
        results: list[list[TeacherSample | None]] = []
        keys: list[list[str]] = []
        missing: list[tuple[int, SampleRequest]] = []  # (request number, sub-request)
        for n, r in enumerate(requests):
            prompt = teacher_prompt(self.teacher, task, r.input_text)
            row_keys = [
                cache_key(self._description, prompt, r.input_text, i)
                for i in range(r.first_index, r.first_index + r.k)
            ]
            row: list[TeacherSample | None] = []
            for key in row_keys:
                value = self.cache.get(key)
                row.append(None if value is None else _from_cache(key, value))
            keys.append(row_keys)
            results.append(row)
            run_start = None
            for j in range(r.k + 1):
                absent = j < r.k and row[j] is None
                if absent and run_start is None:
                    run_start = j
                elif not absent and run_start is not None:
                    missing.append(
                        (
                            n,
                            SampleRequest(
                                r.prompt_id, r.input_text, j - run_start, r.first_index + run_start
                            ),
                        )
                    )
                    run_start = None
        hits = sum(s is not None for row in results for s in row)
        with self._count_lock:
            self.hits += hits

        pending = [sum(s is None for s in row) for row in results]
        done_lock = threading.Lock()

        def finish(n: int) -> None:
            if on_result is not None:
                on_result(n, [s for s in results[n] if s is not None])

        stored: set[int] = set()

        def store(m: int, samples: list[TeacherSample]) -> None:
            with done_lock:
                if m in stored:
                    return
                stored.add(m)
            n, sub = missing[m]
            first = requests[n].first_index
            for offset, sample in enumerate(samples[: sub.k]):
                j = sub.first_index - first + offset
                self.cache.put(keys[n][j], sample.to_dict())
                results[n][j] = sample
            with done_lock:
                pending[n] -= sub.k
                complete = pending[n] <= 0
            with self._count_lock:
                self.misses += len(samples)
            if self.spend is not None and samples:
                self.spend.add_samples(samples[: sub.k])
            if complete:
                finish(n)

        reported: set[int] = set()

        def error(m: int, e: InputRejected) -> None:
            n = missing[m][0]
            with done_lock:
                if n in reported:
                    return
                reported.add(n)
            assert on_error is not None
            on_error(n, e)

        for n, count in enumerate(pending):
            if count == 0:
                finish(n)
        if missing:
            subs = [sub for _, sub in missing]
            if on_error is None:
                fetched = self.teacher.sample_many(subs, task, on_result=store)
            else:
                fetched = self.teacher.sample_many(subs, task, on_result=store, on_error=error)
            for m, samples in enumerate(fetched):  # for a teacher that skipped on_result
                store(m, samples)
        return [[s for s in row if s is not None] for row in results]

    def close(self) -> None:
        """Close the wrapped teacher (the cache belongs to the caller)."""
        close = getattr(self.teacher, "close", None)
        if close is not None:
            close()


def _from_cache(key: str, value: Mapping[str, Any]) -> TeacherSample:
    try:
        return TeacherSample.from_dict(value, cached=True)
    except FormatError as e:
        raise VerificationError(f"teacher cache entry {key} holds no valid sample: {e}") from e
