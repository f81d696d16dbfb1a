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

/// `llmd ARGS... --check-config` with `env` added: (success, stdout, stderr).
fn check_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmd"));
    c.args(args)
        .arg("--check-config")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("VLLM_NIXL_SIDE_CHANNEL_HOST")
        .env_remove("VLLM_NIXL_SIDE_CHANNEL_PORT")
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("running llmd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The body of `GET path` on 127.0.0.1:`port`, once it answers (None: not yet).
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.lines().next().unwrap_or("");
    status
        .contains(" 200 ")
        .then(|| out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// A child process killed when the test ends, passing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_takes_the_model_positionally_as_vllm_serve_does() {
    // What llm-d's chart renders: `vllm serve MODEL --port N --served-model-name NAME`.
    let model = stories();
    let model = model.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_llmd"))
            .args(["serve", model, "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--kv-cache-memory-gb", "0.02"])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("running llmd serve"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let models = loop {
        if let Some(body) = http_get(port, "/v1/models") {
            break body;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "llmd serve exited early"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "llmd serve never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    drop(child);
    let v: serde_json::Value = serde_json::from_str(&models).unwrap();
    // Named as it was given, as `--model` names it.
    assert_eq!(v["data"][0]["id"], model, "{models}");

    // Both forms: the same model is fine, two different ones a clear error.
    let (ok, out, err) = check_config(&["serve", model, "--model", model], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("(a local directory)"), "{out}");
    assert!(
        out.contains("cpu weights: the checkpoint's precision"),
        "{out}"
    );
    let (ok, out, err) = check_config(&["serve", model, "--cpu-bf16-weights"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("cpu weights: bf16"), "{out}");
    // int8 weights: reported; another value or the CUDA backend refused, naming what is accepted.
    let (ok, out, err) = check_config(&["serve", model, "--quantization", "int8"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("cpu weights: int8"), "{out}");
    let (ok, _, err) = check_config(&["serve", model, "--quantization", "int4"], &[]);
    assert!(!ok);
    assert!(err.contains("int4") && err.contains("int8"), "{err}");
    let (ok, _, err) = check_config(
        &["serve", model, "--quantization", "int8", "--device", "cuda"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("quantization") && err.contains("CPU"), "{err}");
    let (ok, _, err) = check_config(&["serve", model, "--model", "acme/other"], &[]);
    assert!(!ok);
    assert!(
        err.contains("given twice") && err.contains("acme/other") && err.contains(model),
        "{err}"
    );
}

#[test]
fn check_config_refuses_bad_settings_by_name_and_starts_nothing() {
    let model = stories();
    let model = model.to_str().unwrap();
    let nixl = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#;
    // A good P/D worker as llm-d's chart starts it, with the side channel from the pod's env;
    // port 1 is taken by nobody here, and nothing binds it.
    let env = [
        ("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.1.2.3"),
        ("VLLM_NIXL_SIDE_CHANNEL_PORT", "5601"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4317"),
        ("OTEL_SERVICE_NAME", "vllm-decode"),
    ];
    let serve = |extra: &[&str], env: &[(&str, &str)]| {
        let mut a = vec!["serve", model, "--port", "1", "--enforce-eager"];
        a.extend_from_slice(extra);
        check_config(&a, env)
    };
    let (ok, out, err) = serve(&["--kv-transfer-config", nixl], &env);
    assert!(ok, "{err}");
    assert!(
        out.contains("kv transfer: NixlConnector as Both, side channel 10.1.2.3:5601"),
        "{out}"
    );
    assert!(out.contains("listen: 0.0.0.0:1"), "{out}");
    for (extra, env, named) in [
        (
            &["--kv-transfer-config", "{not json"][..],
            &[][..],
            "--kv-transfer-config",
        ),
        (
            &[
                "--kv-transfer-config",
                r#"{"kv_connector":"P2pNcclConnector","kv_role":"kv_both"}"#,
            ],
            &[],
            "\"P2pNcclConnector\"",
        ),
        (
            &["--kv-transfer-config", nixl],
            &[("VLLM_NIXL_SIDE_CHANNEL_PORT", "56OO")],
            "VLLM_NIXL_SIDE_CHANNEL_PORT",
        ),
        (
            &["--kv-transfer-config", nixl],
            &[("VLLM_NIXL_SIDE_CHANNEL_HOST", "not a host")],
            "VLLM_NIXL_SIDE_CHANNEL_HOST",
        ),
        (
            &["--tensor-parallel-size", "2"],
            &[],
            "--tensor-parallel-size",
        ),
        (&["--kv-events-config", "[]"], &[], "--kv-events-config"),
        (&["--block-size", "12"], &[], "block_size"),
        (
            &["--kv-transfer-secret-file", "/nonexistent/secret"],
            &[],
            "--kv-transfer-secret-file",
        ),
    ] {
        let (ok, _, err) = serve(extra, env);
        assert!(!ok, "{extra:?} {env:?} passed");
        assert!(err.contains(named), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    // The sidecar: llm-d's chart's arguments pass (logging ones ignored, said), a connector
    // llmd does not speak is refused by name.
    let (ok, out, err) = check_config(
        &[
            "sidecar",
            "--port=8000",
            "--vllm-port=8200",
            "--connector=nixlv2",
            "--zap-encoder=json",
            "--zap-log-level=debug",
            "--secure-proxy=false",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("decoder: http://127.0.0.1:8200"), "{out}");
    assert!(
        out.contains("warning: --zap-log-level=debug ignored"),
        "{out}"
    );
    for (arg, named) in [
        ("--connector=lmcache", "--connector=lmcache"),
        ("--kv-connector=nixl", "--kv-connector=nixl"),
        ("--secure-proxy=true", "--secure-proxy=true"),
        ("--prefiller-allowlist=a/b:1", "--prefiller-allowlist"),
        ("--no-such-flag=1", "--no-such-flag"),
    ] {
        let (ok, _, err) = check_config(&["sidecar", arg], &[]);
        assert!(!ok, "{arg} passed");
        assert!(err.contains(named), "{arg}: {err}");
    }

    // The router: a scheduling config that is not there is named.
    let (ok, out, err) = check_config(
        &["route", "--worker", "http://127.0.0.1:1", "--model", model],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("workers: 1 aggregated"), "{out}");
    let (ok, _, err) = check_config(
        &[
            "route",
            "--worker",
            "http://127.0.0.1:1",
            "--config",
            "/nonexistent/epp.yaml",
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("/nonexistent/epp.yaml"), "{err}");
}

#[test]
fn check_config_on_a_hub_id_says_what_start_does() {
    let home = fake_hf_home("acme", "stories");
    let hf_home = home.path().to_str().unwrap();
    // Cached: found, and its config read.
    let (ok, out, err) = check_config(&["serve", "acme/stories"], &[("HF_HOME", hf_home)]);
    assert!(ok, "{err}");
    assert!(
        out.contains("acme/stories (in the Hugging Face cache") && out.contains("Llama"),
        "{out}"
    );
    // Not cached and online: start downloads it, and says so; nothing is fetched now (the
    // hub endpoint is one nobody answers on).
    let (ok, out, err) = check_config(
        &["serve", "acme/elsewhere"],
        &[("HF_HOME", hf_home), ("HF_ENDPOINT", "http://127.0.0.1:9")],
    );
    assert!(ok, "{err}");
    assert!(out.contains("downloads it at start"), "{out}");
    // Not cached and offline: the error start would give.
    let (ok, _, err) = check_config(
        &["serve", "acme/elsewhere"],
        &[("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(!ok);
    assert!(
        err.contains("acme/elsewhere") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    // A cached model of an architecture llmd does not run: refused now, not at start.
    let snap = std::fs::read_dir(home.path().join("hub/models--acme--stories/snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(
        snap.join("config.json"),
        r#"{"architectures":["OPTForCausalLM"],"model_type":"opt"}"#,
    )
    .unwrap();
    let (ok, _, err) = check_config(&["serve", "acme/stories"], &[("HF_HOME", hf_home)]);
    assert!(!ok);
    assert!(err.contains("OPTForCausalLM"), "{err}");
    // Neither a directory nor a hub id.
    let (ok, _, err) = check_config(&["serve", "/nonexistent/model"], &[]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/model"), "{err}");
}
