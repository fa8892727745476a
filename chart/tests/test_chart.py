"""Offline tests of the shardlease Helm chart.

No helm binary and no cluster: the chart is linted and rendered with Helm's own Go SDK
(helm-python-sdk, which embeds Helm v4 as a shared library), and every rendered object is
validated against the Kubernetes OpenAPI schemas shipped by kubernetes-validate, in strict mode
(unknown fields are errors).

kubernetes-validate has no schemas for custom resources (KEDA's ScaledObject and
TriggerAuthentication, the Prometheus Operator's ServiceMonitor). Those are validated against the
small strict JSON schemas in CRD_SCHEMAS below, written from the CRDs for just the fields this chart
uses; an object of any other kind without a schema fails the test instead of being skipped.

Run with: bash chart/tests/run.sh
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

CHART_DIR = Path(__file__).resolve().parents[1]
RELEASE = "demo"
NAMESPACE = "shardlease-test"
FULLNAME = "demo-shardlease"
WORKER_IMAGE_REPO = "ghcr.io/shardlease/shardlease-worker"

# The floor of Chart.yaml's kubeVersion, a common current version, and the newest schemas shipped
# by the pinned kubernetes-validate.
K8S_VERSIONS = ("1.25.0", "1.30.0", "1.37.0")

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)

EXTERNAL = {
    "postgresql": {"enabled": False},
    "externalDatabase": {"existingSecret": "my-db", "existingSecretKey": "url"},
}

# The work connection (WORK_DATABASE_URL) behind PgBouncer in transaction mode, default key.
WORK_DB = {"workDatabase": {"existingSecret": "pgbouncer-url"}}

# Least-privilege roles: the workers connect as a member role from a Secret of their own; the migrations
# (as the owner, from externalDatabase's Secret) grant the member and inspector roles.
ROLES = {**EXTERNAL, "roles": {"member": "sl_worker", "inspector": "sl_inspector", "memberSecret": "member-db"}}

# Named value sets that must render. Each one is linted, rendered and validated.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external": EXTERNAL,
    "keda": {"keda": {"enabled": True, "itemsPerWorker": 250, "maxReplicaCount": 7}},
    "keda-external": {**EXTERNAL, "keda": {"enabled": True}},
    "hpa": {"hpa": {"enabled": True}},
    "hpa-external": {**EXTERNAL, "hpa": {"enabled": True}},
    "servicemonitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "initcontainer-external": {**EXTERNAL, "migrations": {"strategy": "initContainer"}},
    "no-migrations": {"migrations": {"strategy": "none"}},
    "work-database": WORK_DB,
    "roles": ROLES,
    "roles-keda-work-database": {
        **EXTERNAL, **WORK_DB, "keda": {"enabled": True},
        "roles": {"member": "sl_worker", "memberSecret": "member-db", "memberSecretKey": "url"},
    },
    "roles-inspector-only": {**EXTERNAL, "roles": {"inspector": "sl_ro"}},
    "roles-member-secret-no-migrations": {
        **EXTERNAL, "migrations": {"strategy": "none"}, "roles": {"memberSecret": "member-db"},
    },
    "work-database-external-keda": {
        **EXTERNAL, "keda": {"enabled": True},
        "workDatabase": {"existingSecret": "pgbouncer", "secretKey": "tx-url"},
    },
    "everything": {
        "keda": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "core"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}},
        }],
        "priorityClassName": "high",
        "worker": {"extraEnv": [{"name": "RUST_LOG", "value": "info"}]},
        "podDisruptionBudget": {"maxUnavailable": "50%"},
        "postgresql": {"persistence": {"storageClass": "fast", "size": "5Gi"},
                       "auth": {"password": "s3cret-pass"}},
    },
}


# --------------------------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------------------------

class Rendered:
    """The objects of one render, plus NOTES.txt."""

    def __init__(self, manifests: dict[str, str]):
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("__source__", path)
                    self.objects.append(doc)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def maybe(self, kind: str) -> list[dict[str, Any]]:
        return self.of_kind(kind)

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", FULLNAME)


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE,
           upgrade: bool = False) -> Rendered:
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values or {}, name=name, namespace=NAMESPACE,
                                 is_install=not upgrade, is_upgrade=upgrade)
    return Rendered(manifests)


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "__source__"}


def pod_templates(r: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(owner object, pod spec) for every workload, Job and bare Pod."""
    out = []
    for o in r.objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((o, o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append((o, o["spec"]))
    return out


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def runs_worker_binary(container: dict[str, Any]) -> bool:
    return container["image"].startswith(WORKER_IMAGE_REPO)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = {}
    for e in container.get("env", []):
        assert e["name"] not in env, f"duplicate env {e['name']} in {container['name']}"
        env[e["name"]] = e
    return env


def hook_phases(obj: dict[str, Any]) -> set[str]:
    hook = obj["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    return {h.strip() for h in hook.split(",") if h.strip()}


def hook_weight(obj: dict[str, Any]) -> int:
    return int(obj["metadata"].get("annotations", {}).get("helm.sh/hook-weight", "0"))


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request) -> tuple[str, dict[str, Any], Rendered]:
    values = SCENARIOS[request.param]
    return request.param, values, render(values)


# --------------------------------------------------------------------------------------------
# Strict shape schemas for the custom resources (no schemas for them in kubernetes-validate).
# Written from the KEDA v2 and Prometheus Operator CRDs, restricted to the fields this chart uses.
# --------------------------------------------------------------------------------------------

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name", "namespace", "labels"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                   "namespace": {"type": "string"},
                   "labels": _LABELS, "annotations": _LABELS},
}
_PROM_DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": _META, "spec": spec},
    }


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _crd("keda.sh/v1alpha1", "ScaledObject", {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                               "properties": {"apiVersion": {"type": "string"},
                                              "kind": {"type": "string"},
                                              "name": {"type": "string"}}},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                "properties": {
                    "type": {"type": "string"},
                    # map[string]string in the CRD: a number here is rejected by the API server.
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "authenticationRef": {"type": "object", "required": ["name"],
                                          "additionalProperties": False,
                                          "properties": {"name": {"type": "string"},
                                                         "kind": {"enum": ["TriggerAuthentication",
                                                                           "ClusterTriggerAuthentication"]}}},
                }}},
        },
    }),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _crd("keda.sh/v1alpha1", "TriggerAuthentication", {
        "type": "object",
        "required": ["secretTargetRef"],
        "additionalProperties": False,
        "properties": {"secretTargetRef": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
            "properties": {"parameter": {"type": "string"}, "name": {"type": "string", "minLength": 1},
                           "key": {"type": "string", "minLength": 1}}}}},
    }),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "additionalProperties": False,
                         "properties": {"matchLabels": _LABELS}},
            "namespaceSelector": {"type": "object", "additionalProperties": False,
                                  "properties": {"any": {"type": "boolean"},
                                                 "matchNames": {"type": "array",
                                                                "items": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": {"type": "string", "pattern": _PROM_DURATION},
                               "scrapeTimeout": {"type": "string", "pattern": _PROM_DURATION}}}},
        },
    }),
}


# --------------------------------------------------------------------------------------------
# Lint and schema
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_lint_strict(name):
    report = helm.lint(CHART_DIR, SCENARIOS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not report["errors"] and not problems, json.dumps(report, indent=2)


def test_schema_is_draft07_and_closed():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for key in ("image", "worker", "postgresql", "externalDatabase", "workDatabase", "roles", "keda", "hpa",
                "migrations", "serviceMonitor", "podDisruptionBudget", "service", "serviceAccount"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    # The defaults satisfy the schema; so does every scenario (checked by Python's validator too).
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    assert set(defaults) <= set(schema["properties"]), "values.yaml keys missing from the schema"


@pytest.mark.parametrize("values, where", [
    ({"replicas": 3}, "replicas"),                                   # typo of replicaCount
    ({"worker": {"heartbeat": "1 second"}}, "/worker/heartbeat"),
    ({"worker": {"logFormat": "yaml"}}, "/worker/logFormat"),
    ({"keda": {"itemsPerWorker": 0}}, "/keda/itemsPerWorker"),
    ({"keda": {"targetQueryValue": 5}}, "targetQueryValue"),
    ({"postgresql": {"auth": {"password": "p@ss word"}}}, "/postgresql/auth/password"),
    ({"migrations": {"strategy": "sometimes"}}, "/migrations/strategy"),
    ({"terminationGracePeriodSeconds": 1}, "/terminationGracePeriodSeconds"),
    ({"workDatabase": {"existingSecret": True}}, "/workDatabase/existingSecret"),
    ({"workDatabase": {"existingSecret": "pgb", "secretKey": 5}}, "/workDatabase/secretKey"),
    ({"workDatabase": {"existingSecret": "PgBouncer_URL"}}, "/workDatabase/existingSecret"),
    ({"workDatabase": {"existingSecret": "pgb", "secretKey": "a key"}}, "/workDatabase/secretKey"),
    ({"workDatabase": {"url": "postgres://app:pw@pgbouncer:6432/app"}}, "url"),  # no inline URLs
    ({"roles": {"member": "worker; DROP ROLE x"}}, "/roles/member"),
    ({"roles": {"inspector": 7}}, "/roles/inspector"),
    ({"roles": {"memberSecret": "Member_DB"}}, "/roles/memberSecret"),
    ({"roles": {"memberSecret": "m", "memberSecretKey": "a key"}}, "/roles/memberSecretKey"),
    ({"roles": {"password": "pw"}}, "password"),  # no inline credentials
])
def test_schema_rejects_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert where in str(err.value)


# --------------------------------------------------------------------------------------------
# Value combinations that must fail with a clear message
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"postgresql": {"enabled": False}},
     "postgresql.enabled=false needs externalDatabase.existingSecret"),
    ({"keda": {"enabled": True}, "hpa": {"enabled": True}},
     "keda.enabled and hpa.enabled are mutually exclusive"),
    ({**EXTERNAL, "keda": {"enabled": True}, "hpa": {"enabled": True}},
     "keda.enabled and hpa.enabled are mutually exclusive"),
    ({"externalDatabase": {"existingSecret": "my-db"}},
     "set postgresql.enabled=false to use the external database"),
    ({"migrations": {"strategy": "hook"}},
     "migrations.strategy=hook cannot work with the bundled PostgreSQL"),
    ({"keda": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 2}},
     "keda.minReplicaCount must not exceed keda.maxReplicaCount"),
    ({"workDatabase": {"secretKey": "WORK_DATABASE_URL"}},
     "workDatabase.secretKey=WORK_DATABASE_URL is set but workDatabase.existingSecret is empty"),
    ({**WORK_DB, "worker": {"extraEnv": [{"name": "WORK_DATABASE_URL", "value": "postgres://x"}]}},
     "WORK_DATABASE_URL is set twice"),
    ({**EXTERNAL, "roles": {"memberSecretKey": "url"}},
     "roles.memberSecretKey=url is set but roles.memberSecret is empty"),
    ({"roles": {"member": "sl_worker", "memberSecret": "member-db"}},
     "roles.* need an external database whose roles you create"),
    ({"roles": {"inspector": "sl_ro"}},
     "roles.* need an external database whose roles you create"),
    ({**ROLES, "migrations": {"strategy": "none"}},
     "roles.member and roles.inspector are granted by the migrations, but migrations.strategy=none"),
    ({**ROLES, "migrations": {"strategy": "initContainer"}},
     "migrations.strategy=initContainer would put the owner's"),
    ({**EXTERNAL, "roles": {"member": "sl_worker"}},
     "roles.member=sl_worker is set but the workers would still connect with the owner's credentials"),
    ({**ROLES, "worker": {"extraEnv": [{"name": "DATABASE_URL", "value": "postgres://x"}]}},
     "DATABASE_URL is set twice"),
])
def test_bad_combinations_fail_clearly(values, message):
    with pytest.raises(helm.HelmRenderError) as err:
        render(values)
    assert message in str(err.value)


# --------------------------------------------------------------------------------------------
# Every rendered object is valid Kubernetes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_manifests_validate_strict(scenario, k8s_version):
    name, _, r = scenario
    assert r.objects, f"{name}: nothing rendered"
    for obj in r.objects:
        body = strip(obj)
        where = f"{name}: {obj['__source__']}: {obj['kind']}/{obj['metadata']['name']}"
        crd_schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if crd_schema is not None:
                jsonschema.Draft202012Validator(crd_schema).validate(body)
            else:
                kubernetes_validate.validate(body, k8s_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{where}: no schema to validate against: {e.message}")
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            pytest.fail(f"{where} is invalid for Kubernetes {k8s_version} at {path}: {e.message}")


def test_names_fit_with_the_longest_release_name():
    long_name = "r" * 53  # Helm's maximum release name length
    r = render({"keda": {"enabled": True}, "serviceMonitor": {"enabled": True}}, name=long_name)
    for obj in r.objects:
        n = obj["metadata"]["name"]
        assert len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n), n
        if obj["kind"] in ("StatefulSet", "Deployment"):
            # Pods carry "<name>-<hash>" labels, which must stay within 63 characters.
            assert len(n) <= 52, n
    for values in (EXTERNAL,):
        for obj in render(values, name=long_name).objects:
            assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

def test_standard_labels_everywhere(scenario):
    name, _, r = scenario
    for obj in r.objects:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{name}: {obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/name"] == "shardlease"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "shardlease"
        assert labels["helm.sh/chart"] == "shardlease-0.1.0"
    for owner, _ in pod_templates(r):
        if owner["kind"] == "Pod":
            continue
        tmpl = owner["spec"]["template"]["metadata"]["labels"]
        assert all(k in tmpl for k in STANDARD_LABELS), owner["metadata"]["name"]
        selector = owner["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= tmpl.items(), f"{owner['metadata']['name']}: selector/labels mismatch"
        # Selectors are immutable: nothing version-dependent in them.
        assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector


def test_services_and_pdb_select_the_right_pods(scenario):
    name, _, r = scenario
    workloads = [o for o in r.objects if o["kind"] in ("Deployment", "StatefulSet")]

    def selected(selector: dict[str, str]) -> list[str]:
        return [w["metadata"]["name"] for w in workloads
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]

    metrics = r.one("Service", f"{FULLNAME}-metrics")
    assert selected(metrics["spec"]["selector"]) == [FULLNAME]
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["http"]
    assert metrics["spec"]["ports"][0]["targetPort"] == "http"
    for pdb in r.of_kind("PodDisruptionBudget"):
        assert selected(pdb["spec"]["selector"]["matchLabels"]) == [FULLNAME]
    for svc in r.of_kind("Service"):
        if svc["metadata"]["name"].startswith(f"{FULLNAME}-postgresql"):
            assert selected(svc["spec"]["selector"]) == [f"{FULLNAME}-postgresql"]
    for sm in r.of_kind("ServiceMonitor"):
        assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
        assert sm["spec"]["endpoints"][0]["port"] == "http"
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


# --------------------------------------------------------------------------------------------
# The worker Deployment
# --------------------------------------------------------------------------------------------

def worker_container(r: Rendered) -> dict[str, Any]:
    containers = r.deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]


def test_worker_member_id_probes_and_port(scenario):
    _, _, r = scenario
    c = worker_container(r)
    assert c["args"] == ["run"]
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["SHARDLEASE_LOG_FORMAT"]["value"] == "json"
    assert env["SHARDLEASE_HTTP_ADDR"]["value"] == "0.0.0.0:8080"
    assert env["SHARDLEASE_GROUP"]["value"] == "work_items"
    for var, default in (("SHARDLEASE_HEARTBEAT", "1s"), ("SHARDLEASE_LEASE_TTL", "5s"),
                         ("SHARDLEASE_TICK", "1s")):
        assert env[var]["value"] == default
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


def test_every_worker_binary_container_gets_pod_name(scenario):
    _, _, r = scenario
    seen = 0
    for owner, spec in pod_templates(r):
        for c in all_containers(spec):
            if runs_worker_binary(c):
                seen += 1
                assert env_of(c)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", \
                    f"{owner['metadata']['name']}/{c['name']}"
    assert seen >= 1


def test_termination_grace_period_covers_the_hand_off(scenario):
    _, _, r = scenario
    spec = r.deployment["spec"]["template"]["spec"]
    # The worker leaves the group and exits within 2 s of SIGTERM.
    assert spec["terminationGracePeriodSeconds"] == 15
    assert render({"terminationGracePeriodSeconds": 30}).deployment["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"] == 30


def test_replicas_only_without_an_autoscaler(scenario):
    name, values, r = scenario
    autoscaled = values.get("keda", {}).get("enabled") or values.get("hpa", {}).get("enabled")
    spec = r.deployment["spec"]
    if autoscaled:
        assert "replicas" not in spec, f"{name}: the autoscaler owns replicas"
    else:
        assert spec["replicas"] == 3
    assert render({"replicaCount": 5}).deployment["spec"]["replicas"] == 5


def test_security_context_everywhere(scenario):
    name, _, r = scenario
    for owner, spec in pod_templates(r):
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, owner["metadata"]["name"]
        for c in all_containers(spec):
            sc = c.get("securityContext", {})
            where = f"{name}: {owner['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert c.get("resources", {}).get("limits", {}).get("memory"), where


# --------------------------------------------------------------------------------------------
# The database Secret and its references
# --------------------------------------------------------------------------------------------

def expected_db_secret(values: dict[str, Any]) -> tuple[str, str]:
    """The owner's DATABASE_URL: what the migrations (and wait-for-postgres) read."""
    if values.get("postgresql", {}).get("enabled", True):
        return f"{FULLNAME}-db", "DATABASE_URL"
    ext = values["externalDatabase"]
    return ext["existingSecret"], ext.get("existingSecretKey", "DATABASE_URL")


def expected_member_secret(values: dict[str, Any]) -> tuple[str, str]:
    """The workers' DATABASE_URL (run, helm test, KEDA): roles.memberSecret when set, else the owner's."""
    roles = values.get("roles", {})
    if roles.get("memberSecret"):
        return roles["memberSecret"], roles.get("memberSecretKey") or "DATABASE_URL"
    return expected_db_secret(values)


def is_migration(container: dict[str, Any]) -> bool:
    return container.get("args") == ["migrate"]


def test_database_url_comes_from_the_right_secret(scenario):
    """The migrations read the owner's Secret; the workers, helm test and KEDA the members' (the owner's
    when roles.memberSecret is unset)."""
    name, values, r = scenario
    owner = {"secretKeyRef": dict(zip(("name", "key"), expected_db_secret(values)))}
    member_name, member_key = expected_member_secret(values)
    member = {"secretKeyRef": {"name": member_name, "key": member_key}}
    users = 0
    for workload, spec in pod_templates(r):
        if workload["kind"] == "StatefulSet":
            continue  # PostgreSQL itself: checked in test_bundled_postgresql
        for c in all_containers(spec):
            env = env_of(c)
            where = f"{name}: {workload['metadata']['name']}/{c['name']}"
            if is_migration(c) or c["name"] == "wait-for-postgres":
                users += 1
                assert env["DATABASE_URL"]["valueFrom"] == owner, where
            elif runs_worker_binary(c):
                users += 1
                assert env["DATABASE_URL"]["valueFrom"] == member, where
            assert "value" not in env.get("DATABASE_URL", {}), "DATABASE_URL must not be inlined"
    assert users >= 1
    for auth in r.of_kind("TriggerAuthentication"):
        assert auth["spec"]["secretTargetRef"] == [
            {"parameter": "connection", "name": member_name, "key": member_key}]
    # A user-supplied Secret is never rendered (and so never overwritten) by the chart.
    if not values.get("postgresql", {}).get("enabled", True):
        assert not r.of_kind("Secret")


def test_roles_are_granted_by_the_migrations_only(scenario):
    """SHARDLEASE_MEMBER_ROLE and SHARDLEASE_INSPECTOR_ROLE (migrate then grants) are set on the migration
    containers alone, when roles.member and roles.inspector are set; no other container sees the owner's Secret."""
    name, values, r = scenario
    roles = values.get("roles", {})
    want = {k: v for k, v in (("SHARDLEASE_MEMBER_ROLE", roles.get("member")),
                              ("SHARDLEASE_INSPECTOR_ROLE", roles.get("inspector"))) if v}
    migrations = 0
    owner_secret = expected_db_secret(values)[0]
    for workload, spec in pod_templates(r):
        for c in all_containers(spec):
            env = env_of(c)
            got = {k: env[k]["value"] for k in ("SHARDLEASE_MEMBER_ROLE", "SHARDLEASE_INSPECTOR_ROLE") if k in env}
            where = f"{name}: {workload['metadata']['name']}/{c['name']}"
            if is_migration(c):
                migrations += 1
                assert got == want, where
            else:
                assert not got, where
                if roles.get("memberSecret") and runs_worker_binary(c):
                    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                            if "secretKeyRef" in e.get("valueFrom", {})]
                    assert owner_secret not in refs, f"{where} must not read the owner's Secret"
    if roles.get("member") or roles.get("inspector"):
        assert migrations >= 1, f"{name}: the grants need a migration container"


def test_roles_render_and_document():
    r = render(ROLES)
    (job,) = r.of_kind("Job")
    env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert env["SHARDLEASE_MEMBER_ROLE"]["value"] == "sl_worker"
    assert env["SHARDLEASE_INSPECTOR_ROLE"]["value"] == "sl_inspector"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-db", "key": "url"}
    assert env_of(worker_container(r))["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "member-db", "key": "DATABASE_URL"}
    test_pod = r.one("Pod", f"{FULLNAME}-test")
    assert env_of(test_pod["spec"]["containers"][0])["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "member-db"
    for snippet in ("connect as the member role sl_worker", "Secret member-db (key DATABASE_URL)",
                    "member role sl_worker: join, heartbeat, leave, reap, tick work_items",
                    "inspector role sl_inspector: read the views",
                    "the member role may not insert: seed with the owner's DATABASE_URL (Secret my-db)"):
        assert snippet in r.notes, snippet
    # Without roles, nothing about them.
    plain = render(EXTERNAL)
    assert "member role" not in plain.notes
    (job,) = plain.of_kind("Job")
    assert "SHARDLEASE_MEMBER_ROLE" not in env_of(job["spec"]["template"]["spec"]["containers"][0])


def expected_work_db_secret(values: dict[str, Any]) -> tuple[str, str] | None:
    work = values.get("workDatabase", {})
    if not work.get("existingSecret"):
        return None
    return work["existingSecret"], work.get("secretKey") or "WORK_DATABASE_URL"


def test_work_database_url_only_on_the_worker(scenario):
    """WORK_DATABASE_URL (the fenced ticks, maybe through a transaction pooler) is set on the worker
    container alone, from workDatabase's Secret; migrations, helm test and KEDA stay on DATABASE_URL."""
    name, values, r = scenario
    expected = expected_work_db_secret(values)
    env = env_of(worker_container(r))
    if expected is None:
        assert "WORK_DATABASE_URL" not in env, f"{name}: unset by default, the worker uses DATABASE_URL"
    else:
        assert env["WORK_DATABASE_URL"] == {"name": "WORK_DATABASE_URL", "valueFrom": {
            "secretKeyRef": {"name": expected[0], "key": expected[1]}}}, name
    # The session connection is unchanged either way.
    session_secret, session_key = expected_member_secret(values)
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": session_secret, "key": session_key}
    for owner, spec in pod_templates(r):
        for c in all_containers(spec):
            if owner is r.deployment and c["name"] == "worker":
                continue
            assert "WORK_DATABASE_URL" not in env_of(c), \
                f"{name}: {owner['metadata']['name']}/{c['name']} must use DATABASE_URL only"
    for auth in r.of_kind("TriggerAuthentication"):
        assert [ref["name"] for ref in auth["spec"]["secretTargetRef"]] == [session_secret]


def test_work_database_renders_and_documents():
    r = render()
    assert "WORK_DATABASE_URL" not in env_of(worker_container(r))
    assert "set workDatabase.existingSecret" in r.notes

    r = render({**EXTERNAL, **WORK_DB, "migrations": {"strategy": "initContainer"}})
    ref = env_of(worker_container(r))["WORK_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pgbouncer-url", "key": "WORK_DATABASE_URL"}
    (migrate,) = r.deployment["spec"]["template"]["spec"]["initContainers"]
    assert "WORK_DATABASE_URL" not in env_of(migrate)
    assert "WORK_DATABASE_URL read from Secret pgbouncer-url (key WORK_DATABASE_URL)" in r.notes
    # The user's Secret is never rendered by the chart.
    assert not r.of_kind("Secret")

    r = render({"workDatabase": {"existingSecret": "pgb", "secretKey": "url"}})
    ref = env_of(worker_container(r))["WORK_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pgb", "key": "url"}
    assert "(key url)" in r.notes
    # Extra env of the user still comes after, unduplicated.
    r = render({**WORK_DB, "worker": {"extraEnv": [{"name": "RUST_LOG", "value": "info"}]}})
    names = [e["name"] for e in worker_container(r)["env"]]
    assert names[-2:] == ["WORK_DATABASE_URL", "RUST_LOG"]


def test_hooks_only_use_what_exists_at_hook_time(scenario):
    """A pre-install hook runs before the release's ordinary objects exist: every Secret and
    ServiceAccount it uses must be user-supplied or itself a hook with a lower weight."""
    name, _, r = scenario
    rendered = {(o["kind"], o["metadata"]["name"]): o for o in r.objects}
    for owner, spec in pod_templates(r):
        phases = hook_phases(owner)
        if not phases & {"pre-install", "pre-upgrade"}:
            continue

        def available(kind: str, ref: str) -> bool:
            dep = rendered.get((kind, ref))
            if dep is None:
                return True  # not created by the chart: user-supplied
            return phases <= hook_phases(dep) and hook_weight(dep) < hook_weight(owner)

        sa = spec.get("serviceAccountName")
        assert sa is None or available("ServiceAccount", sa), f"{name}: {owner['metadata']['name']} uses SA {sa}"
        for c in all_containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert available("Secret", ref["name"]), \
                        f"{name}: hook {owner['metadata']['name']} reads Secret {ref['name']} before it exists"


def test_bundled_secret_and_database_url():
    r = render()
    secret = r.one("Secret", f"{FULLNAME}-db")
    assert not hook_phases(secret), "nothing reads it at hook time, so it is an ordinary object"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["POSTGRES_USER"] == "shardlease" and data["POSTGRES_DB"] == "shardlease"
    assert re.fullmatch(r"[A-Za-z0-9]{24}", data["POSTGRES_PASSWORD"])
    url = urlsplit(data["DATABASE_URL"])
    assert url.scheme == "postgres"
    assert url.username == "shardlease" and url.password == data["POSTGRES_PASSWORD"]
    # Namespaced host: KEDA's operator resolves it from its own namespace.
    assert url.hostname == f"{FULLNAME}-postgresql.{NAMESPACE}.svc"
    assert url.port == 5432 and url.path == "/shardlease"
    r.one("Service", f"{FULLNAME}-postgresql")

    fixed = render({"postgresql": {"auth": {"password": "s3cret-pass"}}}).one("Secret")
    assert base64.b64decode(fixed["data"]["POSTGRES_PASSWORD"]).decode() == "s3cret-pass"
    unkept = render({"postgresql": {"auth": {"keepSecretOnUninstall": False}}}).one("Secret")
    assert "helm.sh/resource-policy" not in unkept["metadata"].get("annotations", {})


def test_bundled_postgresql():
    r = render()
    sts = r.one("StatefulSet", f"{FULLNAME}-postgresql")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == f"{FULLNAME}-postgresql-hl"
    headless = r.one("Service", f"{FULLNAME}-postgresql-hl")
    assert headless["spec"]["clusterIP"] == "None"

    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["metadata"]["name"] == "data"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster default
    # volumeClaimTemplates are immutable: a version label there would break every upgrade.
    assert "app.kubernetes.io/version" not in pvc["metadata"]["labels"]
    assert "helm.sh/chart" not in pvc["metadata"]["labels"]

    spec = sts["spec"]["template"]["spec"]
    (pg,) = spec["containers"]
    assert pg["image"] == "postgres:15"
    mounts = {m["name"]: m["mountPath"] for m in pg["volumeMounts"]}
    assert mounts["data"] == "/var/lib/postgresql/data"
    env = env_of(pg)
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
    for var in ("POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-db", "key": var}
    assert "pg_isready" in " ".join(pg["readinessProbe"]["exec"]["command"])

    custom = render({"postgresql": {"persistence": {"storageClass": "fast", "size": "5Gi"}}})
    (pvc,) = custom.one("StatefulSet")["spec"]["volumeClaimTemplates"]
    assert pvc["spec"]["storageClassName"] == "fast"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_external_database_renders_no_postgresql():
    r = render(EXTERNAL)
    assert not r.of_kind("StatefulSet")
    assert not [s for s in r.of_kind("Service") if "postgresql" in s["metadata"]["name"]]


# --------------------------------------------------------------------------------------------
# Migrations
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("upgrade", [False, True])
def test_external_database_migrates_in_a_pre_install_hook(upgrade):
    r = render(EXTERNAL, upgrade=upgrade)
    job = r.one("Job", f"{FULLNAME}-migrate")
    ann = job["metadata"]["annotations"]
    assert hook_phases(job) == {"pre-install", "pre-upgrade"}
    assert "helm.sh/hook-weight" in ann
    assert set(ann["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    # The chart's ServiceAccount does not exist yet at pre-install time.
    assert "serviceAccountName" not in spec
    (c,) = spec["containers"]
    assert c["args"] == ["migrate"]
    assert env_of(c)["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-db", "key": "url"}
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["activeDeadlineSeconds"] > 0
    # The workers themselves do not migrate in this mode.
    assert "initContainers" not in r.deployment["spec"]["template"]["spec"]


def test_bundled_database_migrates_in_an_init_container():
    r = render()
    # No pre-install hook could reach the bundled PostgreSQL: Helm creates it after those hooks.
    assert not r.of_kind("Job")
    inits = r.deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["wait-for-postgres", "migrate"]
    wait, migrate = inits
    assert "pg_isready" in wait["command"][-1] and "$DATABASE_URL" in wait["command"][-1]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == worker_container(r)["image"]
    assert env_of(migrate)["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-db"


def test_other_migration_strategies():
    r = render({**EXTERNAL, "migrations": {"strategy": "initContainer"}})
    assert not r.of_kind("Job")
    inits = r.deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["migrate"]  # no bundled PostgreSQL to wait for

    r = render({**EXTERNAL, "migrations": {"strategy": "hook"}})
    r.one("Job", f"{FULLNAME}-migrate")

    r = render({"migrations": {"strategy": "none"}})
    assert not r.of_kind("Job")
    assert "initContainers" not in r.deployment["spec"]["template"]["spec"]


# --------------------------------------------------------------------------------------------
# Autoscaling
# --------------------------------------------------------------------------------------------

def test_keda_scales_on_the_number_of_items():
    r = render({"keda": {"enabled": True, "itemsPerWorker": 250, "maxReplicaCount": 7}})
    assert not r.of_kind("HorizontalPodAutoscaler")
    so = r.one("ScaledObject", FULLNAME)
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert so["spec"]["maxReplicaCount"] == 7
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["metadata"] == {"query": "SELECT count(*) FROM public.work_items",
                                   "targetQueryValue": "250"}
    auth = r.one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "connection", "name": f"{FULLNAME}-db", "key": "DATABASE_URL"}]
    assert "replicas" not in r.deployment["spec"]


def test_hpa_is_the_cpu_alternative():
    r = render({"hpa": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}})
    assert not r.of_kind("ScaledObject") and not r.of_kind("TriggerAuthentication")
    hpa = r.one("HorizontalPodAutoscaler", FULLNAME)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in r.deployment["spec"]


def test_defaults_have_no_autoscaler_and_no_crds():
    r = render()
    for kind in ("ScaledObject", "TriggerAuthentication", "HorizontalPodAutoscaler", "ServiceMonitor"):
        assert not r.of_kind(kind), kind


# --------------------------------------------------------------------------------------------
# Odds and ends
# --------------------------------------------------------------------------------------------

def test_defaults_render_the_expected_objects():
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render().objects)
    assert kinds == sorted([
        ("Deployment", FULLNAME),
        ("Pod", f"{FULLNAME}-test"),
        ("PodDisruptionBudget", FULLNAME),
        ("Secret", f"{FULLNAME}-db"),
        ("Service", f"{FULLNAME}-metrics"),
        ("Service", f"{FULLNAME}-postgresql"),
        ("Service", f"{FULLNAME}-postgresql-hl"),
        ("ServiceAccount", FULLNAME),
        ("StatefulSet", f"{FULLNAME}-postgresql"),
    ])


def test_image_defaults_to_app_version():
    assert worker_container(render())["image"] == f"{WORKER_IMAGE_REPO}:0.1.0"
    assert worker_container(render())["imagePullPolicy"] == "IfNotPresent"
    assert worker_container(render({"image": {"tag": "dev"}}))["image"] == f"{WORKER_IMAGE_REPO}:dev"
    digest = "sha256:" + "b" * 64
    assert worker_container(render({"image": {"digest": digest}}))["image"] == f"{WORKER_IMAGE_REPO}@{digest}"


def test_helm_test_pod_runs_status():
    pod = render().one("Pod", f"{FULLNAME}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["args"] == ["status"]
    assert not render({"tests": {"enabled": False}}).of_kind("Pod")


@pytest.mark.parametrize("values", [{}, EXTERNAL, {**EXTERNAL, **WORK_DB}, ROLES])
def test_notes_show_how_to_inspect(values):
    notes = render(values).notes
    for snippet in (
        "SELECT * FROM shardlease.members;",
        "SELECT group_name, generation, slot_count, alive_members FROM shardlease.group_status;",
        "SELECT currentworker, count(*) FROM public.work_items GROUP BY 1 ORDER BY 1;",
        "SELECT * FROM public.work_items ORDER BY currentWorker;",
        f"kubectl -n {NAMESPACE} logs -l app.kubernetes.io/name=shardlease,app.kubernetes.io/instance={RELEASE}",
        f"exec deploy/{FULLNAME} -c worker -- shardlease-worker status",
        "psql",
    ):
        assert snippet in notes, snippet
