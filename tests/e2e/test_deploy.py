"""deploy/: every manifest parses and agrees with the code it runs.

Each ``kolm ...`` command line in the compose file and the Kubernetes manifests is parsed
with the real ``kolm.cli.main.build_parser()``; container ports, probes, Services,
volume mounts, Secrets and NetworkPolicy selectors are checked against those command
lines and against each other. A subcommand whose ``kolm.commands`` entry point is not
installed in this checkout is skipped, and the skip names it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolm.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
IMAGE = "kolm:0.1.0"
WORKLOAD_KINDS = ("Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet")


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in sorted(K8S.glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(p.read_text()):
            if d is not None:
                out.append((p.name, d))
    return out


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


@dataclass
class Container:
    """A kolm container from compose or Kubernetes, normalised."""

    where: str
    argv: list[str]
    ports: dict[str, int] = field(default_factory=dict)  # name (or str(port)) -> port
    probe_ports: list[object] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    env: set[str] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)  # the pod spec (k8s)


def _pod_template(d: dict[str, Any]) -> dict[str, Any] | None:
    kind = d.get("kind")
    if kind == "CronJob":
        return d["spec"]["jobTemplate"]["spec"]["template"]
    if kind in WORKLOAD_KINDS:
        return d["spec"]["template"]
    return None


def _k8s_containers() -> Iterator[Container]:
    for fname, d in _k8s_docs():
        tpl = _pod_template(d)
        if tpl is None:
            continue
        spec = tpl["spec"]
        for c in spec["containers"]:
            assert c.get("command") in (None, ["kolm"]), f"{fname}: the image's entry point is kolm"
            probes = [c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c]
            yield Container(
                where=f"{fname}:{d['metadata']['name']}/{c['name']}",
                argv=[str(a) for a in c.get("args", [])],
                ports={
                    **{p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p},
                    **{str(p["containerPort"]): p["containerPort"] for p in c.get("ports", [])},
                },
                probe_ports=[p["grpc"]["port"] for p in probes if "grpc" in p],
                mounts=[m["mountPath"] for m in c.get("volumeMounts", [])],
                env={e["name"] for e in c.get("env", [])},
                labels=dict(tpl["metadata"].get("labels", {})),
                spec=spec,
            )


def _compose_containers() -> Iterator[Container]:
    for name, s in _compose()["services"].items():
        if s.get("image") != IMAGE:
            continue
        ports = {str(p): int(p) for p in s.get("expose", [])}
        hc = " ".join(s.get("healthcheck", {}).get("test", []))
        yield Container(
            where=f"compose.yaml:{name}",
            argv=[str(a) for a in s.get("command", [])],
            ports=ports,
            probe_ports=[int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", hc)],
            mounts=[str(v).split(":")[1] for v in s.get("volumes", [])],
        )


CONTAINERS = [*_k8s_containers(), *_compose_containers()]


def _registered() -> set[str]:
    _, sub = build_parser()
    return set(sub.choices)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser, _ = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`kolm {' '.join(argv)}` does not parse: {err.getvalue().strip()}")
    raise AssertionError("unreachable")


def _listen_port(ns: argparse.Namespace) -> int | None:
    listen = getattr(ns, "listen", None)
    return int(str(listen).rsplit(":", 1)[1]) if listen else None


# ---- files ---------------------------------------------------------------------------------


def test_every_yaml_parses() -> None:
    files = [DEPLOY / "compose.yaml", *sorted(K8S.glob("*.yaml"))]
    assert len(files) >= 7
    for p in files:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs, p
        for d in docs:
            assert isinstance(d, dict), p
            if p.parent == K8S and p.name != "kustomization.yaml":
                assert {"apiVersion", "kind", "metadata"} <= d.keys(), (p, d.keys())
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert re.search(r"whl/cpu", text), "the CPU torch wheel"
    assert re.search(r"pip install \"\.\[ml,postgres(,recall)?\]\"", text)
    assert 'ENTRYPOINT ["kolm"]' in text
    assert re.search(r"^USER 10001", text, re.M)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", text, re.M) for p in line.split()}
    for c in CONTAINERS:
        if c.ports:
            assert set(c.ports.values()) <= exposed, c.where
    # the torch pin agrees with pyproject's [ml] extra
    assert 'torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()


def test_one_image_everywhere() -> None:
    images = {
        c["image"]
        for _, d in _k8s_docs()
        if (t := _pod_template(d))
        for c in t["spec"]["containers"]
    }
    assert images == {IMAGE}
    svc = _compose()["services"]
    assert {s["image"] for n, s in svc.items() if n != "postgres"} == {IMAGE}
    assert svc["ledger-1"]["build"]["dockerfile"] == "deploy/Dockerfile"


# ---- command lines ----------------------------------------------------------------------------


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_command_line_parses_and_ports_agree(c: Container) -> None:
    assert c.argv, f"{c.where}: no kolm arguments"
    cmd = c.argv[0]
    if cmd not in _registered():
        eps = {e.name for e in entry_points(group="kolm.commands")}
        assert cmd not in eps, f"entry point {cmd!r} is installed but registers no `kolm {cmd}`"
        pytest.skip(
            f"`kolm {cmd}` is not registered in this checkout (no kolm.commands entry point "
            f"{cmd!r}): {c.where} `kolm {' '.join(c.argv)}` NOT checked"
        )
    ns = _parse(c.argv)
    port = _listen_port(ns)
    if port is None:  # a client (audit): nothing listens
        assert not c.ports and not c.probe_ports, c.where
    else:
        assert str(ns.listen).startswith("0.0.0.0:"), f"{c.where}: listen on all interfaces"
        assert port in c.ports.values(), f"{c.where}: --listen port {port} is not a container port"
        assert c.probe_ports, f"{c.where}: no gRPC health probe"
        for p in c.probe_ports:
            assert c.ports.get(str(p)) == port, (
                f"{c.where}: probe targets {p}, service listens on {port}"
            )
    # every absolute path argument lies on a mounted volume; every $(VAR) is defined
    for arg in c.argv:
        if arg.startswith("/"):
            assert any(arg == m or arg.startswith(m.rstrip("/") + "/") for m in c.mounts), (
                f"{c.where}: {arg} is not on a mounted volume ({c.mounts})"
            )
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in c.env, f"{c.where}: $({var}) is not in the container's env"
    # a --ledger target names a ledger Service port that exists
    ledger = getattr(ns, "ledger", None)
    if ledger and c.where.startswith("compose"):
        assert ledger == "ledger:7070"
    elif ledger:
        _assert_service_port(str(ledger), c.where)


def _assert_service_port(target: str, where: str) -> None:
    host, port = target.rsplit(":", 1)
    for _, d in _k8s_docs():
        if d["kind"] == "Service" and d["metadata"]["name"] == host:
            assert int(port) in [p["port"] for p in d["spec"]["ports"]], (where, target)
            return
    pytest.fail(f"{where}: no Service named {host}")


def test_the_three_services_are_all_deployed() -> None:
    seen = {tuple(c.argv[:2]) for c in CONTAINERS}
    for svc in (("ledger", "serve"), ("compile", "serve"), ("infer", "serve")):
        assert svc in seen
    both = {c.where.split(":")[0] for c in CONTAINERS if c.argv[:2] == ["ledger", "serve"]}
    assert both == {"ledger.yaml", "compose.yaml"}
    for c in CONTAINERS:
        if c.argv[1:2] == ["serve"]:
            assert "--tls-dir" in c.argv, f"{c.where}: mTLS material not given"


# ---- Kubernetes consistency -------------------------------------------------------------------


def _secrets() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for _, d in _k8s_docs():
        if d["kind"] in ("Secret", "ConfigMap"):
            keys = set(d.get("stringData") or {}) | set(d.get("data") or {})
            out[f"{d['kind']}/{d['metadata']['name']}"] = keys
    return out


def _refs(spec: dict[str, Any]) -> Iterator[tuple[str, str | None]]:
    for v in spec.get("volumes", []):
        if "secret" in v:
            items = v["secret"].get("items") or [{"key": None}]
            for it in items:
                yield f"Secret/{v['secret']['secretName']}", it["key"]
        if "configMap" in v:
            yield f"ConfigMap/{v['configMap']['name']}", None
    for c in spec["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref:
                yield f"Secret/{ref['secretKeyRef']['name']}", ref["secretKeyRef"]["key"]
            if "configMapKeyRef" in ref:
                yield f"ConfigMap/{ref['configMapKeyRef']['name']}", ref["configMapKeyRef"]["key"]
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                yield f"Secret/{e['secretRef']['name']}", None
            if "configMapRef" in e:
                yield f"ConfigMap/{e['configMapRef']['name']}", None


def test_every_secret_and_configmap_exists() -> None:
    have = _secrets()
    seen = 0
    for c in (c for c in CONTAINERS if c.spec):
        for ref, key in _refs(c.spec):
            seen += 1
            assert ref in have, f"{c.where} references {ref}, which no manifest defines"
            if key is not None:
                assert key in have[ref], (
                    f"{c.where} wants key {key!r} of {ref}, it has {sorted(have[ref])}"
                )
    assert seen >= 8
    db = [r for c in CONTAINERS if c.spec for r in _refs(c.spec) if r[0] == "Secret/kolm-db"]
    assert db == [("Secret/kolm-db", "url")], "--db comes from the kolm-db Secret"


def test_pvcs_exist() -> None:
    claims = {d["metadata"]["name"] for _, d in _k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    for c in (c for c in CONTAINERS if c.spec):
        for v in c.spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, c.where


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for ex in selector.get("matchExpressions") or []:
        val, op = labels.get(ex["key"]), ex["operator"]
        if op == "In" and val not in ex["values"]:
            return False
        if op == "NotIn" and val in ex["values"]:
            return False
        if op == "Exists" and val is None:
            return False
        if op == "DoesNotExist" and val is not None:
            return False
    return True


def _pods() -> list[Container]:
    return [c for c in CONTAINERS if c.spec]


def test_network_policies_match_pods_and_ports() -> None:
    pods = _pods()
    policies = [d for _, d in _k8s_docs() if d["kind"] == "NetworkPolicy"]
    assert any(
        p["spec"]["podSelector"] == {} and len(p["spec"]["policyTypes"]) == 2 for p in policies
    )
    for pol in policies:
        name = pol["metadata"]["name"]
        selected = [c for c in pods if _matches(pol["spec"]["podSelector"], c.labels)]
        assert selected, f"NetworkPolicy {name} selects no pod"
        for rule in pol["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for c in selected:
                    assert port["port"] in c.ports.values(), (
                        f"{name}: {c.where} has no port {port['port']}"
                    )
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    assert any(_matches(peer["podSelector"], c.labels) for c in pods), name
        for rule in pol["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if "podSelector" in peer:
                    targets = [c for c in pods if _matches(peer["podSelector"], c.labels)]
                    assert targets, f"{name}: egress peer matches no pod"
                    for port in rule.get("ports", []):
                        assert any(port["port"] in t.ports.values() for t in targets), name


def test_only_compile_infer_and_auditor_reach_the_ledger() -> None:
    pods = _pods()
    ledger_pods = [c for c in pods if c.argv[:2] == ["ledger", "serve"]]
    allowed: set[str] = set()
    for _, pol in _k8s_docs():
        if pol["kind"] != "NetworkPolicy":
            continue
        if not any(_matches(pol["spec"]["podSelector"], c.labels) for c in ledger_pods):
            continue
        for rule in pol["spec"].get("ingress", []):
            assert rule.get("from"), f"{pol['metadata']['name']}: ingress from anywhere"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "only pods of this namespace"
                allowed |= {
                    c.labels["kolm.dev/role"]
                    for c in pods
                    if _matches(peer["podSelector"], c.labels)
                }
    assert allowed == {"compile", "infer", "auditor"}
    # and those roles are what their pods run
    role_cmd = {c.labels["kolm.dev/role"]: c.argv[0] for c in pods}
    assert role_cmd == {
        "ledger": "ledger",
        "infer": "infer",
        "compile": "compile",
        "auditor": "audit",
    }


def test_ledger_deployment_pdb_hpa_and_job() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _k8s_docs()}
    led = docs[("Deployment", "kolm-ledger")]
    assert led["spec"]["replicas"] == 2
    pdb = docs[("PodDisruptionBudget", "kolm-ledger")]
    assert _matches(pdb["spec"]["selector"], led["spec"]["template"]["metadata"]["labels"])
    hpa = docs[("HorizontalPodAutoscaler", "kolm-inference")]
    tgt = hpa["spec"]["scaleTargetRef"]
    assert (tgt["kind"], tgt["name"]) in docs and tgt["kind"] == "Deployment"
    assert ("Job", "kolm-compile") in docs
    for kind, name in docs:
        if kind == "Service":
            svc = docs[(kind, name)]
            backends = [
                c for c in _pods() if _matches({"matchLabels": svc["spec"]["selector"]}, c.labels)
            ]
            assert backends, f"Service {name} selects no pod"
            for p in svc["spec"]["ports"]:
                for b in backends:
                    assert p["targetPort"] in b.ports, f"Service {name} targets {p['targetPort']}"


def test_compose_topology() -> None:
    svc = _compose()["services"]
    assert {"postgres", "ledger-1", "ledger-2", "compile", "inference"} <= set(svc)
    for n in ("ledger-1", "ledger-2"):
        assert "ledger" in svc[n]["networks"]["default"]["aliases"]
        db = svc[n]["command"][svc[n]["command"].index("--db") + 1]
        assert db.startswith("postgresql+psycopg://") and "@postgres:5432/" in db
    for n in ("ledger-1", "ledger-2", "compile", "inference"):
        vols = [str(v) for v in svc[n]["volumes"]]
        assert any(v.startswith("./tls/") and v.endswith(":/tls:ro") for v in vols), n
        assert any(v.startswith("./keys/") for v in vols), n
        keys = {v.split(":")[0].rsplit("/", 1)[1] for v in vols if v.startswith("./keys/")}
        assert keys <= {"trust.json", "log.key", "compile.key", "infer.key"}
        assert len(keys - {"trust.json"}) == 1, f"{n}: exactly its own private key"
