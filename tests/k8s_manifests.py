"""Renders a Helm chart with the real Helm engine (helm-python-sdk wraps Helm's Go SDK, offline)
and takes its objects and containers apart. Shared by the deploy tests: llmd's own chart and
llm-d's modelservice chart.
"""

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
    workload's kind and name, `init` (bool) and the container itself."""
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
                        }
                    )
    return found
