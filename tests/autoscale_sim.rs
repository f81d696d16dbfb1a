//! `llmd autoscale simulate`: the real binary on a slice of the shared production trace,
//! checking the JSON interface other tools read, the invariants of every policy, and the PNGs.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The first `lines` requests of the shared trace (about a minute for 300).
fn trace_slice(dir: &Path, lines: usize) -> PathBuf {
    let full = repo().join("../shared/traces/azure-llm-2023-conv.csv");
    let text = std::fs::read_to_string(&full).expect("the shared trace");
    let slice: Vec<&str> = text.lines().take(lines + 1).collect();
    let p = dir.join("slice.csv");
    std::fs::write(&p, slice.join("\n") + "\n").unwrap();
    p
}

fn simulate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmd"))
        .args(["autoscale", "simulate"])
        .args(args)
        .output()
        .expect("run llmd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn policy<'a>(j: &'a Value, name: &str) -> &'a Value {
    j["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {j}"))
}

/// A PNG's signature and a non-empty IHDR.
fn assert_png(p: &Path) {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
    assert_eq!(&b[12..16], b"IHDR");
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    assert!(w > 100 && h > 100, "{w}×{h}");
}

#[test]
fn every_policy_reports_through_the_json_interface_and_draws_its_png() {
    let dir = tempfile::tempdir().unwrap();
    let trace = trace_slice(dir.path(), 300);
    let png = dir.path().join("png");
    let (ok, out, err) = simulate(&[
        "--trace",
        trace.to_str().unwrap(),
        "--json",
        "--png-dir",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let names: Vec<&str> = j["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for want in ["llmd", "wva-saturation", "hpa-queue", "static-peak"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
        let p = policy(&j, want);
        let hours = p["replica_hours"].as_f64().unwrap();
        let cost = p["cost"].as_f64().unwrap();
        assert!(hours > 0.0 && cost >= 0.0, "{p}");
        let att = p["slo_attainment"].as_object().unwrap();
        // The default config's bands with an SLO: priorities 2 and 0.
        for band in ["2", "0"] {
            let x = att[band].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&x), "{want} attainment {x}");
        }
        let shed = p["shed"].as_object().unwrap();
        assert!(shed.contains_key("-1"));
        // Only sheddable requests are ever shed.
        assert_eq!(shed["0"], 0);
        assert_eq!(shed["2"], 0);
        assert_png(&png.join(format!("{want}.png")));
    }
    assert_eq!(policy(&j, "static-peak")["scale_events"], 0);
    let fixed = j["static_peak_replicas"]["h200-8b"].as_u64().unwrap();
    assert_eq!(
        policy(&j, "static-peak")["max_replicas"].as_u64().unwrap(),
        fixed
    );
    // The hindsight bound: a fleet per minute, none above the static fleet that met them all,
    // and no more replica-hours than static-peak spent.
    let bound = &j["hindsight_bound"];
    let minutes = policy(&j, "static-peak")["minutes"].as_u64().unwrap() as usize;
    let per_minute = bound["per_minute"].as_array().unwrap();
    assert_eq!(per_minute.len(), minutes);
    assert!(per_minute
        .iter()
        .all(|m| m["h200-8b"].as_u64().unwrap() <= fixed));
    let b = bound["replica_hours"].as_f64().unwrap();
    assert!(
        b > 0.0 && b <= policy(&j, "static-peak")["replica_hours"].as_f64().unwrap(),
        "{bound}"
    );
    // The causal reference asks a start-up ahead, so it spends at least the bound.
    let causal = &j["causal_reference"];
    let c = causal["replica_hours"].as_f64().unwrap();
    assert!(c >= b - 1e-9, "{causal} vs {bound}");
    assert!(
        (1..=10).contains(&causal["window_minutes"].as_u64().unwrap()),
        "{causal}"
    );
    assert!(causal["margin"]["h200-8b"].is_u64(), "{causal}");
    // The replay is the slice scaled by the default rate factor.
    assert_eq!(j["trace_requests"], 300);
    assert!(j["replayed_requests"].as_u64().unwrap() >= 300);
}

#[test]
fn sheddable_traffic_alone_never_buys_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let trace = trace_slice(dir.path(), 200);
    let cal = repo().join("deploy/autoscale/calibration-h200.json");
    let cfg = std::fs::read_to_string(repo().join("deploy/autoscale/default.yaml"))
        .unwrap()
        .replace(
            "calibration: calibration-h200.json",
            &format!("calibration: {}", cal.display()),
        )
        // Everything sheddable: the bands with an SLO get no share of the traffic.
        .replace("share: 0.3", "share: 0.0")
        .replace("share: 0.5", "share: 0.0")
        .replace("share: 0.2", "share: 1.0");
    let path = dir.path().join("sheddable.yaml");
    std::fs::write(&path, cfg).unwrap();
    let (ok, out, err) = simulate(&[
        "--trace",
        trace.to_str().unwrap(),
        "--config",
        path.to_str().unwrap(),
        "--policies",
        "llmd,wva-saturation",
        "--rate-scale",
        "30",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    let llmd = policy(&j, "llmd");
    assert_eq!(llmd["max_replicas"], 1, "llmd bought capacity: {llmd}");
    assert_eq!(llmd["scale_events"], 0);
    // The load was real: saturation-driven WVA (which cannot tell priorities apart) scales up.
    let wva = policy(&j, "wva-saturation");
    assert!(wva["max_replicas"].as_u64().unwrap() > 1, "{wva}");
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = simulate(&["--trace", "/nonexistent/trace.csv", "--json"]);
    assert!(!ok);
    assert!(err.contains("cannot read trace"), "{err}");

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "TIMESTAMP,ContextTokens,GeneratedTokens\nsoon,1,1\n").unwrap();
    let (ok, _, err) = simulate(&["--trace", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("line 2"), "{err}");

    let trace = trace_slice(dir.path(), 10);
    let cfg = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(repo().join("deploy/autoscale/default.yaml"))
        .unwrap()
        .replace("max_replicas: 64", "max_replicas: 0");
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = simulate(&[
        "--trace",
        trace.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("variants[0].max_replicas"), "{err}");

    let (ok, _, err) = simulate(&["--trace", trace.to_str().unwrap(), "--time-scale", "0"]);
    assert!(!ok);
    assert!(err.contains("--time-scale"), "{err}");
}

#[test]
fn the_cpu_fleet_config_replays_through_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let trace = trace_slice(dir.path(), 300);
    let cfg = repo().join("deploy/autoscale/cpu-smollm2.yaml");
    let (ok, out, err) = simulate(&[
        "--trace",
        trace.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    // The slice is scaled down (rate_scale < 1), never up.
    let replayed = j["replayed_requests"].as_u64().unwrap();
    assert!(replayed > 0 && replayed < 300, "{replayed} replayed");
    for want in ["llmd", "wva-saturation", "hpa-queue", "static-peak"] {
        let p = policy(&j, want);
        assert!(p["replica_hours"].as_f64().unwrap() > 0.0, "{p}");
        let att = p["slo_attainment"].as_object().unwrap();
        for band in ["2", "0"] {
            let x = att[band].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&x), "{want} attainment {x}");
        }
        assert_eq!(p["shed"]["0"], 0);
        assert_eq!(p["shed"]["2"], 0);
    }
    assert!(j["static_peak_replicas"]["cpu-smollm2"].as_u64().unwrap() >= 1);
}
