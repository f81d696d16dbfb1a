//! Whether the Python side of a test can run: the pyzmq subscriber of the KV-event tests.
//! Without it a test skips on a developer's machine but fails under `CI`, which installs it.
use std::process::Command;

/// True when `python3` imports pyzmq and msgpack. False (the caller skips) only outside CI.
pub fn python_has_zmq() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import zmq, msgpack"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "the KV events subscriber tests need Python 3 with pyzmq and msgpack under CI: \
         run `python3 -m pip install pyzmq msgpack msgspec` (.ci/run does)"
    );
    if !ok {
        eprintln!(
            "skipping: Python 3 with pyzmq and msgpack is needed (python3 -m pip install pyzmq \
             msgpack msgspec)"
        );
    }
    ok
}
