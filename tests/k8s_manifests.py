"""Renders a Helm chart with the real Helm engine (helm-python-sdk wraps Helm's Go SDK, offline)
and takes its objects and containers apart. Shared by the deploy tests: llmd's own chart and
llm-d's modelservice chart.
"""

import base64
import copy
import os

import yaml
from helm_python.chart import Chart


def render(chart_dir, values, name="llmd", namespace="default"):
    """Every object the chart renders for `values` (a dict), as dicts, in file order."""
    out = Chart.load(str(chart_dir)).render(
        values, name=name, namespace=namespace, is_install=True
    )
    objs = []
    for path in sorted(out):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                objs.append(doc)
    return objs


def merged(base, over):
    """`base` with `over` merged in, dicts recursively (as Helm merges values files)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def pod_spec(obj):
    """The pod spec of a workload (Deployment, StatefulSet, ReplicaSet, Job, LeaderWorkerSet's
    leader and worker templates, Pod), or None."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind == "LeaderWorkerSet":
        lws = spec.get("leaderWorkerTemplate") or {}
        return [
            t["spec"]
            for t in (lws.get("leaderTemplate"), lws.get("workerTemplate"))
            if t and t.get("spec")
        ]
    tmpl = spec.get("template") or {}
    if kind == "CronJob":
        tmpl = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
    return [tmpl["spec"]] if tmpl.get("spec") else None


def containers(objs):
    """Every container (init containers too) of every workload in `objs`: dicts with the
    workload's kind and name, `init` (bool), the container itself and its pod spec."""
    found = []
    for obj in objs:
        for spec in pod_spec(obj) or []:
            for init, key in ((True, "initContainers"), (False, "containers")):
                for c in spec.get(key) or []:
                    found.append(
                        {
                            "kind": obj["kind"],
                            "workload": obj["metadata"]["name"],
                            "init": init,
                            "container": c,
                            "pod": spec,
                        }
                    )
    return found


# What the kubelet sets in every container: the API server's Service.
KUBERNETES_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
# Values of the downward API fields the charts use, for one made-up pod.
FIELD_VALUES = {
    "status.podIP": "10.0.0.5",
    "status.hostIP": "10.0.1.1",
    "metadata.name": "pod-0",
    "metadata.namespace": "default",
    "spec.nodeName": "node-0",
}


def _object(objs, kind, name):
    for o in objs:
        if o.get("kind") == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"{kind} {name} is not rendered")


def _data(obj):
    """A rendered Secret's or ConfigMap's files: key -> bytes."""
    if obj["kind"] == "ConfigMap":
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    else:
        out = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


def pod_view(objs, found, root):
    """A container as it would run in its pod, outside one: (argv, env). Its Secret and
    ConfigMap volumes are written under `root` from the rendered objects (as the kubelet
    mounts them; a file of a Secret the chart does not render, named by an argument, gets a
    made-up 32-byte value), other
    volumes are empty directories there, and every argument under a mount path is moved
    under `root`; the env is the container's (downward API fields and secretKeyRefs resolved)
    plus what the kubelet adds. `found` is one item of `containers(objs)`; its argv is
    `command + args`, the caller's entrypoint first when there is no command."""
    c, pod = found["container"], found["pod"]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    moves = []
    made_up = set()
    for m in c.get("volumeMounts") or []:
        local = os.path.join(root, found["workload"], c["name"], m["name"])
        os.makedirs(local, exist_ok=True)
        v = volumes[m["name"]]
        files = {}
        if "secret" in v:
            try:
                files = _data(_object(objs, "Secret", v["secret"]["secretName"]))
            except AssertionError:
                # Given by the user (an existing Secret): every file an argument names.
                made_up.add(local)
            items = v["secret"].get("items")
        elif "configMap" in v:
            files = _data(_object(objs, "ConfigMap", v["configMap"]["name"]))
            items = v["configMap"].get("items")
        else:
            items = None
        if items:
            files = {i["path"]: files.get(i["key"], b"s" * 32) for i in items}
        if m.get("subPath"):
            files = {"": files.get(m["subPath"], b"")}
        for name, data in files.items():
            path = os.path.join(local, name) if name else local
            if name:
                with open(path, "wb") as f:
                    f.write(data)
            elif m.get("subPath"):
                os.rmdir(local)
                with open(local, "wb") as f:
                    f.write(data)
        moves.append((m["mountPath"].rstrip("/"), local))
    moves.sort(key=lambda p: -len(p[0]))

    def moved(arg):
        prefix, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
        for mount, local in moves:
            if value == mount or value.startswith(mount + "/"):
                path = local + value[len(mount):]
                if local in made_up and path != local and not os.path.exists(path):
                    with open(path, "wb") as f:
                        f.write(b"s" * 32)
                return prefix + eq + path
        return arg

    argv = [moved(str(a)) for a in (c.get("command") or []) + (c.get("args") or [])]
    env = dict(KUBERNETES_ENV)
    for e in c.get("env") or []:
        src = e.get("valueFrom") or {}
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "fieldRef" in src:
            env[e["name"]] = FIELD_VALUES[src["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            try:
                env[e["name"]] = _data(_object(objs, "Secret", ref["name"]))[ref["key"]].decode()
            except (AssertionError, KeyError):
                env[e["name"]] = "s" * 32
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[e["name"]] = _data(_object(objs, "ConfigMap", ref["name"]))[ref["key"]].decode()
    return argv, env
