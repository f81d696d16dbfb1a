//! The flags of llm-d's own routing sidecar, so that `llmd sidecar` can be the routing proxy
//! llm-d's modelservice chart starts with arguments only (`--port=8000 --vllm-port=8200
//! --connector=nixlv2 --secure-proxy=false --zap-log-level=debug …`).
//!
//! Every flag that sidecar takes is parsed here (as `--flag=value`, the way the chart writes
//! them; booleans as Go reads them, `--flag` alone meaning true) and then, by
//! [`LlmdSidecarFlags::resolve`], either honoured, ignored with a warning (logging: llmd logs
//! through `RUST_LOG`), or refused with an error that names the flag and says why. Nothing
//! here is silently dropped.
use clap::Args;
use std::path::PathBuf;

/// How the sidecar talks to a peer (a prefiller or its decoder).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerTls {
    /// Plain HTTP.
    #[default]
    Off,
    /// HTTPS, the peer's certificate verified against the Mozilla roots.
    Verified,
    /// HTTPS without verifying the peer's certificate (llm-d's `--tls-insecure-skip-verify`).
    SkipVerify,
}

impl PeerTls {
    pub fn scheme(self) -> &'static str {
        match self {
            PeerTls::Off => "http",
            PeerTls::Verified | PeerTls::SkipVerify => "https",
        }
    }
}

impl std::fmt::Display for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerTls::Off => "http",
            PeerTls::Verified => "https",
            PeerTls::SkipVerify => "https (certificate not verified)",
        })
    }
}

/// A Go boolean as Go's `strconv.ParseBool` reads it (`1 t T TRUE true True`, and the same
/// for false).
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// llm-d's routing sidecar's flags (its `pd-sidecar` command), as llm-d's modelservice chart
/// and llm-d's guides pass them.
#[derive(Args, Clone, Debug, Default)]
pub struct LlmdSidecarFlags {
    /// llm-d's name for the P/D protocol between sidecar, prefiller and decoder: `nixlv2`
    /// (the `kv_transfer_params` exchange, which llmd speaks) or `llmd`. Any other (`nixl`,
    /// `lmcache`, `shared-storage`, `sglang`) is refused. Given (as llm-d's chart always
    /// does), and without --prefiller-allowlist, prefillers are trusted as llm-d's sidecar
    /// trusts them without --enable-ssrf-protection: any that the header names.
    #[arg(long, value_name = "NAME")]
    pub connector: Option<String>,
    /// llm-d's newer name for --connector.
    #[arg(long, value_name = "NAME")]
    pub kv_connector: Option<String>,
    /// llm-d: serve TLS. llmd's sidecar serves plain HTTP: `false` is accepted, `true` refused.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub secure_proxy: Option<bool>,
    /// llm-d: the directory of tls.crt/tls.key for --secure-proxy (refused unless
    /// --secure-proxy=false, which makes it unused as in llm-d).
    #[arg(long, value_name = "DIR")]
    pub cert_path: Option<PathBuf>,
    /// Send prefill requests over HTTPS (llm-d's `--enable-tls=prefiller`).
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub prefiller_use_tls: Option<bool>,
    /// Send requests to the decoder over HTTPS (llm-d's `--enable-tls=decoder`).
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub decoder_use_tls: Option<bool>,
    /// Do not verify the prefillers' TLS certificates.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub prefiller_tls_insecure_skip_verify: Option<bool>,
    /// Do not verify the decoder's TLS certificate.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub decoder_tls_insecure_skip_verify: Option<bool>,
    /// Stages reached over TLS, comma-separated: `prefiller`, `decoder` (`encoder`: refused,
    /// llmd has no encoder stage).
    #[arg(long, value_name = "STAGES", value_delimiter = ',')]
    pub enable_tls: Vec<String>,
    /// Stages whose TLS certificates are not verified (as --enable-tls).
    #[arg(long, value_name = "STAGES", value_delimiter = ',')]
    pub tls_insecure_skip_verify: Vec<String>,
    /// llm-d: allow only the pods of an InferencePool as prefillers. Refused when true:
    /// llmd's sidecar restricts prefillers with --prefiller-allowlist instead.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_ssrf_protection: Option<bool>,
    /// llm-d: the InferencePool of --enable-ssrf-protection, `namespace/name` or `name`
    /// (default: $INFERENCE_POOL). Checked; without SSRF protection it has no effect, as in
    /// llm-d.
    #[arg(long, value_name = "POOL")]
    pub inference_pool: Option<String>,
    /// llm-d (deprecated there): the pool's namespace (default: $INFERENCE_POOL_NAMESPACE).
    #[arg(long, value_name = "NAMESPACE")]
    pub inference_pool_namespace: Option<String>,
    /// llm-d (deprecated there): the pool's name (default: $INFERENCE_POOL_NAME).
    #[arg(long, value_name = "NAME")]
    pub inference_pool_name: Option<String>,
    /// llm-d: the API group of the InferencePool (only with SSRF protection).
    #[arg(long, value_name = "GROUP")]
    pub pool_group: Option<String>,
    /// llm-d: pick one of several prefillers in the header at random (default:
    /// $ENABLE_PREFILLER_SAMPLING). Refused when true: the header names one prefiller here.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_prefiller_sampling: Option<bool>,
    /// llm-d: the decoder's data-parallel size. Only 1: an llmd worker is one engine.
    #[arg(long, value_name = "N")]
    pub data_parallel_size: Option<u32>,
    /// llm-d: the encoder stage's connector (E/P/D). Refused: llmd has no encoder stage.
    #[arg(long, value_name = "NAME")]
    pub ec_connector: Option<String>,
    /// llm-d: settings as inline YAML. Refused: give them as flags.
    #[arg(long, value_name = "YAML")]
    pub configuration: Option<String>,
    /// llm-d: settings from a YAML file. Refused: give them as flags.
    #[arg(long, value_name = "FILE")]
    pub configuration_file: Option<PathBuf>,
    /// Logging (zap) of llm-d's sidecar: accepted and ignored (llmd logs through RUST_LOG).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub zap_devel: Option<String>,
    /// Ignored (zap logging; llmd logs through RUST_LOG).
    #[arg(long, value_name = "ENCODER")]
    pub zap_encoder: Option<String>,
    /// Ignored (zap logging; llmd logs through RUST_LOG).
    #[arg(long, value_name = "LEVEL")]
    pub zap_log_level: Option<String>,
    /// Ignored (zap logging; llmd logs through RUST_LOG).
    #[arg(long, value_name = "LEVEL")]
    pub zap_stacktrace_level: Option<String>,
    /// Ignored (zap logging; llmd logs through RUST_LOG).
    #[arg(long, value_name = "ENCODING")]
    pub zap_time_encoding: Option<String>,
    /// Ignored (klog verbosity; llmd logs through RUST_LOG).
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub klog_v: Option<String>,
    /// Ignored (klog; llmd logs through RUST_LOG).
    #[arg(long, value_name = "PATTERN")]
    pub vmodule: Option<String>,
}

/// What llm-d's flags come to in `llmd sidecar`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub prefiller_tls: PeerTls,
    pub decoder_tls: PeerTls,
    /// Started as llm-d's routing proxy (a connector named): without --prefiller-allowlist,
    /// any prefiller the header names is called, as llm-d's sidecar does.
    pub llm_d_mode: bool,
    /// One line per flag accepted but without effect.
    pub warnings: Vec<String>,
}

const TLS_STAGES: &str = "prefiller, decoder";

impl LlmdSidecarFlags {
    /// Honours, ignores (with a warning) or refuses every flag given; `env` reads the
    /// environment llm-d's sidecar reads (INFERENCE_POOL*, ENABLE_PREFILLER_SAMPLING).
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<Resolved, String> {
        let mut r = Resolved::default();
        for (flag, v) in [
            ("--connector", &self.connector),
            ("--kv-connector", &self.kv_connector),
        ] {
            let Some(name) = v else { continue };
            match name.as_str() {
                "nixlv2" | "llmd" => r.llm_d_mode = true,
                "nixl" => return Err(format!(
                    "{flag}={name}: llm-d's first NIXL protocol (deprecated there) is not spoken; llmd's sidecar speaks nixlv2 (kv_transfer_params from the prefiller's answer)"
                )),
                "lmcache" | "shared-storage" | "sglang" => return Err(format!(
                    "{flag}={name}: llmd moves KV between its workers with its own transfer, driven by kv_transfer_params (llm-d's nixlv2); the {name} connector has no equivalent here"
                )),
                other => return Err(format!(
                    "{flag}={other:?} is not a connector llmd's sidecar speaks (nixlv2 or llmd)"
                )),
            }
        }
        match (self.secure_proxy, &self.cert_path) {
            (Some(true), _) => return Err(
                "--secure-proxy=true: llmd's sidecar serves plain HTTP (no TLS listener); pass --secure-proxy=false (llm-d's chart: routing.proxy.secure: false) and terminate TLS at the gateway or mesh".into()
            ),
            (None, Some(p)) => return Err(format!(
                "--cert-path={}: llm-d's sidecar would serve TLS with it, llmd's serves plain HTTP; pass --secure-proxy=false or leave --cert-path out",
                p.display()
            )),
            (Some(false), Some(p)) => r.warnings.push(format!(
                "--cert-path={} ignored: --secure-proxy=false (as in llm-d's sidecar)",
                p.display()
            )),
            _ => {}
        }
        let stages = |flag: &str, list: &[String]| -> Result<(bool, bool), String> {
            let (mut p, mut d) = (false, false);
            for s in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
                match s {
                    "prefiller" => p = true,
                    "decoder" => d = true,
                    "encoder" => {
                        return Err(format!("{flag}=encoder: llmd has no encoder stage (E/P/D)"))
                    }
                    other => {
                        return Err(format!(
                            "{flag}: stage {other:?} is not one of {TLS_STAGES}"
                        ))
                    }
                }
            }
            Ok((p, d))
        };
        let (tls_p, tls_d) = stages("--enable-tls", &self.enable_tls)?;
        let (skip_p, skip_d) =
            stages("--tls-insecure-skip-verify", &self.tls_insecure_skip_verify)?;
        r.prefiller_tls = peer_tls(
            tls_p || self.prefiller_use_tls == Some(true),
            skip_p || self.prefiller_tls_insecure_skip_verify == Some(true),
            "prefillers",
            &mut r.warnings,
        );
        r.decoder_tls = peer_tls(
            tls_d || self.decoder_use_tls == Some(true),
            skip_d || self.decoder_tls_insecure_skip_verify == Some(true),
            "decoder",
            &mut r.warnings,
        );
        let pool = self
            .inference_pool
            .clone()
            .or_else(|| env("INFERENCE_POOL"));
        if let Some(p) = pool.as_deref().filter(|p| !p.is_empty()) {
            let parts: Vec<&str> = p.split('/').collect();
            if parts.len() > 2 || parts.iter().any(|s| s.is_empty()) {
                return Err(format!(
                    "--inference-pool={p:?}: expected namespace/name or name"
                ));
            }
        }
        if self.enable_ssrf_protection == Some(true) {
            return Err(
                "--enable-ssrf-protection=true: llmd's sidecar does not watch an InferencePool for the prefillers it may call; list them with --prefiller-allowlist (host:port patterns, * wildcards)".into()
            );
        }
        for (flag, given) in [
            ("--inference-pool", self.inference_pool.is_some()),
            (
                "--inference-pool-namespace",
                self.inference_pool_namespace.is_some(),
            ),
            ("--inference-pool-name", self.inference_pool_name.is_some()),
            ("--pool-group", self.pool_group.is_some()),
        ] {
            if given {
                r.warnings.push(format!(
                    "{flag} has no effect without --enable-ssrf-protection (as in llm-d's sidecar)"
                ));
            }
        }
        let sampling = match self.enable_prefiller_sampling {
            Some(b) => b,
            None => match env("ENABLE_PREFILLER_SAMPLING") {
                Some(v) => go_bool(&v).map_err(|e| format!("ENABLE_PREFILLER_SAMPLING: {e}"))?,
                None => false,
            },
        };
        if sampling {
            return Err("--enable-prefiller-sampling (or ENABLE_PREFILLER_SAMPLING=true): llmd's sidecar takes one prefiller per request from x-prefiller-host-port; let the scheduler pick it".into());
        }
        if let Some(n) = self.data_parallel_size.filter(|&n| n != 1) {
            return Err(format!(
                "--data-parallel-size={n}: an llmd decode worker is one engine (no data parallelism); run one pod per rank"
            ));
        }
        if let Some(c) = self.ec_connector.as_deref().filter(|c| !c.is_empty()) {
            return Err(format!(
                "--ec-connector={c}: llmd has no encoder stage (E/P/D)"
            ));
        }
        if self.configuration.is_some() || self.configuration_file.is_some() {
            let flag = if self.configuration.is_some() {
                "--configuration"
            } else {
                "--configuration-file"
            };
            return Err(format!(
                "{flag}: llmd's sidecar takes its settings as flags only (no YAML configuration)"
            ));
        }
        for (flag, v) in [
            ("--zap-devel", &self.zap_devel),
            ("--zap-encoder", &self.zap_encoder),
            ("--zap-log-level", &self.zap_log_level),
            ("--zap-stacktrace-level", &self.zap_stacktrace_level),
            ("--zap-time-encoding", &self.zap_time_encoding),
            ("-v", &self.klog_v),
            ("--vmodule", &self.vmodule),
        ] {
            if let Some(v) = v {
                r.warnings.push(format!(
                    "{flag}={v} ignored: llmd logs through RUST_LOG (e.g. RUST_LOG=debug)"
                ));
            }
        }
        Ok(r)
    }
}

/// The TLS of a peer from "TLS on" and "skip verification"; skipping without TLS is warned.
fn peer_tls(on: bool, skip: bool, what: &str, warnings: &mut Vec<String>) -> PeerTls {
    match (on, skip) {
        (false, false) => PeerTls::Off,
        (false, true) => {
            warnings.push(format!(
                "skipping TLS verification for the {what} has no effect: no TLS is used to reach them"
            ));
            PeerTls::Off
        }
        (true, false) => PeerTls::Verified,
        (true, true) => PeerTls::SkipVerify,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: LlmdSidecarFlags,
    }

    fn parse(args: &[&str]) -> Result<Resolved, String> {
        let cli = Cli::try_parse_from(std::iter::once("sidecar").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.flags.resolve(|_| None)
    }

    #[test]
    fn the_charts_routing_proxy_arguments_are_taken() {
        // What llm-d-modelservice renders for its routing proxy with every optional value set
        // (less --port and --vllm-port, which `llmd sidecar` owns).
        let r = parse(&[
            "--connector=nixlv2",
            "--zap-devel=true",
            "--zap-encoder=json",
            "--zap-log-level=debug",
            "--zap-stacktrace-level=error",
            "--zap-time-encoding=rfc3339",
            "--secure-proxy=false",
            "--prefiller-use-tls=false",
            "--cert-path=/certs",
        ])
        .unwrap();
        assert!(r.llm_d_mode);
        assert_eq!(
            (r.prefiller_tls, r.decoder_tls),
            (PeerTls::Off, PeerTls::Off)
        );
        // Five logging flags and the unused certificate, each named.
        assert_eq!(r.warnings.len(), 6, "{:?}", r.warnings);
        for w in [
            "--zap-devel",
            "--zap-encoder",
            "--zap-time-encoding",
            "--cert-path",
        ] {
            assert!(
                r.warnings.iter().any(|x| x.starts_with(w)),
                "{w}: {:?}",
                r.warnings
            );
        }
    }

    #[test]
    fn tls_to_peers_is_honoured_per_stage() {
        let r = parse(&[
            "--prefiller-use-tls",
            "--tls-insecure-skip-verify=prefiller",
        ])
        .unwrap();
        assert_eq!(r.prefiller_tls, PeerTls::SkipVerify);
        assert_eq!(r.decoder_tls, PeerTls::Off);
        let r = parse(&[
            "--enable-tls=prefiller,decoder",
            "--decoder-tls-insecure-skip-verify=T",
        ])
        .unwrap();
        assert_eq!(
            (r.prefiller_tls, r.decoder_tls),
            (PeerTls::Verified, PeerTls::SkipVerify)
        );
        assert_eq!(PeerTls::Verified.scheme(), "https");
        let r = parse(&["--tls-insecure-skip-verify=decoder"]).unwrap();
        assert_eq!(r.decoder_tls, PeerTls::Off);
        assert_eq!(r.warnings.len(), 1);
    }

    #[test]
    fn flags_without_an_equivalent_are_refused_by_name() {
        for (args, named) in [
            (&["--connector=lmcache"][..], "--connector=lmcache"),
            (&["--kv-connector=sglang"], "--kv-connector=sglang"),
            (&["--connector=nixl"], "--connector=nixl"),
            (&["--connector=p2p"], "\"p2p\""),
            (&["--secure-proxy=true"], "--secure-proxy=true"),
            (&["--secure-proxy"], "--secure-proxy=true"),
            (&["--cert-path=/certs"], "--cert-path=/certs"),
            (&["--enable-ssrf-protection=true"], "--prefiller-allowlist"),
            (
                &["--enable-prefiller-sampling"],
                "--enable-prefiller-sampling",
            ),
            (&["--data-parallel-size=2"], "--data-parallel-size=2"),
            (&["--ec-connector=ec-example"], "--ec-connector"),
            (&["--enable-tls=encoder"], "encoder"),
            (&["--enable-tls=prefill"], "\"prefill\""),
            (&["--configuration={port: 1}"], "--configuration"),
            (&["--inference-pool=a/b/c"], "--inference-pool"),
            (&["--secure-proxy=maybe"], "maybe"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(named), "{args:?}: {e}");
        }
        // Without SSRF protection the pool flags are inert, as in llm-d's sidecar.
        let r = parse(&["--enable-ssrf-protection=false", "--inference-pool=ns/pool"]).unwrap();
        assert!(!r.llm_d_mode);
        assert_eq!(r.warnings.len(), 1);
    }

    #[test]
    fn the_environment_llm_d_reads_is_read() {
        let cli = Cli::try_parse_from(["sidecar"]).unwrap();
        let env = |k: &str| (k == "ENABLE_PREFILLER_SAMPLING").then(|| "true".to_string());
        assert!(cli
            .flags
            .resolve(env)
            .unwrap_err()
            .contains("ENABLE_PREFILLER_SAMPLING"));
        let env = |k: &str| (k == "INFERENCE_POOL").then(|| "a/b/c".to_string());
        assert!(cli
            .flags
            .resolve(env)
            .unwrap_err()
            .contains("--inference-pool"));
        let env = |k: &str| (k == "ENABLE_PREFILLER_SAMPLING").then(|| "0".to_string());
        assert_eq!(cli.flags.resolve(env).unwrap(), Resolved::default());
    }
}
