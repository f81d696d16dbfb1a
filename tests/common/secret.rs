//! The cluster secret of the tests' deployments: one file per test process, and the
//! trusted-hop header llmd's sidecar and router compute from it.
use std::path::Path;
use std::sync::OnceLock;

static SECRET: OnceLock<tempfile::TempDir> = OnceLock::new();

const BYTES: &[u8] = b"test-cluster-secret-0123456789abcdef";

/// The path of a file holding the tests' cluster secret (`--kv-transfer-secret-file`).
pub fn secret_file() -> &'static Path {
    let dir = SECRET.get_or_init(|| {
        let d = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(d.path().join("secret"), BYTES).expect("writing the secret");
        d
    });
    Box::leak(dir.path().join("secret").into_boxed_path())
}

/// The `x-llmd-trusted-hop` value a hop holding the tests' secret sends.
pub fn hop_token() -> String {
    llmd::kv::auth::ClusterSecret::new(BYTES)
        .expect("a long enough secret")
        .hop_token()
}
