//! The `llmd` command line: `generate` for one prompt, `serve` for the OpenAI-compatible HTTP
//! worker.
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use llmd::engine::Prompt;
use llmd::tokenizer::ChatMessage;
use llmd::{Engine, EngineConfig, SamplingParams};
use std::io::Write;
use std::path::{Path, PathBuf};

/// See Cargo.toml's `mimalloc` entry.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "llmd", version, about = "Native LLM inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt and print it as it streams.
    Generate(GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API (completions, chat, models, health, metrics).
    Serve(ServeArgs),
    /// llm-d's routing sidecar for disaggregated prefill/decode, in front of a decode worker.
    Sidecar(SidecarArgs),
    /// The KV-cache-aware, load-aware router in front of several workers (llm-d's endpoint
    /// picker): prefix index from the workers' KV events, weighted scorers, P/D selection.
    Route(RouteArgs),
    /// Variant autoscaling: replica counts per variant from telemetry and SLOs.
    Autoscale(AutoscaleArgs),
}

#[derive(Args)]
struct AutoscaleArgs {
    #[command(subcommand)]
    command: AutoscaleCommand,
}

#[derive(Subcommand)]
enum AutoscaleCommand {
    /// Replays a trace against every policy in a model of the fleet and reports SLO
    /// attainment, replica-hours and cost per policy.
    Simulate(llmd::autoscale::simulate::SimulateArgs),
    /// The live loop: scrapes the router and workers, decides every interval, publishes
    /// llmd:desired_replicas and scales the variants' targets (Kubernetes or a local pool).
    Run(llmd::autoscale::live::RunArgs),
}

#[derive(Args)]
struct RouteArgs {
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// An aggregated worker: `URL[,events=tcp://HOST:PORT][,replay=tcp://HOST:PORT]` (its KV
    /// events PUB and replay sockets). Repeat for each.
    #[arg(long = "worker")]
    workers: Vec<String>,
    /// A prefill worker (same form as --worker).
    #[arg(long = "prefill-worker")]
    prefill_workers: Vec<String>,
    /// A decode worker: its sidecar's URL (same form as --worker).
    #[arg(long = "decode-worker")]
    decode_workers: Vec<String>,
    /// Read the workers from this file, one `[ROLE ]URL[,events=…]` a line, and again whenever
    /// it changes (what `llmd autoscale run`'s local process pool writes).
    #[arg(long)]
    workers_file: Option<PathBuf>,
    /// Discover workers as Kubernetes pods labelled llm-d.ai/role in this namespace (in
    /// cluster: the API server and token from the pod's service account) instead of lists.
    #[arg(long)]
    k8s_namespace: Option<String>,
    /// Discover workers from this Gateway API InferencePool (inference.networking.k8s.io/v1),
    /// watched: every ready pod its selector picks × every target port is a worker, its role
    /// from the pod's llm-d.ai/role label (none: prefill-decode).
    #[arg(long)]
    pool_name: Option<String>,
    /// The InferencePool's namespace (default: the pod's own, from its service account).
    #[arg(long)]
    pool_namespace: Option<String>,
    /// Extra label selector for --k8s-namespace (e.g. llm-d.ai/model=smollm2).
    #[arg(long)]
    k8s_selector: Option<String>,
    /// The Kubernetes API server (default: from KUBERNETES_SERVICE_HOST/_PORT).
    #[arg(long)]
    k8s_api: Option<String>,
    /// Ports on discovered pods: HTTP (a decode pod's sidecar), KV events, replay (with
    /// --pool-name the HTTP ports are the pool's target ports and the i-th one's KV events and
    /// replay ports are these plus i, as vLLM offsets a data-parallel rank's).
    #[arg(long, default_value_t = 8000)]
    k8s_http_port: u16,
    #[arg(long)]
    k8s_events_port: Option<u16>,
    #[arg(long)]
    k8s_replay_port: Option<u16>,
    /// The model directory (or hub id) whose tokenizer and chat template the workers use
    /// (default: the first complete model in ../shared/models).
    #[arg(long)]
    model: Option<String>,
    /// The workers' KV block size.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Seed of the router's block keys (vLLM's PYTHONHASHSEED; default: $PYTHONHASHSEED, else
    /// "0").
    #[arg(long)]
    hash_seed: Option<String>,
    /// How the router keys blocks: fnv64a (llm-d's indexer) or sha256 (vLLM's
    /// sha256_cbor_64bit).
    #[arg(long, default_value = "fnv64a")]
    key_scheme: String,
    /// Scorers, weights and the P/D threshold: llm-d's EndpointPickerConfig, YAML or JSON
    /// (default: prefix-cache-scorer 3, queue-scorer 1, kv-cache-utilization-scorer 1,
    /// nonCachedTokens 16).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Rotate among workers instead of scoring (a baseline).
    #[arg(long)]
    round_robin: bool,
    /// Seconds between scrapes of the workers' /metrics.
    #[arg(long, default_value_t = 0.25)]
    scrape_interval: f64,
    /// Seconds to wait for a worker's response headers before trying another.
    #[arg(long, default_value_t = 60.0)]
    worker_timeout: f64,
    /// Seconds a failed worker is left out.
    #[arg(long, default_value_t = 5.0)]
    backoff: f64,
    /// Require `Authorization: Bearer <key>` on /v1/* routes (/health and /metrics stay open).
    #[arg(long)]
    api_key: Option<String>,
    /// The cluster secret (a file holding at least 16 bytes): requests the router forwards
    /// carry the trusted-hop header that proves it to the workers.
    #[arg(long)]
    kv_transfer_secret_file: Option<PathBuf>,
    /// Longest prompt routed, in tokens; a longer one is a 400 from the router.
    #[arg(long, default_value_t = llmd::router::route::DEFAULT_MAX_MODEL_LEN)]
    max_model_len: usize,
    /// KV blocks the prefix index keeps per worker; past it the least recently used go.
    #[arg(long, default_value_t = llmd::router::index::DEFAULT_MAX_INDEX_BLOCKS_PER_WORKER)]
    max_index_blocks_per_worker: usize,
    /// The model names requests may give in `model` (one or more, as `vllm serve` takes them;
    /// default: the --model directory's name, and --model as given); another is a 404.
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    /// Largest request body the router reads, in bytes (larger: 413).
    #[arg(long, default_value_t = llmd::router::route::DEFAULT_MAX_BODY)]
    max_body_bytes: usize,
    /// Memory for the router's cache of tokenized prompt pieces, in MiB (0: none): a long
    /// prompt is tokenized in pieces, in parallel, and a piece seen before (a system prompt, a
    /// conversation's history) is not tokenized again. Tokenizers that cannot be cut exactly
    /// always tokenize whole.
    #[arg(long, default_value_t = 64)]
    tokenizer_cache_mib: usize,
    /// Also serve Envoy's ext_proc gRPC on this port: the router as a Gateway API Endpoint
    /// Picker (with gRPC health for liveness, readiness and the ext_proc service).
    #[arg(long)]
    epp_port: Option<u16>,
    /// The service account token for --k8s-namespace/--pool-name, read again for every call (default: the
    /// pod's, /var/run/secrets/kubernetes.io/serviceaccount/token, when it exists).
    #[arg(long)]
    k8s_token_file: Option<PathBuf>,
    /// Seconds between two lists of the pods.
    #[arg(long, default_value_t = 5.0)]
    k8s_refresh_interval: f64,
    /// Seconds one Kubernetes API call may take (connecting: at most 5).
    #[arg(long, default_value_t = 15.0)]
    k8s_timeout: f64,
    /// Bind one KV events SUB socket here (`tcp://*:5557`) that the workers' PUB sockets
    /// connect to (llm-d's centralized topology: vLLM or llmd with `--kv-events-config`
    /// `endpoint` `tcp://ROUTER:5557`); each worker is told by its topic
    /// `kv@<host:port>@<model>`. The per-worker `events=` subscriptions may run beside it.
    #[arg(long)]
    kv_events_bind: Option<String>,
    #[command(flatten)]
    flow: llmd::router::flow::FlowArgs,
    /// Check every flag, the environment read and the files named (the scheduling config,
    /// the secret, the tokenizer), print the configuration, start nothing (no socket, no
    /// Kubernetes call, nothing downloaded).
    #[arg(long)]
    check_config: bool,
}

#[derive(Args)]
struct SidecarArgs {
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Port of the decode worker on this host (llm-d's sidecar calls it --vllm-port).
    #[arg(long, alias = "vllm-port", default_value_t = 8001)]
    decoder_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    decoder_host: String,
    /// Seconds the prefill request may take before the decoder prefills itself.
    #[arg(long, default_value_t = 60.0)]
    prefill_timeout: f64,
    /// The prefillers `x-prefiller-host-port` may name: comma-separated `host:port` patterns,
    /// `*` matching anything in the host or port (e.g. `10.0.*:8000,prefill-*.svc:*`). Without
    /// it no prefiller is allowed and a request naming one gets 403.
    #[arg(long)]
    prefiller_allowlist: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1/* routes (/health and /metrics stay open).
    #[arg(long)]
    api_key: Option<String>,
    /// The cluster secret (a file holding at least 16 bytes): requests the sidecar forwards
    /// carry the trusted-hop header that proves it to the workers.
    #[arg(long)]
    kv_transfer_secret_file: Option<PathBuf>,
    /// Check every flag (and the environment read), print the configuration, start nothing.
    #[arg(long)]
    check_config: bool,
    /// The flags of llm-d's own routing sidecar (llm-d's chart runs its routing proxy with
    /// them): each honoured, ignored with a warning (logging) or refused by name.
    #[command(flatten, next_help_heading = "llm-d routing sidecar flags")]
    llm_d: llmd::router::sidecar_flags::LlmdSidecarFlags,
}

#[derive(Args)]
struct EngineArgs {
    /// Hugging Face model directory or hub id `owner/name` (fetched into the Hugging Face
    /// cache when online; default: the first complete model in ../shared/models).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// How the worker orders its waiting requests: `fcfs` (arrival order; a request with a
    /// non-zero `priority` is refused) or `priority` (lower `priority` value first, then
    /// arrival), as vLLM's flag.
    #[arg(long, default_value = "fcfs", value_parser = ["fcfs", "priority"])]
    scheduling_policy: String,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV-cache blocks (default: sized from memory, below).
    #[arg(long)]
    num_gpu_blocks_override: Option<usize>,
    /// GiB for the KV cache (default: on a GPU, what --gpu-memory-utilization leaves after the
    /// weights and step buffers; on the CPU, 2).
    #[arg(long)]
    kv_cache_memory_gb: Option<f64>,
    /// Fraction of the GPU's memory this worker may use in all (weights, step buffers, KV
    /// cache), as vLLM's flag.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Block hash for prefix caching: xxh3_64 or sha256_cbor (vLLM/llm-d compatible).
    #[arg(long, default_value = "xxh3_64")]
    prefix_caching_hash_algo: String,
    /// Root seed of the block-hash chain (default: $PYTHONHASHSEED, else "0").
    #[arg(long)]
    prefix_caching_hash_seed: Option<String>,
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda, cuda:N, or auto (the first GPU when there is one, else cpu).
    #[arg(long, default_value = "auto")]
    device: llmd::config::DeviceKind,
    /// On a GPU, run every step eagerly (no CUDA graphs for decode steps).
    #[arg(long)]
    enforce_eager: bool,
    /// On the CPU, round an f32 checkpoint's matrix weights to bf16 at load: half the weight
    /// memory and decode bandwidth, at bf16's rounding (bf16 and f16 checkpoints keep their own
    /// precision whatever this says).
    #[arg(long)]
    cpu_bf16_weights: bool,
    /// Quantize the weights at load: `int8` (Q8_0: int8 in blocks of 32 with an f16 scale each,
    /// ~1.06 byte per weight; CPU backend only).
    #[arg(long)]
    quantization: Option<llmd::config::Quantization>,
    /// Most requests waiting for a batch slot before new ones are refused with 429. Bounds
    /// the memory queued requests hold (each keeps its prompt's tokens).
    #[arg(long, default_value_t = llmd::config::DEFAULT_MAX_WAITING_REQUESTS)]
    max_waiting_requests: usize,
    /// Faults to inject into model steps, e.g. `error@3,panic@10` (for failure tests).
    #[arg(long, hide = true)]
    fault_injection: Option<llmd::engine::FaultInjector>,
    /// GiB of host memory for KV blocks offloaded below the device pool (vLLM's flag; 0: off).
    #[arg(long, default_value_t = 0.0)]
    kv_offloading_size: f64,
    /// Offloading implementation (vLLM's flag): only `native`, llmd's own tiers.
    #[arg(long, default_value = "native", value_parser = ["native"])]
    kv_offloading_backend: String,
    /// Directory of the disk KV tier (blocks the host tier evicts; survives restarts).
    #[arg(long)]
    kv_disk_path: Option<PathBuf>,
    /// GiB the disk KV tier may use.
    #[arg(long, default_value_t = 10.0)]
    kv_disk_gb: f64,
    /// Remote KV tier shared by workers: `redis://host:port[/db]`, or `rediss://` for TLS
    /// (Redis or Valkey). A password belongs in --kv-remote-password-file, not here.
    #[arg(long)]
    kv_remote_url: Option<String>,
    /// File holding the remote tier's password (one line; the server's `requirepass` or the
    /// URL user's ACL password). Default: $LLMD_KV_REMOTE_PASSWORD when set.
    #[arg(long)]
    kv_remote_password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the remote server's TLS certificate (a `rediss://`
    /// URL; default: the Mozilla roots built in).
    #[arg(long)]
    kv_remote_tls_ca_file: Option<PathBuf>,
    /// The cluster secret shared by a deployment's workers, sidecars and routers (a file of at
    /// least 16 bytes): the KV side channel's mutual proof (needed for east/west pulls), the
    /// trusted-hop header that makes `kv_transfer_params` believed, and the remote tier's
    /// record HMACs (records that do not verify are refused).
    #[arg(long)]
    kv_transfer_secret_file: Option<PathBuf>,
    /// KV blocks that may wait for the tier thread at most; past it newly committed blocks
    /// are not stored (llmd:kv_tier_dropped_blocks_total).
    #[arg(long, default_value_t = llmd::kv::tiers::DEFAULT_QUEUE_BLOCKS)]
    kv_tier_queue_blocks: usize,
    /// Load from the KV tiers whatever the measured costs say (tests, benchmarks).
    #[arg(long, hide = true)]
    kv_tier_always_load: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// The model, as `vllm serve MODEL` takes it: the same as --model (given both, they must
    /// agree).
    #[arg(value_name = "MODEL")]
    model_arg: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Export OpenTelemetry traces to this OTLP/gRPC endpoint (vLLM's flag); overrides
    /// `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`. Without either, no traces.
    #[arg(long)]
    otlp_traces_endpoint: Option<String>,
    /// Check every flag, the environment read (VLLM_NIXL_SIDE_CHANNEL_*, HF_*, PYTHONHASHSEED)
    /// and the files named, print the resolved configuration and exit: no model loaded, no
    /// socket opened, nothing downloaded (a hub id not in the cache is reported as the
    /// download `llmd serve` would start with).
    #[arg(long)]
    check_config: bool,
    /// vLLM's flag: an llmd worker runs on one GPU, so only 1.
    #[arg(long, default_value_t = 1)]
    tensor_parallel_size: usize,
    /// vLLM's flag: one engine per worker, so only 1 (run one pod per rank).
    #[arg(long, default_value_t = 1)]
    data_parallel_size: usize,
    /// vLLM's flag: only 1, as --data-parallel-size.
    #[arg(long, default_value_t = 1)]
    data_parallel_size_local: usize,
    /// vLLM's flag: only 1 (no pipeline parallelism).
    #[arg(long, default_value_t = 1)]
    pipeline_parallel_size: usize,
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/* routes.
    #[arg(long)]
    api_key: Option<String>,
    /// The model name in the API (default: the --model argument).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT before they are aborted.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Most engine requests one API request may create (prompts × n); more is a 400.
    #[arg(long, default_value_t = llmd::server::DEFAULT_MAX_CHOICES_PER_REQUEST)]
    max_choices_per_request: usize,
    /// Seconds a request may take from arrival to its last token; past it the request is
    /// aborted, its KV blocks freed and the client gets a 408 (or a final SSE error event).
    #[arg(long)]
    request_timeout: Option<f64>,
    /// KV-cache events for llm-d's KV-cache indexer, as vLLM's flag: JSON such as
    /// `{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",
    /// "replay_endpoint": "tcp://*:5558", "topic": "kv@POD_IP:PORT@MODEL"}`. An `endpoint` with
    /// `*` or `::` binds; any other host is connected to (and reconnected), as vLLM does.
    #[arg(long)]
    kv_events_config: Option<String>,
    /// Disaggregated prefill/decode, as vLLM's flag: JSON with `kv_role` (`kv_producer`,
    /// `kv_consumer`, `kv_both`) and `kv_connector` (any name; llmd has one connector).
    #[arg(long)]
    kv_transfer_config: Option<String>,
    /// Port of the KV side channel a producer serves pulls on (default:
    /// $VLLM_NIXL_SIDE_CHANNEL_PORT, else 5600).
    #[arg(long)]
    kv_transfer_port: Option<u16>,
    /// Host a producer binds its side channel to and advertises to decoders in `remote_host`
    /// (default: $VLLM_NIXL_SIDE_CHANNEL_HOST, else 127.0.0.1; in a pod, its IP).
    #[arg(long)]
    kv_transfer_host: Option<String>,
    /// Believe `kv_transfer_params` from any client, not only a trusted hop (behind llm-d's
    /// own routing sidecar, which does not send the trusted-hop header).
    #[arg(long)]
    allow_client_kv_transfer_params: bool,
    /// Report `usage.prompt_tokens_details.cached_tokens` (as vLLM's flag: off by default,
    /// since a cache hit tells one client what others sent).
    #[arg(long)]
    enable_prompt_tokens_details: bool,
    /// Seconds a producer keeps a finished prompt's KV for its decoder before freeing it.
    #[arg(long, default_value_t = 30.0)]
    kv_transfer_lease_secs: f64,
    /// A fault to inject into this producer's transfers: corrupt@B, corrupt2@B, stall@B:MS.
    #[arg(long, hide = true)]
    kv_transfer_fault: Option<llmd::kv::transfer::TransferFault>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    stop: Vec<String>,
}

/// The first complete shared model, as the default for a fresh checkout.
fn default_model() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models");
    for name in ["smollm2-135m-instruct", "stories260K"] {
        let dir = root.join(name);
        let index = dir.join("model.safetensors.index.json");
        let complete = if index.exists() {
            let text = std::fs::read_to_string(&index)?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            v["weight_map"].as_object().is_some_and(|m| {
                m.values()
                    .all(|f| f.as_str().is_some_and(|f| dir.join(f).exists()))
            })
        } else {
            dir.join("model.safetensors").exists()
        };
        if complete {
            return Ok(dir);
        }
    }
    bail!(
        "no --model given and no complete model in {}",
        root.display()
    )
}

/// The model directory of `--model` (downloaded first when a hub id is not cached).
fn model_dir(a: &EngineArgs) -> Result<PathBuf> {
    Ok(match &a.model {
        Some(m) => llmd::model::hub::resolve_model(m)?,
        None => default_model()?,
    })
}

/// For `--check-config`: the model directory `spec` leads to without downloading anything
/// (None: a hub id `llmd` downloads at start), and a line saying what was found. An argument
/// `llmd` could not start with is the error it would start with.
fn check_model(spec: Option<&str>) -> Result<(Option<PathBuf>, String)> {
    use llmd::model::hub::Located;
    let Some(spec) = spec else {
        let dir = default_model()?;
        let line = format!("{} (the default shared model)", dir.display());
        return Ok((Some(dir), line));
    };
    let (dir, line) = match llmd::model::hub::locate(spec)? {
        Located::Dir(d) => (d, format!("{spec} (a local directory)")),
        Located::Cached(d) => {
            let line = format!("{spec} (in the Hugging Face cache: {})", d.display());
            (d, line)
        }
        Located::Download { cache, missing } => {
            return Ok((
                None,
                format!(
                    "{spec} (a hub id not in the Hugging Face cache at {}: {missing}; `llmd serve` downloads it at start, and checks its architecture then)",
                    cache.display()
                ),
            ))
        }
    };
    let cfg =
        llmd::model::ModelConfig::from_dir(&dir).with_context(|| format!("the model {spec}"))?;
    let line = format!(
        "{line}, {:?}, {} layers",
        cfg.architecture, cfg.num_hidden_layers
    );
    Ok((Some(dir), line))
}

fn engine_config(a: &EngineArgs, model: PathBuf) -> Result<EngineConfig> {
    let mut c = EngineConfig::new(model);
    c.max_model_len = a.max_model_len;
    c.scheduler.max_num_seqs = a.max_num_seqs;
    c.scheduler.max_num_batched_tokens = a.max_num_batched_tokens;
    c.scheduler.policy = if a.scheduling_policy == "priority" {
        llmd::config::SchedulingPolicy::Priority
    } else {
        llmd::config::SchedulingPolicy::Fcfs
    };
    c.cache.block_size = a.block_size;
    c.cache.num_blocks = a.num_gpu_blocks_override;
    c.cache.gpu_memory_utilization = a.gpu_memory_utilization;
    c.cache.enable_prefix_caching = !a.no_enable_prefix_caching;
    c.cache.block_hash_algo = a.prefix_caching_hash_algo.parse()?;
    if let Some(seed) = &a.prefix_caching_hash_seed {
        c.cache.block_hash_seed = seed.clone();
    }
    c.num_threads = a.threads;
    c.device = a.device;
    c.enforce_eager = a.enforce_eager;
    c.cpu_bf16_weights = a.cpu_bf16_weights;
    c.quantization = a.quantization;
    c.scheduler.max_waiting_requests = Some(a.max_waiting_requests);
    c.fault_injection = a.fault_injection.clone();
    let gib = |g: f64, flag: &str| -> Result<f64> {
        if !(g.is_finite() && g >= 0.0) {
            bail!("{flag} must be a number of GiB >= 0, got {g}");
        }
        Ok(g * (1u64 << 30) as f64)
    };
    if let Some(g) = a.kv_cache_memory_gb {
        c.cache.kv_cache_memory_bytes = Some(gib(g, "--kv-cache-memory-gb")? as usize);
    }
    c.kv_tiers.host_bytes = gib(a.kv_offloading_size, "--kv-offloading-size")? as usize;
    c.kv_tiers.disk_path = a.kv_disk_path.clone();
    c.kv_tiers.disk_bytes = gib(a.kv_disk_gb, "--kv-disk-gb")? as u64;
    c.kv_tiers.remote_url = a.kv_remote_url.clone();
    if a.kv_remote_url.is_some() {
        c.kv_tiers.remote.password = llmd::kv::tiers::RemotePassword::from_file_or_env(
            a.kv_remote_password_file.as_deref(),
        )?;
        c.kv_tiers.remote.tls_ca_file = a.kv_remote_tls_ca_file.clone();
        c.kv_tiers.remote.secret = cluster_secret(a.kv_transfer_secret_file.as_deref())?;
    } else if a.kv_remote_password_file.is_some() || a.kv_remote_tls_ca_file.is_some() {
        bail!("--kv-remote-password-file and --kv-remote-tls-ca-file need --kv-remote-url");
    }
    if a.kv_tier_queue_blocks == 0 {
        bail!("--kv-tier-queue-blocks must be at least 1");
    }
    c.kv_tiers.queue_blocks = a.kv_tier_queue_blocks;
    c.kv_tiers.always_load = a.kv_tier_always_load;
    Ok(c)
}

fn load_engine(config: EngineConfig) -> Result<Engine> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading weights {bar:40} {bytes}/{total_bytes} {elapsed}")
            .context("progress template")?,
    );
    let name = config.model.display().to_string();
    let engine = Engine::with_progress(config, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("loading {name}"))?;
    bar.finish_and_clear();
    Ok(engine)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let engine = load_engine(engine_config(&a.engine, model_dir(&a.engine)?)?)?;
    let prompt = if a.chat {
        Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        }])
    } else {
        Prompt::Text(a.prompt.clone())
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
        max_tokens: Some(a.max_tokens),
        stop: a.stop.clone(),
        ..SamplingParams::default()
    };
    let start = std::time::Instant::now();
    let mut handle = engine.add_request(prompt, params)?;
    let mut out = std::io::stdout().lock();
    if !a.chat {
        write!(out, "{}", a.prompt)?;
    }
    let mut n = 0;
    let mut reason = None;
    while let Some(delta) = handle.next_blocking() {
        let d = delta?;
        n += d.new_token_ids.len();
        write!(out, "{}", d.new_text)?;
        out.flush()?;
        reason = d.finish_reason;
    }
    writeln!(out)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{n} tokens in {secs:.2}s, {:.1} tok/s, finish: {}]",
        n as f64 / secs,
        reason.map_or("none", |r| r.as_str())
    );
    Ok(())
}

/// The model of `llmd serve MODEL` and `--model`: either, or both when they agree.
fn merged_model(positional: Option<String>, flag: Option<String>) -> Result<Option<String>> {
    match (positional, flag) {
        (Some(p), Some(f)) if p != f => bail!(
            "the model is given twice and differently: {p:?} (positional) and --model {f:?}; give one"
        ),
        (p, f) => Ok(p.or(f)),
    }
}

fn serve(mut a: ServeArgs) -> Result<()> {
    a.engine.model = merged_model(a.model_arg.take(), a.engine.model.take())?;
    for (flag, n) in [
        ("--tensor-parallel-size", a.tensor_parallel_size),
        ("--data-parallel-size", a.data_parallel_size),
        ("--data-parallel-size-local", a.data_parallel_size_local),
        ("--pipeline-parallel-size", a.pipeline_parallel_size),
    ] {
        if n != 1 {
            bail!("{flag} {n}: an llmd worker is one engine on one device (only 1); run one worker per GPU and route across them");
        }
    }
    let (mut config, model_line) = if a.check_config {
        let (dir, line) = check_model(a.engine.model.as_deref())?;
        // A hub id downloaded at start: the engine settings are checked against its name.
        let path = dir.unwrap_or_else(|| PathBuf::from(a.engine.model.clone().unwrap_or_default()));
        (engine_config(&a.engine, path)?, line)
    } else {
        (
            engine_config(&a.engine, model_dir(&a.engine)?)?,
            String::new(),
        )
    };
    config.validate()?;
    // Read whether or not a transfer or a remote tier uses it: a secret named but unreadable
    // is an error, never ignored.
    cluster_secret(a.engine.kv_transfer_secret_file.as_deref())?;
    let mut events_line = "off".to_string();
    if let Some(json) = &a.kv_events_config {
        let events = llmd::server::kv_events::KvEventsConfig::parse(json)
            .map_err(|e| anyhow::anyhow!("--kv-events-config: {e}"))?;
        if events.publishes() && a.check_config {
            events_line = format!("published, topic {}", events.topic);
        } else if events.publishes() {
            // Rank 0 as vLLM sends without data parallelism.
            let publisher = llmd::server::kv_events::ZmqEventPublisher::start(&events, Some(0))
                .context("--kv-events-config: starting the KV event publisher")?;
            tracing::info!(
                endpoint = publisher.endpoint(),
                replay = publisher.replay_endpoint().unwrap_or("none"),
                topic = %events.topic,
                "publishing KV events"
            );
            config.kv_events = Some(llmd::config::KvEventsHandle(publisher));
        }
    }
    let model_path = config.model.display().to_string();
    // vLLM names the model as it was asked for: the hub id or the directory given; the default
    // shared model goes by its directory's name.
    let default_name = a.engine.model.clone().unwrap_or_else(|| {
        config
            .model
            .file_name()
            .map_or_else(|| model_path.clone(), |n| n.to_string_lossy().into_owned())
    });
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        bail!("--shutdown-timeout must be a non-negative number of seconds");
    }
    let request_timeout = match a.request_timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 => Some(std::time::Duration::from_secs_f64(t)),
        Some(_) => bail!("--request-timeout must be a positive number of seconds"),
    };
    if a.max_choices_per_request == 0 {
        bail!("--max-choices-per-request must be at least 1");
    }
    let kv_transfer = match &a.kv_transfer_config {
        None => None,
        Some(json) => {
            let port = match a.kv_transfer_port {
                Some(p) => p,
                None => match std::env::var("VLLM_NIXL_SIDE_CHANNEL_PORT") {
                    Ok(v) => v
                        .parse()
                        .with_context(|| format!("VLLM_NIXL_SIDE_CHANNEL_PORT={v:?}"))?,
                    Err(_) => 5600,
                },
            };
            let (host, from) = match (
                &a.kv_transfer_host,
                std::env::var("VLLM_NIXL_SIDE_CHANNEL_HOST"),
            ) {
                (Some(h), _) => (h.clone(), "--kv-transfer-host"),
                (None, Ok(h)) => (h, "VLLM_NIXL_SIDE_CHANNEL_HOST"),
                (None, Err(_)) => ("127.0.0.1".to_string(), "the default"),
            };
            // What the side channel binds and decoders are told: an address or a host name.
            let name_ok = !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|l| {
                    !l.is_empty()
                        && !l.starts_with('-')
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if host.parse::<std::net::IpAddr>().is_err() && !name_ok {
                bail!("{from} {host:?}: not an IP address or host name for the KV side channel");
            }
            if !(a.kv_transfer_lease_secs.is_finite() && a.kv_transfer_lease_secs > 0.0) {
                bail!("--kv-transfer-lease-secs must be a positive number of seconds");
            }
            let lease = std::time::Duration::from_secs_f64(a.kv_transfer_lease_secs);
            let mut c = llmd::server::disagg::KvTransferConfig::parse(json, port, host, lease)
                .map_err(|e| anyhow::anyhow!(e))?;
            c.fault = a.kv_transfer_fault;
            c.allow_client_params = a.allow_client_kv_transfer_params;
            c.secret = cluster_secret(a.engine.kv_transfer_secret_file.as_deref())?
                .map(std::sync::Arc::new);
            if c.secret.is_none() && !c.allow_client_params {
                tracing::warn!("--kv-transfer-config without --kv-transfer-secret-file: kv_transfer_params are believed from no client (add the secret to llmd's sidecar/router and here, or --allow-client-kv-transfer-params behind llm-d's sidecar)");
            }
            if let llmd::server::disagg::TransportKind::Rdma { device, .. } = &c.transport {
                // Before the model loads: a missing device is the first thing to hear about.
                // (--check-config probes no device: the RDMA device is opened at start.)
                if !a.check_config {
                    llmd::kv::transfer::verbs::open_device(device)?;
                }
            }
            Some(c)
        }
    };
    if a.check_config {
        println!("llmd serve: configuration OK (nothing started)");
        println!("model: {model_line}");
        println!(
            "served model name: {}",
            a.served_model_name.as_deref().unwrap_or(&default_name)
        );
        println!("listen: {}:{}", a.host, a.port);
        println!("device: {}", config.device);
        println!(
            "max model len: {}",
            config
                .max_model_len
                .map_or("the model's".to_string(), |n| n.to_string())
        );
        println!("block size: {}", config.cache.block_size);
        println!(
            "cpu weights: {}",
            if config.quantization.is_some() {
                "int8 (Q8_0: blocks of 32, f16 scales, quantized at load)"
            } else if config.cpu_bf16_weights {
                "bf16 (f32 checkpoints rounded at load)"
            } else {
                "the checkpoint's precision"
            }
        );
        println!("kv events: {events_line}");
        match &kv_transfer {
            None => println!("kv transfer: off"),
            Some(c) => println!(
                "kv transfer: {} as {:?}, side channel {}:{} ({})",
                c.connector,
                c.role,
                c.advertise_host,
                c.port,
                match c.transport {
                    llmd::server::disagg::TransportKind::Tcp => "tcp",
                    llmd::server::disagg::TransportKind::Rdma { .. } => "rdma",
                }
            ),
        }
        return Ok(());
    }
    let cfg = llmd::server::ServerConfig {
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        served_model_name: a.served_model_name.unwrap_or(default_name),
        model_path,
        shutdown_timeout: std::time::Duration::from_secs_f64(a.shutdown_timeout),
        max_choices_per_request: a.max_choices_per_request,
        request_timeout,
        kv_transfer,
        prompt_tokens_details: a.enable_prompt_tokens_details,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llmd-http")
        .build()
        .context("starting the async runtime")?;
    llmd::telemetry::run(
        &runtime,
        "llmd-serve",
        a.otlp_traces_endpoint.as_deref(),
        llmd::server::serve(cfg, move || load_engine(config)),
    )
}

/// The cluster secret of `--kv-transfer-secret-file`, when given.
fn cluster_secret(path: Option<&Path>) -> Result<Option<llmd::kv::auth::ClusterSecret>> {
    path.map(|p| {
        llmd::kv::auth::ClusterSecret::from_file(p)
            .map_err(|e| anyhow::anyhow!("--kv-transfer-secret-file: {e}"))
    })
    .transpose()
}

fn sidecar(a: SidecarArgs) -> Result<()> {
    if !(a.prefill_timeout.is_finite() && a.prefill_timeout > 0.0) {
        bail!("--prefill-timeout must be a positive number of seconds");
    }
    let llm_d = a
        .llm_d
        .resolve(|k| std::env::var(k).ok())
        .map_err(|e| anyhow::anyhow!(e))?;
    for w in &llm_d.warnings {
        tracing::warn!("{w}");
    }
    use llmd::router::sidecar::PrefillerAllowlist;
    let (prefiller_allowlist, prefillers) = match &a.prefiller_allowlist {
        Some(list) => (
            PrefillerAllowlist::parse(list)
                .map_err(|e| anyhow::anyhow!("--prefiller-allowlist: {e}"))?,
            format!("--prefiller-allowlist {list}"),
        ),
        None if llm_d.llm_d_mode => {
            tracing::warn!("started with llm-d's flags and no --prefiller-allowlist: any prefiller x-prefiller-host-port names is called, as llm-d's sidecar does without --enable-ssrf-protection; give --prefiller-allowlist to restrict them");
            (
                PrefillerAllowlist::any(),
                "any (llm-d's sidecar without --enable-ssrf-protection)".to_string(),
            )
        }
        None => (PrefillerAllowlist::default(), "none".to_string()),
    };
    let secret = cluster_secret(a.kv_transfer_secret_file.as_deref())?;
    let decoder = format!(
        "{}://{}:{}",
        llm_d.decoder_tls.scheme(),
        a.decoder_host,
        a.decoder_port
    );
    if a.check_config {
        println!("llmd sidecar: configuration OK (nothing started)");
        println!("listen: {}:{}", a.host, a.port);
        println!("decoder: {decoder} ({})", llm_d.decoder_tls);
        println!("prefillers allowed: {prefillers}");
        println!("prefillers reached over: {}", llm_d.prefiller_tls);
        println!("prefill timeout: {}s", a.prefill_timeout);
        println!(
            "api key: {}",
            if a.api_key.is_some() {
                "required"
            } else {
                "none"
            }
        );
        println!(
            "cluster secret: {}",
            if secret.is_some() { "yes" } else { "none" }
        );
        for w in &llm_d.warnings {
            println!("warning: {w}");
        }
        return Ok(());
    }
    let cfg = llmd::router::sidecar::SidecarConfig {
        host: a.host,
        port: a.port,
        decoder,
        prefill_timeout: std::time::Duration::from_secs_f64(a.prefill_timeout),
        prefiller_allowlist,
        api_key: a.api_key,
        secret,
        prefiller_tls: llm_d.prefiller_tls,
        decoder_tls: llm_d.decoder_tls,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llmd-sidecar")
        .build()
        .context("starting the async runtime")?;
    llmd::telemetry::run(
        &runtime,
        "llmd-sidecar",
        None,
        llmd::router::sidecar::serve(cfg),
    )
}

fn route(a: RouteArgs) -> Result<()> {
    use llmd::router::workers::{KubernetesSource, Role, StaticSource, WorkerSource, WorkerSpec};
    let secs = |v: f64, flag: &str| -> Result<std::time::Duration> {
        if !(v.is_finite() && v > 0.0) {
            bail!("{flag} must be a positive number of seconds");
        }
        Ok(std::time::Duration::from_secs_f64(v))
    };
    let mut specs = Vec::new();
    for (list, role) in [
        (&a.workers, Role::Both),
        (&a.prefill_workers, Role::Prefill),
        (&a.decode_workers, Role::Decode),
    ] {
        for w in list {
            specs.push(WorkerSpec::parse(w, role).map_err(|e| anyhow::anyhow!(e))?);
        }
    }
    if a.workers_file.is_some()
        && (a.pool_name.is_some() || a.k8s_namespace.is_some() || !specs.is_empty())
    {
        bail!("--workers-file lists the workers: give it or another source, not two");
    }
    if a.pool_name.is_some() && (a.k8s_namespace.is_some() || !specs.is_empty()) {
        bail!(
            "--pool-name discovers the workers: give it, --k8s-namespace or worker lists, not two"
        );
    }
    const SA: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    let k8s_api = |flag: &str| -> Result<(String, Option<PathBuf>, Option<Vec<u8>>)> {
        let api = match &a.k8s_api {
            Some(u) => u.clone(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").with_context(|| {
                    format!(
                        "{flag} outside a pod needs --k8s-api (KUBERNETES_SERVICE_HOST is unset)"
                    )
                })?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or("443".into());
                format!("https://{host}:{port}")
            }
        };
        let token_file = match &a.k8s_token_file {
            Some(p) => {
                std::fs::metadata(p)
                    .with_context(|| format!("--k8s-token-file {}", p.display()))?;
                Some(p.clone())
            }
            None => Some(PathBuf::from(format!("{SA}/token"))).filter(|p| p.exists()),
        };
        Ok((api, token_file, std::fs::read(format!("{SA}/ca.crt")).ok()))
    };
    // With --pool-name (and no --objectives file) the InferenceObjectives naming the pool are
    // watched for the priorities.
    let mut objectives_watch = None;
    let (source, refresh): (Box<dyn WorkerSource>, _) = match (&a.pool_name, &a.k8s_namespace) {
        (Some(name), _) => {
            let ns = match &a.pool_namespace {
                Some(ns) => ns.clone(),
                None => std::fs::read_to_string(format!("{SA}/namespace"))
                    .map(|s| s.trim().to_string())
                    .context("--pool-name outside a pod needs --pool-namespace")?,
            };
            let (base, token_file, ca) = k8s_api("--pool-name")?;
            let api = llmd::router::k8s::Api {
                base,
                token_file,
                timeout: secs(a.k8s_timeout, "--k8s-timeout")?,
                client: llmd::router::k8s::Api::client(ca.as_deref())
                    .map_err(|e| anyhow::anyhow!(e))?,
            };
            let ports = llmd::router::pool::PodPorts {
                events: a.k8s_events_port,
                replay: a.k8s_replay_port,
            };
            let api = std::sync::Arc::new(api);
            if a.flow.objectives.is_none() {
                objectives_watch = Some((api.clone(), ns.clone(), name.clone()));
            }
            let p = llmd::router::pool::PoolSource::new(api, ns, name.clone(), ports);
            // Watched: changes arrive as they happen, nothing is polled.
            (Box::new(p), None)
        }
        (None, Some(ns)) => {
            if !specs.is_empty() {
                bail!("--k8s-namespace discovers the workers: give it or worker lists, not both");
            }
            let (api, token_file, ca) = k8s_api("--k8s-namespace")?;
            let timeout = secs(a.k8s_timeout, "--k8s-timeout")?;
            let k = KubernetesSource {
                api,
                namespace: ns.clone(),
                selector: a.k8s_selector.clone(),
                token_file,
                timeout,
                http_port: a.k8s_http_port,
                events_port: a.k8s_events_port,
                replay_port: a.k8s_replay_port,
                client: KubernetesSource::client(ca.as_deref(), timeout)
                    .map_err(|e| anyhow::anyhow!(e))?,
            };
            (
                Box::new(k),
                Some(secs(a.k8s_refresh_interval, "--k8s-refresh-interval")?),
            )
        }
        (None, None) if a.workers_file.is_some() => {
            let path = a.workers_file.clone().unwrap_or_default();
            std::fs::metadata(&path)
                .with_context(|| format!("--workers-file {}", path.display()))?;
            let f =
                llmd::router::workers::FileSource::new(path, std::time::Duration::from_millis(200));
            // Polled for a change by the source itself.
            (Box::new(f), None)
        }
        (None, None) => {
            if specs.is_empty() {
                bail!("give at least one --worker, --prefill-worker or --decode-worker (or --k8s-namespace, --pool-name)");
            }
            if a.prefill_workers.is_empty() != a.decode_workers.is_empty() {
                bail!("disaggregated serving needs both --prefill-worker and --decode-worker");
            }
            (Box::new(StaticSource(specs)), None)
        }
    };
    let (model, model_line) = if a.check_config {
        check_model(a.model.as_deref())?
    } else {
        let dir = match &a.model {
            Some(m) => llmd::model::hub::resolve_model(m)?,
            None => default_model()?,
        };
        (Some(dir), String::new())
    };
    // Only --check-config leaves a hub id unresolved (downloaded at start): named as given.
    let model = model.unwrap_or_else(|| PathBuf::from(a.model.clone().unwrap_or_default()));
    // As `vllm serve` names a model: what --model says (a hub id, a directory); a directory
    // is also known by its last component, the name clients use (`--model ../models/x`
    // serves `x`).
    let served_model_names = if a.served_model_name.is_empty() {
        let mut names: Vec<String> = model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .into_iter()
            .collect();
        if let Some(m) = &a.model {
            if let Some(last) = Path::new(m.trim_end_matches('/')).file_name() {
                names.push(last.to_string_lossy().into_owned());
            }
            names.push(m.clone());
        }
        names.sort();
        names.dedup();
        names
    } else {
        a.served_model_name.clone()
    };
    if a.max_body_bytes == 0 {
        bail!("--max-body-bytes must be at least 1");
    }
    let tokenizer = if a.check_config && !model.is_dir() {
        None
    } else {
        let mut t = llmd::tokenizer::Tokenizer::from_dir(&model)
            .with_context(|| format!("the tokenizer of {}", model.display()))?;
        if let Err(why) = t.encode_in_pieces(true, a.tokenizer_cache_mib << 20) {
            tracing::info!(%why, "prompts are tokenized whole");
        }
        Some(std::sync::Arc::new(t))
    };
    let seed = a
        .hash_seed
        .clone()
        .or_else(|| std::env::var("PYTHONHASHSEED").ok())
        .unwrap_or_else(|| "0".into());
    if a.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    if a.max_model_len == 0 {
        bail!("--max-model-len must be at least 1");
    }
    if a.max_index_blocks_per_worker == 0 {
        bail!("--max-index-blocks-per-worker must be at least 1");
    }
    let scheme: llmd::router::index::KeyScheme = a
        .key_scheme
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let mut routing = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            llmd::router::scorers::RoutingConfig::parse(&text).map_err(|e| anyhow::anyhow!(e))?
        }
        None => Default::default(),
    };
    routing.round_robin |= a.round_robin;
    if a.check_config {
        let scrape = secs(a.scrape_interval, "--scrape-interval")?;
        secs(a.worker_timeout, "--worker-timeout")?;
        secs(a.backoff, "--backoff")?;
        cluster_secret(a.kv_transfer_secret_file.as_deref())?;
        a.flow.config(scrape).map_err(|e| anyhow::anyhow!(e))?;
        a.flow.objectives().map_err(|e| anyhow::anyhow!(e))?;
        println!("llmd route: configuration OK (nothing started)");
        println!("model: {model_line}");
        println!("served model names: {}", served_model_names.join(", "));
        println!("listen: {}:{}", a.host, a.port);
        if let Some(p) = a.epp_port {
            println!("endpoint picker (ext_proc): {}:{p}", a.host);
        }
        let workers = match (&a.pool_name, &a.k8s_namespace) {
            (Some(p), _) => format!("the InferencePool {p}"),
            (None, Some(ns)) => format!("pods labelled llm-d.ai/role in namespace {ns}"),
            (None, None) if a.workers_file.is_some() => format!(
                "the file {}",
                a.workers_file.as_deref().unwrap_or(Path::new("")).display()
            ),
            (None, None) => format!(
                "{} aggregated, {} prefill, {} decode",
                a.workers.len(),
                a.prefill_workers.len(),
                a.decode_workers.len()
            ),
        };
        println!("workers: {workers}");
        println!(
            "block keys: {} (seed {seed:?}), block size {}",
            a.key_scheme, a.block_size
        );
        return Ok(());
    }
    let tokenizer = tokenizer.context("the tokenizer of the model")?;
    let cfg = llmd::router::route::RouteConfig {
        host: a.host,
        port: a.port,
        source,
        refresh,
        tokenizer,
        keyer: llmd::router::index::Keyer::new(scheme, &seed, a.block_size),
        routing,
        scrape_interval: secs(a.scrape_interval, "--scrape-interval")?,
        timeout: secs(a.worker_timeout, "--worker-timeout")?,
        backoff: secs(a.backoff, "--backoff")?,
        api_key: a.api_key,
        secret: cluster_secret(a.kv_transfer_secret_file.as_deref())?,
        max_model_len: a.max_model_len,
        max_index_blocks_per_worker: a.max_index_blocks_per_worker,
        kv_events_bind: a.kv_events_bind,
        served_model_names,
        max_body: a.max_body_bytes,
        epp_port: a.epp_port,
        flow: a
            .flow
            .config(secs(a.scrape_interval, "--scrape-interval")?)
            .map_err(|e| anyhow::anyhow!(e))?,
        objectives: std::sync::Arc::new(llmd::router::flow::Objectives::new(
            a.flow.objectives().map_err(|e| anyhow::anyhow!(e))?,
        )),
        forward_priority: !a.flow.no_forward_priority,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llmd-route")
        .build()
        .context("starting the async runtime")?;
    if let Some((api, ns, pool)) = objectives_watch {
        let objectives = cfg.objectives.clone();
        runtime.spawn(llmd::router::pool::watch_objectives(
            api,
            ns,
            Some(pool),
            move |m| objectives.replace_all(m),
        ));
    }
    llmd::telemetry::run(
        &runtime,
        "llmd-route",
        None,
        llmd::router::route::serve(cfg, None),
    )
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Generate(a) => generate(a),
        Command::Serve(a) => serve(a),
        Command::Sidecar(a) => sidecar(a),
        Command::Route(a) => route(a),
        Command::Autoscale(a) => match a.command {
            AutoscaleCommand::Simulate(a) => {
                llmd::autoscale::simulate::main(a).map_err(anyhow::Error::msg)
            }
            AutoscaleCommand::Run(a) => llmd::autoscale::live::run(a).map_err(anyhow::Error::msg),
        },
    }
}
