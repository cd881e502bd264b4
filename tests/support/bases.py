"""Base models the tests name: the generative student's default id, registered with a
placeholder location when student.py does not register it yet (a spec only checks that
the id is registered; nothing here loads it)."""

from __future__ import annotations

from pathlib import Path

from kolm_compile.spec import CAUSAL_LM_BASE_MODEL
from kolm_compile.student import base_model_ids, register_base_model

__all__ = ["ensure_causal_lm_base"]


def ensure_causal_lm_base() -> str:
    """The default causal-LM base id, registered (a placeholder that is never loaded when
    kolm_compile.student does not register it itself)."""
    if CAUSAL_LM_BASE_MODEL not in base_model_ids():

        def locate() -> Path:
            raise AssertionError(f"{CAUSAL_LM_BASE_MODEL} is a placeholder in these tests")

        register_base_model(CAUSAL_LM_BASE_MODEL, locate)
    return CAUSAL_LM_BASE_MODEL
