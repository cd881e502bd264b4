"""The compile pipeline (:mod:`kolm_compile.pipeline.job`): a teacher becomes a signed,
provable Specialist (``.kolm``)."""

from .job import (
    DEFAULT_DOLLARS_PER_CPU_HOUR,
    STAGE_TITLES,
    STAGES,
    CompileJob,
    CompileOptions,
    CompileResult,
    JobCancelled,
    StageEvent,
    base_weights_digest,
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
    "base_weights_digest",
]
