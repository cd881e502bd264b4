"""The compile pipeline: a teacher becomes a signed, provable Specialist (``.kolm``).

Seven stages, each reported as :class:`StageEvent` s and each persisted in the job
folder when it finishes, so a restarted job resumes after the last finished stage::

    (1) ingest      read unlabeled inputs, seed pairs and the holdout
    (2) sample      k teacher samples per input (and per holdout input, for the
                    teacher's own K-score), through the content-hash teacher cache
    (3) vote        verify every sample, majority vote, accept or reject the input
    (4) sign        one signed ``label`` receipt per accepted label (and per seed
                    pair), appended to the ledger in batches; only acknowledged
                    labels go on
    (5) train       LoRA student on the acknowledged labels, in ledger index order
    (6) evaluate    K-score of the student on the holdout (n, Wilson interval), the
                    teacher's K-score per single sample and per k-vote, per-label P/R;
                    each example's outcome, at recorded settings (threads, batch size,
                    a probe-batch digest: :func:`kolm_ledger.audit.reexec.determinism_record`)
    (7) package     manifest.json, task.json, verifier.json, adapter/,
                    evaluation/outcomes.jsonl (the signed outcomes; their root is the
                    eval receipt's ``outcome_root``), (base/ with
                    ``bundle_base``, recall/index.db with a ``recall`` spec section)
                    → deterministic signed ``.kolm``; then the ``eval`` receipt
                    (subject = artifact digest) and the ``artifact`` receipt
                    (training-set root, eval leaf hash, ledger checkpoint, and
                    ``corpus_root``/``corpus_chunks`` when there is a recall index)

The training-set root is :func:`kolm_ledger.log.provenance.training_set_root` over the
leaf hashes of the acknowledged label receipts in ledger index order — what
``kolm provenance`` recomputes. Nothing inside the ``.kolm`` holds a time, a job id
or a local path: the same spec, seed and teacher cache give a byte-identical file.

A resumed job (the same job folder, or the same ``job_id`` on a sink with
``job_labels``) reuses the label receipts the ledger already holds for it, so the
ledger has exactly one receipt per trained label of a job.

A job folder holds one job: :meth:`TaskSpec.identity` (task, data and its files,
teacher, recall). The budget and the teacher's operational settings (timeouts,
retries, concurrency, batching) may change between runs; a changed student section
re-runs train, evaluate and package only. What the job bought from its teacher,
over all its runs, is ``JOB/spend.json`` (:class:`~kolm_compile.teachers.TeacherSpend`):
the budget is checked against it and the artifact receipt's cost signs it.

One input the teacher cannot answer (:class:`~kolm_compile.teachers.InputRejected`:
an HTTP 400 content filter, a malformed answer after two retries) is rejected like a
failed vote (code ``teacher_error``, its status and reason in ``stages/vote.json``
and the summary); the job goes on.

Every task kind trains: ``classify`` (the classifier student), ``extract`` (the span
tagger or the generative student) and ``generate`` (the generative student); stage (5)
dispatches on the spec's resolved ``student.kind`` (docs/COMPILE.md, "Task kinds").

The modules: :mod:`.job` (:class:`CompileJob`: the run loop and the job folder),
:mod:`.result` (what a compile hands its caller: :class:`CompileResult`,
:class:`StageEvent`, :class:`CompileOptions`), :mod:`.outputs` (what the stages hand each
other: one frozen dataclass per stage), :mod:`.ingest` (stage 1), :mod:`.labels` (2–4),
:mod:`.training` (5–6), :mod:`.package` (7: the manifest, the ``.kolm`` and its
receipts) and :mod:`.context` (what every stage shares).

Example::

    from kolm_compile.pipeline import CompileJob
    from kolm_compile.sinks import LocalLedgerSink
    from kolm_compile.spec import TaskSpec

    spec = TaskSpec.load("kolm_compile/examples/banking77-router.yaml")
    job = CompileJob(spec, key=compile_key, sink=LocalLedgerSink.open(db, "keys"),
                     job_dir=Path("work/job-1"))
    result = job.run()          # result.artifact_path, result.k_score, result.cost
"""

from .job import CompileJob
from .outputs import StageOutputs
from .package import base_weights_digest
from .result import (
    DEFAULT_DOLLARS_PER_CPU_HOUR,
    STAGE_TITLES,
    STAGES,
    CompileOptions,
    CompileResult,
    JobCancelled,
    StageEvent,
)

__all__ = [
    "DEFAULT_DOLLARS_PER_CPU_HOUR",
    "STAGES",
    "STAGE_TITLES",
    "CompileJob",
    "CompileOptions",
    "CompileResult",
    "JobCancelled",
    "StageEvent",
    "StageOutputs",
    "base_weights_digest",
]
