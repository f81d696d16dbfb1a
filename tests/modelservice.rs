//! llmd under llm-d's own modelservice chart, unmodified: `tests/modelservice.py` renders the
//! vendored chart with the real Helm engine (llmd's values files, and the chart's own examples
//! with `vllm serve` swapped for `llmd serve`), and runs every container's command, args and
//! env through `llmd … --check-config`.
mod common;

use common::python_imports;

#[test]
fn llm_d_modelservice_chart_runs_llmd() {
    if !python_imports(
        &["helm_python", "yaml"],
        "python3 -m pip install helm-python-sdk pyyaml",
    ) {
        return;
    }
    let script = format!("{}/tests/modelservice.py", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .args([&script, env!("CARGO_BIN_EXE_llmd")])
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "tests/modelservice.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both values files (with and without tracing) and every chart example ran.
    for name in [
        "ok values-llmd-pd:",
        "ok values-llmd-pd +tracing:",
        "ok values-llmd-cpu:",
        "ok values-llmd-cpu +tracing:",
        "ok chart example values-pd:",
        "ok chart example values-cpu:",
        "ok chart example values-pd+proxy-values:",
        "ok: refused on purpose:",
    ] {
        assert!(stdout.contains(name), "{name} missing:\n{stdout}");
    }
}
