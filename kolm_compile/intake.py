"""What a spec submitted to the compile service may name: its files and its teacher.

A client of ``kolm compile serve`` is not the operator. A spec it submits may read
only

- **datasets it uploaded** (``UploadDataset``; the spec names one as ``sha256:<hex>``),
  kept by :class:`UploadStore` under ``WORK/uploads/<owner>/`` per client identity;
- **files under the operator's data root** (``--data-root DIR``; none by default),
  named relative to it: absolute paths and ``..`` are refused, symlinks are resolved
  and must stay inside the root (a folder corpus may hold no symlink at all).

and its teacher comes from the operator's **teacher profiles** (``--teachers FILE``,
:class:`TeacherProfiles`): a spec names ``teacher.profile: NAME``; the profile sets the
backend, endpoint, credential variable, request limits, the models a spec may choose
and their prices. A submitted spec that sets ``teacher.endpoint``, ``api_key_env`` (or
another operator knob: ``concurrency``, ``timeout_s``, ``max_retries``, ``device``) is
refused. The offline backends ``simulated`` and ``replay`` send nothing anywhere and
hold no credential; a spec may name them without a profile (their files go through
the same resolver).

Every refusal is a :class:`~kolm_ledger.errors.SpecError` (``INVALID_ARGUMENT``) whose
message starts with the dotted field, e.g. ``spec.recall.corpus: absolute paths are
refused …``. :class:`ServicePolicy` is the
:class:`~kolm_compile.spec.SpecPolicy` that :meth:`TaskSpec.from_dict
<kolm_compile.spec.TaskSpec.from_dict>` applies to every file field and the teacher.

``teachers.yaml``::

    profiles:
      openai-mini:
        backend: openai
        endpoint: https://api.openai.com      # no user:password@ (use api_key_env)
        api_key_env: OPENAI_API_KEY           # the variable's name, in the service's env
        models:                               # the models a spec may pick (first: default)
          gpt-4o-mini: {price_per_1k_input_tokens: 0.00015, price_per_1k_output_tokens: 0.0006}
          gpt-4o: {price_per_1k_input_tokens: 0.0025, price_per_1k_output_tokens: 0.01}
        concurrency: 4
        timeout_s: 60
        max_retries: 5
        max_teacher_calls: 50000              # a spec's budget may not ask for more
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from kolm_ledger.errors import InvalidInput, ResourceExhaustedError, SpecError

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "LOCAL_OWNER",
    "OFFLINE_BACKENDS",
    "OPERATOR_FIELDS",
    "ServicePolicy",
    "TeacherProfile",
    "TeacherProfiles",
    "UploadStore",
    "UploadWriter",
    "prepare_submission",
]

#: default cap of one upload (``kolm compile serve --max-upload-bytes``)
DEFAULT_MAX_UPLOAD_BYTES = 256 << 20
#: the owner of jobs and uploads on a plain-text (loopback, no client identity) service
LOCAL_OWNER = "local"
#: backends that read only files (through the resolver) and send nothing anywhere
OFFLINE_BACKENDS = frozenset({"simulated", "replay"})
#: teacher fields only an operator's profile sets at the service
OPERATOR_FIELDS = ("endpoint", "api_key_env", "concurrency", "timeout_s", "max_retries", "device")
_REF = re.compile(r"sha256:([0-9a-f]{64})")
#: upload suffix → the suffix it is stored under (one format per digest)
_UPLOAD_SUFFIXES = {".csv": ".csv", ".jsonl": ".jsonl", ".ndjson": ".jsonl"}


# ---- uploads ------------------------------------------------------------------------------


def _owner_key(owner: str) -> str:
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()[:32]


class UploadStore:
    """Uploaded datasets, content-addressed by SHA-256, one folder per client identity::

        ROOT/<sha256(owner)[:32]>/<hex>.csv | <hex>.jsonl
        ROOT/.tmp/                 uploads in progress (emptied at start)

    An upload is written to a temporary file and renamed into place only once complete,
    under the size cap, and (if the client sent one) matching its stated SHA-256: a
    refused or interrupted upload leaves nothing behind.
    """

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidInput(f"--max-upload-bytes: must be an integer >= 1, got {max_bytes!r}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.tmp = self.root / ".tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def find(self, owner: str, hexdigest: str) -> Path | None:
        """The stored upload of ``owner`` with that SHA-256, if any."""
        d = self.root / _owner_key(owner)
        for suffix in sorted(set(_UPLOAD_SUFFIXES.values())):
            p = d / f"{hexdigest}{suffix}"
            if p.is_file():
                return p
        return None

    def writer(self, owner: str, filename: str) -> UploadWriter:
        """Start an upload; ``filename`` is the client's name for it (only its suffix counts)."""
        if not isinstance(filename, str) or not filename.strip():
            raise InvalidInput(
                "upload: the first chunk must name the file (filename; its suffix, .csv, "
                ".jsonl or .ndjson, says the format)"
            )
        suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
        if suffix not in _UPLOAD_SUFFIXES:
            raise InvalidInput(
                f"upload: filename {filename[:100]!r} must end .csv, .jsonl or .ndjson "
                "(a table, or a JSONL recall corpus)"
            )
        return UploadWriter(self, owner, _UPLOAD_SUFFIXES[suffix])


@dataclass
class UploadWriter:
    """One upload in progress (see :meth:`UploadStore.writer`): :meth:`write` the chunks,
    then :meth:`commit`; :meth:`abort` (or a failed write/commit) removes the temporary file."""

    store: UploadStore
    owner: str
    suffix: str
    size: int = 0
    _h: Any = field(default_factory=hashlib.sha256)
    _path: Path | None = None
    _f: Any = None

    def write(self, data: bytes) -> None:
        """Append ``data``; over the cap the upload is refused (``RESOURCE_EXHAUSTED``)."""
        if self.size + len(data) > self.store.max_bytes:
            self.abort()
            raise ResourceExhaustedError(
                f"upload: larger than {self.store.max_bytes} bytes, the service's "
                "--max-upload-bytes; nothing was stored"
            )
        if self._f is None:
            self._path = self.store.tmp / f"{uuid.uuid4().hex}{self.suffix}"
            self._f = open(self._path, "xb")  # noqa: SIM115 - closed in commit/abort
        self._f.write(data)
        self._h.update(data)
        self.size += len(data)

    def commit(self, expect_sha256: str = "") -> tuple[str, int, bool]:
        """Store the upload: ``(reference "sha256:<hex>", size, existed before)``."""
        try:
            hexdigest = self._h.hexdigest()
            if self.size == 0:
                raise InvalidInput("upload: no data")
            if expect_sha256 and expect_sha256.removeprefix("sha256:") != hexdigest:
                raise InvalidInput(
                    f"upload: the data's SHA-256 is {hexdigest}, the client said "
                    f"{expect_sha256[:80]}; nothing was stored"
                )
            d = self.store.root / _owner_key(self.owner)
            d.mkdir(parents=True, exist_ok=True)
            have = self.store.find(self.owner, hexdigest)
            if have is not None and have.suffix != self.suffix:
                raise InvalidInput(
                    f"upload: these bytes (sha256:{hexdigest}) were uploaded before as a "
                    f"{have.suffix} file; one format per dataset"
                )
            assert self._f is not None and self._path is not None
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            if have is None:
                os.replace(self._path, d / f"{hexdigest}{self.suffix}")
            return f"sha256:{hexdigest}", self.size, have is not None
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


# ---- teacher profiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherProfile:
    """One operator-configured teacher (see the module docstring for the file format)."""

    name: str
    backend: str
    options: Mapping[str, Any] = field(default_factory=dict)  # endpoint, api_key_env, …
    models: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # model → prices
    max_teacher_calls: int | None = None


_PROFILE_KEYS = frozenset({"backend", "models", "max_teacher_calls", *OPERATOR_FIELDS})
_PRICE_KEYS = ("price_per_1k_input_tokens", "price_per_1k_output_tokens")


class TeacherProfiles:
    """The operator's teacher profiles, by name (``kolm compile serve --teachers FILE``)."""

    def __init__(self, profiles: Mapping[str, TeacherProfile] | None = None) -> None:
        self.profiles = dict(profiles or {})

    def names(self) -> list[str]:
        """The profile names, sorted."""
        return sorted(self.profiles)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TeacherProfiles:
        """Read and check a teachers file; :class:`InvalidInput` names the file and key."""
        from .spec import load_spec_text

        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise InvalidInput(f"--teachers {p}: cannot read: {e.strerror or e}") from e
        try:
            raw = load_spec_text(data, name=p.name)
        except SpecError as e:
            raise InvalidInput(f"--teachers {p}: {e}") from e
        return cls.from_dict(raw, where=f"--teachers {p.name}")

    @classmethod
    def from_dict(cls, raw: Any, *, where: str = "teachers") -> TeacherProfiles:
        """Check a parsed teachers file (``{profiles: {NAME: {...}}}``)."""
        from .spec import _NAME
        from .teachers import teacher_backends

        if not isinstance(raw, Mapping) or set(raw) - {"profiles"}:
            raise InvalidInput(f"{where}: must be a mapping with one key, profiles")
        profiles = raw.get("profiles") or {}
        if not isinstance(profiles, Mapping):
            raise InvalidInput(f"{where}: profiles must be a mapping of name → profile")
        out: dict[str, TeacherProfile] = {}
        for name, prof in profiles.items():
            at = f"{where}: profiles.{name}"
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise InvalidInput(f"{at}: a profile name matches [a-z0-9][a-z0-9-_]{{0,63}}")
            if not isinstance(prof, Mapping):
                raise InvalidInput(f"{at}: must be a mapping")
            unknown = sorted(str(k) for k in set(prof) - _PROFILE_KEYS)
            if unknown:
                raise InvalidInput(
                    f"{at}.{unknown[0]}: unknown key (known: {', '.join(sorted(_PROFILE_KEYS))})"
                )
            backend = prof.get("backend")
            if backend not in teacher_backends():
                raise InvalidInput(
                    f"{at}.backend: must be one of {', '.join(teacher_backends())}, got {backend!r}"
                )
            options = {k: prof[k] for k in OPERATOR_FIELDS if prof.get(k) is not None}
            endpoint = options.get("endpoint")
            if endpoint is not None and (
                not isinstance(endpoint, str) or not re.match(r"https?://[^/\s@]+(/|$)", endpoint)
            ):
                raise InvalidInput(
                    f"{at}.endpoint: must be an http(s) URL without user:password@ (the "
                    f"credential goes in api_key_env), got {endpoint!r}"
                )
            models = _models(at, prof.get("models"))
            if backend in ("openai", "transformers") and not models:
                raise InvalidInput(f"{at}.models: required for backend {backend}")
            cap = prof.get("max_teacher_calls")
            if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
                raise InvalidInput(f"{at}.max_teacher_calls: must be an integer >= 1, got {cap!r}")
            p = TeacherProfile(name, backend, options, models, cap)
            _check_profile_options(at, p)
            out[name] = p
        return cls(out)


def _models(at: str, raw: Any) -> dict[str, dict[str, float]]:
    if raw is None:
        return {}
    if isinstance(raw, list | tuple):
        raw = {m: None for m in raw}
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidInput(f"{at}.models: must be a list of model names or a mapping")
    out: dict[str, dict[str, float]] = {}
    for model, prices in raw.items():
        if not isinstance(model, str) or not model.strip():
            raise InvalidInput(f"{at}.models: model names must be non-empty strings")
        prices = prices or {}
        if not isinstance(prices, Mapping) or set(prices) - set(_PRICE_KEYS):
            raise InvalidInput(f"{at}.models.{model}: may give {', '.join(_PRICE_KEYS)}")
        for k, v in prices.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1e9:
                raise InvalidInput(f"{at}.models.{model}.{k}: must be a number >= 0, got {v!r}")
        out[model] = {k: float(v) for k, v in prices.items()}
    return out


def _check_profile_options(at: str, p: TeacherProfile) -> None:
    """The profile's teacher options pass the spec's own checks (for a model it allows)."""
    from .spec import TeacherSpec
    from .teachers import teacher_options

    own = {f.name for f in fields(teacher_options(p.backend))}
    for name in p.options:
        if name not in own:
            raise InvalidInput(f"{at}.{name}: not used by backend {p.backend}")
    if p.backend in OFFLINE_BACKENDS:
        return  # their required field is a file the spec names
    try:
        raw = {"backend": p.backend, "model": next(iter(p.models), None), **p.options}
        TeacherSpec.from_mapping(raw)
    except SpecError as e:
        raise InvalidInput(f"{at}: {str(e).removeprefix('spec.teacher.')}") from e


# ---- the policy ------------------------------------------------------------------------------


@dataclass
class ServicePolicy:
    """The :class:`~kolm_compile.spec.SpecPolicy` of the compile service for one client.

    ``owner`` is the submitting client's identity (its uploads are the ones a spec may
    name); ``data_root`` the operator's ``--data-root`` (None: uploads only);
    ``profiles`` the operator's teacher profiles. ``service=False`` is the local
    ``kolm compile run --teachers FILE`` case: profiles apply, but the operator may set
    anything and read any path (``resolve_file`` is then not used).
    """

    uploads: UploadStore | None
    owner: str = LOCAL_OWNER
    data_root: Path | None = None
    profiles: TeacherProfiles = field(default_factory=TeacherProfiles)
    service: bool = True
    base_dir: Path = Path(".")

    def __post_init__(self) -> None:
        if self.data_root is not None:
            self.data_root = Path(os.path.realpath(self.data_root))

    # -- files

    def resolve_file(self, dotted: str, value: Any) -> tuple[Any, str | None]:
        """``(path, reference)`` for a file field, or :class:`SpecError` naming it."""
        if not self.service:
            from .spec import _local_resolver

            resolved: tuple[Any, str | None] = _local_resolver(self.base_dir)(dotted, value)
            return resolved
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{dotted}: must be sha256:<hex> (an upload) or a path, got {value!r}")
        if value.startswith("sha256:"):
            return self._upload(dotted, value)
        if self.data_root is None:
            raise SpecError(
                f"{dotted}: {value[:200]!r} is not an upload; this compile service reads only "
                "datasets uploaded to it (UploadDataset, named sha256:<hex>; kolm compile "
                "submit uploads a spec's files) and has no --data-root"
            )
        if "\0" in value:
            raise SpecError(f"{dotted}: a path may not hold a NUL character")
        pure = PurePosixPath(value)
        if pure.is_absolute() or PureWindowsPath(value).is_absolute() or value.startswith("~"):
            raise SpecError(
                f"{dotted}: absolute paths are refused ({value[:200]!r}); name a file "
                "relative to the service's data root, or an upload (sha256:<hex>)"
            )
        if ".." in pure.parts or ".." in PureWindowsPath(value).parts:
            raise SpecError(
                f"{dotted}: '..' is refused ({value[:200]!r}); name a file inside the "
                "service's data root"
            )
        real = Path(os.path.realpath(self.data_root / pure))
        if not real.is_relative_to(self.data_root):
            raise SpecError(
                f"{dotted}: {value[:200]!r} leads outside the service's data root "
                "(through a symlink)"
            )
        if not real.exists():
            raise SpecError(
                f"{dotted}: no file or folder {value[:200]!r} in the service's data root"
            )
        if real.is_dir():
            for d, dirs, files in os.walk(real):
                for n in dirs + files:
                    if os.path.islink(os.path.join(d, n)):
                        rel = Path(d, n).relative_to(real).as_posix()
                        raise SpecError(
                            f"{dotted}: folder {value[:200]!r} holds a symlink ({rel}); "
                            "a corpus folder at the service may hold none"
                        )
        return real, real.relative_to(self.data_root).as_posix()

    def _upload(self, dotted: str, value: str) -> tuple[Path, str]:
        m = _REF.fullmatch(value)
        if m is None:
            raise SpecError(
                f"{dotted}: {value[:100]!r} is not an upload reference (sha256: and 64 "
                "lowercase hex characters)"
            )
        found = self.uploads.find(self.owner, m.group(1)) if self.uploads else None
        if found is None:
            raise SpecError(
                f"{dotted}: no dataset {value} was uploaded by this client (UploadDataset "
                "first; kolm compile submit does it)"
            )
        return found, value

    # -- teacher

    def teacher(
        self, raw: Mapping[str, Any], budget: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The teacher section with the named profile applied (and the budget with its
        prices and call cap), or :class:`SpecError` naming the field."""
        t = dict(raw)
        name = t.get("profile")
        if self.service:
            for key in OPERATOR_FIELDS:
                if t.get(key) is not None:
                    raise SpecError(
                        f"spec.teacher.{key}: a submitted spec may not set it; the operator's "
                        "teacher profile does (name one: teacher.profile)"
                    )
        if name is None:
            backend = t.get("backend")
            if self.service and backend not in OFFLINE_BACKENDS:
                known = ", ".join(self.profiles.names()) or "none configured"
                raise SpecError(
                    f"spec.teacher.profile: required for backend {backend!r} at the compile "
                    f"service (operator profiles: {known}); only "
                    f"{' and '.join(sorted(OFFLINE_BACKENDS))} need none"
                )
            return t, None
        if not isinstance(name, str) or name not in self.profiles.profiles:
            known = ", ".join(self.profiles.names()) or "none configured"
            raise SpecError(
                f"spec.teacher.profile: unknown teacher profile {name!r} (known: {known})"
            )
        prof = self.profiles.profiles[name]
        if t.get("backend") not in (None, prof.backend):
            raise SpecError(
                f"spec.teacher.backend: profile {name} uses backend {prof.backend}, "
                f"not {t.get('backend')!r}"
            )
        for key in prof.options:
            if t.get(key) is not None:
                raise SpecError(f"spec.teacher.{key}: set by teacher profile {name}")
        model = t.get("model")
        if prof.models:
            if model is None:
                model = next(iter(prof.models))
            elif not isinstance(model, str) or model not in prof.models:
                raise SpecError(
                    f"spec.teacher.model: {model!r} is not allowed by teacher profile {name} "
                    f"(allowed: {', '.join(prof.models)})"
                )
        t.update(prof.options, backend=prof.backend)
        if model is not None:
            t["model"] = model
        b = dict(budget or {})
        prices = prof.models.get(model, {}) if isinstance(model, str) else {}
        b.update(prices)
        if prof.max_teacher_calls is not None:
            asked = b.get("max_teacher_calls")
            if asked is None:
                b["max_teacher_calls"] = prof.max_teacher_calls
            elif isinstance(asked, int) and asked > prof.max_teacher_calls:
                raise SpecError(
                    f"spec.budget.max_teacher_calls: {asked} is over teacher profile {name}'s "
                    f"cap of {prof.max_teacher_calls}"
                )
        return t, (b if b or budget is not None else None)


# ---- the client side: kolm compile submit -------------------------------------------------


def prepare_submission(
    raw: Mapping[str, Any], base_dir: Path, upload: Any
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """A spec ready to submit: every local file it names uploaded and replaced by its
    ``sha256:<hex>`` reference (``upload(filename, path_or_bytes) -> ref``).

    Relative paths start at ``base_dir`` (the spec file's folder). A corpus folder is
    sent as the JSONL of the documents the corpus reader takes from it (same ids, same
    order: the same chunks); an ``output_schema`` file is inlined. A value that is already
    ``sha256:…`` or names nothing here is left as it is, for the service to resolve
    under its data root. Returns the spec and ``(field, local path, ref)`` per upload.
    """
    import json as _json

    from .recall import load_corpus
    from .spec import FILE_FIELDS, _load_output_schema

    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    done: list[tuple[str, str, str]] = []
    schema = out.get("output_schema")
    if isinstance(schema, str) and (base_dir / schema).is_file():
        out["output_schema"] = _load_output_schema(base_dir / schema)
    for dotted, attr, name in FILE_FIELDS:
        section = out.get(attr)
        if not isinstance(section, dict) or not isinstance(section.get(name), str):
            continue
        value = section[name]
        if value.startswith("sha256:"):
            continue
        p = base_dir / value  # an absolute value stays absolute
        if p.is_dir() and dotted == "recall.corpus":
            try:
                docs = load_corpus(p)
            except InvalidInput as e:
                raise SpecError(f"spec.{dotted}: {e}") from e
            lines = (_json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) for d in docs)
            ref = upload(f"{p.name}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
        elif p.is_file():
            ref = upload(p.name, p)
        else:
            continue
        section[name] = ref
        done.append((dotted, str(p), ref))
    return out, done
