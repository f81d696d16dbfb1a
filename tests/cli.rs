//! The `llmd` binary's model argument: hub ids resolved through a Hugging Face cache laid out
//! as Python's `huggingface_hub` writes it, offline and with an unreachable hub.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stories() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K")
}

fn generate(model: &str, env: &[(&str, &Path)], offline: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmd"));
    c.args(["generate", "--model", model, "--prompt", "Once upon a time"])
        .args(["--max-tokens", "12", "--temperature", "0"])
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_ENDPOINT")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    }
    c.output().expect("running llmd")
}

/// `$HF_HOME/hub/models--<owner>--<name>/{refs/main, snapshots/<rev>/...}` with stories260K's
/// files, as `huggingface_hub` leaves a downloaded model.
fn fake_hf_home(owner: &str, name: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join(format!("hub/models--{owner}--{name}"));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    for f in std::fs::read_dir(stories()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    home
}

#[test]
fn hub_id_resolves_through_the_hf_cache() {
    let home = fake_hf_home("acme", "stories");
    let by_id = generate("acme/stories", &[("HF_HOME", home.path())], true);
    assert!(
        by_id.status.success(),
        "{}",
        String::from_utf8_lossy(&by_id.stderr)
    );
    let by_dir = generate(stories().to_str().unwrap(), &[], false);
    assert!(by_dir.status.success());
    assert!(!by_dir.stdout.is_empty());
    assert_eq!(by_id.stdout, by_dir.stdout, "same model, same greedy text");
}

#[test]
fn uncached_hub_id_offline_is_a_clear_error() {
    let home = fake_hf_home("acme", "stories");
    let out = generate("acme/other-model", &[("HF_HOME", home.path())], true);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("acme/other-model")
            && err.contains("HF_HUB_OFFLINE")
            && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn unreachable_hub_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    let endpoint = Path::new("http://127.0.0.1:9");
    let out = generate(
        "acme/stories",
        &[("HF_HOME", home.path()), ("HF_ENDPOINT", endpoint)],
        false,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("acme/stories") && err.contains("downloading config.json"),
        "{err}"
    );
}

#[test]
fn missing_directory_is_a_clear_error() {
    let out = generate("./no/such/model", &[], true);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("./no/such/model") && err.contains("no such directory"),
        "{err}"
    );
}

#[test]
fn device_flag_is_checked() {
    let run = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_llmd"))
            .args([
                "generate",
                "--prompt",
                "Once",
                "--max-tokens",
                "2",
                "--device",
                device,
            ])
            .arg("--model")
            .arg(stories())
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("running llmd")
    };
    let out = run("gpu");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    assert!(run("cpu").status.success());
    if !llmd::backend::cuda::driver_available() {
        // `auto` without a GPU is the CPU.
        let out = run("auto");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // No GPU here: asking for one is a clear error, not a panic.
        let out = run("cuda:0");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("libcuda") && err.contains("--device cpu"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn serve_on_a_missing_gpu_exits_with_the_reason() {
    if llmd::backend::cuda::driver_available() {
        return; // a CUDA machine: the GPU tests cover serving there
    }
    // The port is bound first, then loading fails: the process must exit, not hang, and say why.
    let out = Command::new(env!("CARGO_BIN_EXE_llmd"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cuda",
        ])
        .arg("--model")
        .arg(stories())
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running llmd serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("libcuda") && err.contains("--device cpu"),
        "{err}"
    );
}

/// `llmd serve` with `--kv-transfer-config` `json`: its exit status and stderr (it must exit
/// before serving: every case here is a configuration error).
fn serve_with_transfer_config(json: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmd"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(["--kv-transfer-config", json, "--kv-transfer-port", "0"])
        .arg("--model")
        .arg(stories())
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running llmd serve");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_kv_transfer_config_without_a_role_or_with_an_unknown_transport_is_refused() {
    let (ok, err) = serve_with_transfer_config(r#"{"kv_connector": "NixlConnector"}"#);
    assert!(!ok);
    assert!(err.contains("kv_role is required"), "{err}");
    let (ok, err) = serve_with_transfer_config(r#"{"kv_role": "kv_decoder"}"#);
    assert!(!ok);
    assert!(
        err.contains("kv_role") && err.contains("kv_consumer"),
        "{err}"
    );
    let (ok, err) = serve_with_transfer_config(
        r#"{"kv_role": "kv_both", "kv_connector_extra_config": {"transport": "ucx"}}"#,
    );
    assert!(!ok);
    assert!(err.contains("\"ucx\"") && err.contains("\"rdma\""), "{err}");
    let (ok, err) = serve_with_transfer_config("{not json");
    assert!(!ok);
    assert!(err.contains("--kv-transfer-config"), "{err}");
}

#[test]
fn the_rdma_transport_without_a_verbs_device_is_a_clear_error_at_start() {
    let (ok, err) = serve_with_transfer_config(
        r#"{"kv_connector": "NixlConnector", "kv_role": "kv_producer",
            "kv_connector_extra_config": {"transport": "rdma", "backends": ["UCX"]}}"#,
    );
    assert!(!ok, "{err}");
    assert!(err.contains("RDMA"), "{err}");
    if cfg!(feature = "rdma") {
        assert!(
            err.contains("infiniband") || err.contains("libibverbs"),
            "{err}"
        );
    } else {
        assert!(err.contains("--features rdma"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}
