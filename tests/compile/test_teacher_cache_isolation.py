"""The test session never touches the user's teacher cache (~/.cache/kolm): conftest.py
points ``KOLM_TEACHER_CACHE`` at a per-session temporary folder, which the compile CLI's
default (:func:`kolm_compile.cache.default_teacher_cache`) then uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kolm_compile.cache import default_teacher_cache


def test_the_teacher_cache_is_a_per_session_temporary_file() -> None:
    path = default_teacher_cache()
    assert path == Path(os.environ["KOLM_TEACHER_CACHE"])
    home_cache = Path(os.path.expanduser("~")) / ".cache"
    assert not path.resolve().is_relative_to(home_cache.resolve()), path
    assert path.parent.is_dir()
    assert path.parent.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert path.parent.name.startswith("kolm-test-teacher-cache-")
