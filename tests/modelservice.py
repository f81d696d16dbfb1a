"""llmd under llm-d's own modelservice chart, unmodified (../shared/vendor/llm-d-modelservice).

Renders the chart with the real Helm engine (tests/k8s_manifests.py) and takes every
container's command, args and env from what it renders, then runs each through
`llmd ... --check-config` with that env (a pod's downward-API values filled in, its model
volume a Hugging Face cache holding the shared SmolLM2 files):

1. llmd's values files (deploy/llm-d-modelservice/values-llmd-{pd,cpu}.yaml), with and without
   the chart's tracing env: every container is llmd (the llmd image; `llmd serve` as command,
   or the sidecar tag, whose entrypoint is `llmd sidecar`, for the args-only routing proxy),
   and every one passes, with the model found in the volume and its architecture read.
2. The chart's own examples (examples/values-pd.yaml, values-cpu.yaml), `vllm serve` replaced
   by `llmd serve` and the routing proxy by `llmd sidecar`, and the same with every optional
   routing-proxy value the chart knows set: every flag llmd has an equivalent for is accepted.
   A flag llmd refuses on purpose is in REFUSED with the reason; a container carrying one must
   fail naming it, and pass once it is taken out.

Usage: python3 tests/modelservice.py PATH/TO/llmd
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from k8s_manifests import containers, merged, render  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENDOR = ROOT.parent / "shared" / "vendor" / "llm-d-modelservice"
CHART = VENDOR / "charts" / "llm-d-modelservice"
EXAMPLES = VENDOR / "examples"
OURS = ROOT / "deploy" / "llm-d-modelservice"
SMOLLM2 = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
POD_IP = "10.1.2.3"

# Flags the chart can render that llmd refuses on purpose, and why (what the error names).
REFUSED = {
    # decode/prefill.parallelism.tensor > 1
    "--tensor-parallel-size": "an llmd worker is one engine on one device",
    # routing.proxy.secure: true
    "--secure-proxy=true": "llmd's sidecar serves plain HTTP",
}

# The chart's tracing block switched on: OTEL_* env on every container.
TRACING = {"tracing": {"enabled": True}}

# Every optional routing-proxy value the chart renders a flag for.
ALL_PROXY_VALUES = {
    "routing": {
        "proxy": {
            "zapDevel": True,
            "zapEncoder": "console",
            "zapLogLevel": 3,
            "zapStacktraceLevel": "error",
            "zapTimeEncoding": "rfc3339",
            "secure": False,
            "prefillerUseTLS": True,
            "certPath": "/certs",
        }
    }
}




def fake_model_volume(root):
    """The model volume as `llmd serve` leaves it after fetching MODEL_ID into HF_HOME."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / ("models--" + MODEL_ID.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in SMOLLM2.iterdir():
        (snap / f.name).symlink_to(f)


def pod_env(container, volume):
    """The container's env as the kubelet gives it; the model volume's mount is `volume`."""
    env = {}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        ref = (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        known = {"status.podIP": POD_IP, "metadata.namespace": "llmd"}
        assert ref in known, f"env {e['name']}: a source the test does not fill: {e}"
        env[e["name"]] = known[ref]
    mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
    for k in ("HF_HOME", "HF_HUB_CACHE"):
        if k in env:
            assert env[k] in mounts, f"{k}={env[k]} is not a mounted volume"
            env[k] = str(volume)
    return env


def argv_of(entry, as_llmd):
    """`llmd` arguments of a rendered container. `as_llmd`: the chart's own examples, whose
    `vllm serve` (or the image's default command) becomes `llmd serve` and whose routing
    proxy becomes `llmd sidecar`."""
    c = entry["container"]
    cmd, args = c.get("command") or [], [str(a) for a in c.get("args") or []]
    if c["name"] == "routing-proxy":
        assert entry["init"] and not cmd, "the chart's routing proxy is args only"
        if not as_llmd:
            assert c["image"] == "ghcr.io/llmd/llmd:0.1.0-sidecar", c["image"]
        return ["sidecar"] + args
    if as_llmd:
        assert cmd in ([], ["vllm", "serve"]), cmd
        return ["serve"] + args
    assert c["image"] == "ghcr.io/llmd/llmd:0.1.0", f"not llmd's image: {c['image']}"
    assert cmd == ["llmd", "serve"], f"not llmd: {cmd}"
    return ["serve"] + args


def check(llmd, argv, env, home):
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "RUST_LOG": "warn", "RUST_BACKTRACE": "0"}
    base.update(env)
    return subprocess.run([llmd] + argv + ["--check-config"], env=base,
                          capture_output=True, text=True, timeout=60)


def refused_in(argv):
    return [f for f in REFUSED if any(a == f or a.startswith(f + "=") for a in argv)]


def without(argv, flag):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag and "=" not in flag:
            skip = True
        elif a == flag or a.startswith(flag + "="):
            pass
        else:
            out.append(a)
    return out


def run_chart(llmd, values, name, as_llmd, volume, home):
    objs = render(CHART, values, name=name, namespace="llmd")
    found = containers(objs)
    assert found, f"{name}: nothing rendered"
    results = []
    for entry in found:
        c = entry["container"]
        argv = argv_of(entry, as_llmd)
        env = pod_env(c, volume)
        where = f"{name}: {entry['workload']}/{c['name']}"
        refused = refused_in(argv)
        for flag in refused:
            r = check(llmd, argv, env, home)
            assert r.returncode != 0, f"{where}: {flag} was accepted\n{r.stdout}"
            reason = REFUSED[flag]
            assert flag.split("=")[0] in r.stderr and reason in r.stderr, (
                f"{where}: refusing {flag} without naming it and why:\n{r.stderr}")
            argv = without(argv, flag)
        r = check(llmd, argv, env, home)
        assert r.returncode == 0, f"{where}: {argv}\n{r.stderr}"
        assert "configuration OK (nothing started)" in r.stdout, r.stdout
        results.append((entry, argv, env, r.stdout, r.stderr, refused))
    return results


def main():
    llmd = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        volume = tmp / "model-cache"
        fake_model_volume(volume)
        home = tmp / "home"
        home.mkdir()

        # 1. llmd's values files.
        for fname, roles in (("values-llmd-pd.yaml", {"prefill", "decode", "sidecar"}),
                             ("values-llmd-cpu.yaml", {"decode"})):
            values = yaml.safe_load((OURS / fname).read_text())
            for overlay in ({}, TRACING):
                name = fname.removesuffix(".yaml")
                res = run_chart(llmd, merged(values, overlay), "llmd", False, volume, home)
                seen = set()
                for entry, argv, env, out, err, refused in res:
                    assert not refused, f"{fname} carries refused flags {refused}"
                    if overlay:
                        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT"), "tracing env missing"
                    if argv[0] == "sidecar":
                        seen.add("sidecar")
                        assert "decoder: http://127.0.0.1:8200" in out, out
                        assert "listen: 0.0.0.0:8000" in out, out
                        # The chart's zap flags: accepted, each named as ignored.
                        for a in argv[1:]:
                            if a.startswith("--zap-"):
                                assert f"warning: {a.split('=')[0]}" in out, (a, out)
                        continue
                    role = "prefill" if entry["workload"].endswith("-prefill") else "decode"
                    seen.add(role)
                    # The model really was found in the volume and its config read.
                    assert f"model: {MODEL_ID} (in the Hugging Face cache: {volume}" in out, out
                    assert "Llama" in out, out
                    assert f"served model name: {MODEL_ID}" in out, out
                    if fname.endswith("pd.yaml"):
                        port = "8200" if role == "decode" else "8000"
                        assert f"listen: 0.0.0.0:{port}" in out, out
                        assert f"side channel {POD_IP}:5600 (tcp)" in out, out
                        assert "device: cuda:0" in out, out
                    else:
                        assert "device: cpu" in out and "kv transfer: off" in out, out
                assert seen == roles, f"{name}: {seen} != {roles}"
                print(f"ok {name}{' +tracing' if overlay else ''}: {len(res)} containers")

        # 2. The chart's own examples through llmd.
        examples = {
            "values-pd": yaml.safe_load((EXAMPLES / "values-pd.yaml").read_text()),
            "values-cpu": yaml.safe_load((EXAMPLES / "values-cpu.yaml").read_text()),
        }
        variants = {}
        for name, values in examples.items():
            variants[name] = values
            variants[name + "+proxy-values"] = merged(values, ALL_PROXY_VALUES)
        # What llmd refuses, as the chart renders it.
        variants["values-pd+tensor2"] = merged(
            examples["values-pd"], {"decode": {"parallelism": {"tensor": 2}}})
        for c in variants["values-pd+tensor2"]["decode"]["containers"]:
            c["resources"]["limits"]["nvidia.com/gpu"] = 2
            c["resources"]["requests"]["nvidia.com/gpu"] = 2
        variants["values-pd+secure"] = merged(
            examples["values-pd"], {"routing": {"proxy": {"secure": True}}})
        refused_seen = set()
        for name, values in variants.items():
            res = run_chart(llmd, values, "ex", True, volume, home)
            for entry, argv, env, out, err, refused in res:
                refused_seen.update(refused)
                if argv[0] == "serve":
                    # Hub ids not in the volume: what `llmd serve` does at start, said.
                    assert "downloads it at start" in out, out
                    if "kv transfer:" in out and "NixlConnector" in out:
                        assert f"side channel {POD_IP}:5600" in out, out
                if argv[0] == "sidecar" and name.endswith("+proxy-values"):
                    assert "prefillers reached over: https" in out, out
                    assert "warning: --cert-path=/certs ignored" in out, out
            print(f"ok chart example {name}: {len(res)} containers")
        assert refused_seen == set(REFUSED), f"refusals not exercised: {set(REFUSED) - refused_seen}"
        print("ok: refused on purpose: " + "; ".join(f"{k} ({v})" for k, v in REFUSED.items()))


if __name__ == "__main__":
    main()
