//! Whether the Python side of a test can run: the pyzmq subscriber of the KV-event tests,
//! transformers as a model reference. Without it a test skips on a developer's machine but
//! fails under `CI`, which installs it.
use std::process::Command;

/// True when `python3` imports every module of `modules`. False (the caller skips) only
/// outside CI; under CI the assertion names `install`, the command that provides them.
pub fn python_imports(modules: &[&str], install: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "this test needs Python 3 with {modules:?} under CI: run `{install}` (.ci/run does)"
    );
    if !ok {
        eprintln!("skipping: Python 3 with {modules:?} is needed ({install})");
    }
    ok
}

/// True when `python3` imports pyzmq and msgpack (the KV events subscriber).
pub fn python_has_zmq() -> bool {
    python_imports(
        &["zmq", "msgpack"],
        "python3 -m pip install pyzmq msgpack msgspec",
    )
}
