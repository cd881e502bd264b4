"""The full Banking77 the benchmarks read: ``../shared/data/banking77``, beside the repository.

Benchmarks, unlike the tests, measure on the whole data set (77 intents, 10,003 train and
3,080 test rows), which kolm does not ship: the package has a 12-intent subset for the demo
(kolm_compile/data/banking77), the tests a 4-intent sample (tests/data/banking77). A bench
that needs the full set and does not find it stops with :func:`require` 's message.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["BANKING77", "require"]

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def require(bench: str, folder: Path = BANKING77) -> Path:
    """``folder`` when it has ``train.csv`` and ``test.csv``; else exit 2 saying what to do."""
    missing = [f for f in ("train.csv", "test.csv") if not (folder / f).is_file()]
    if missing:
        print(
            f"{bench}: this benchmark reads the full Banking77 from {folder} "
            f"(../shared/data/banking77 beside the repository; kolm does not ship it), and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there.\n"
            "Put banking_data/train.csv and test.csv of PolyAI-LDN/task-specific-datasets "
            "(CC BY 4.0; columns text,category) in that folder. `make test` does not need it.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return folder
