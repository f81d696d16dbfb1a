//! Where a variant's replicas live, behind one interface: a Kubernetes workload's `scale`
//! subresource ([`Kubernetes`]), or a pool of `llmd serve` processes on this machine
//! ([`LocalPool`]) that registers its workers with a running `llmd route` through the router's
//! workers file (`llmd route --workers-file`).
//!
//! The local pool scales up by starting a worker on a free loopback port, waiting for its
//! `/health`, and only then listing it in the workers file (the router picks the change up
//! within its poll). It scales down by draining: the worker leaves the file first, the pool
//! waits until the router no longer lists it on its `/metrics` and then until the worker's own
//! `/metrics` shows no request running or waiting (twice in a row), and only then sends it
//! SIGTERM (`llmd serve` finishes what it still has before it exits). Workers still starting
//! go first on a scale-down: nothing was sent to them.
//!
//! A prefill or decode variant's pool serves disaggregated, as llm-d's pods do: a prefill
//! worker is a KV producer on a side-channel port of its own (the pool picks a free one), listed
//! as `prefill URL`; a decode replica is a KV consumer behind its own `llmd sidecar` (started
//! once the worker is healthy, pointed at it with `--decoder-port`), the sidecar listed as
//! `decode URL`. The autoscaler scrapes the workers themselves; a decode replica drains as
//! above (the sidecar leaves the router's list, the worker's queue empties) and its sidecar
//! stops before its worker.
use futures_util::future::BoxFuture;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A variant's replicas as its target reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// Asked for (the workload's `spec.replicas`; the pool's workers not draining).
    pub desired: u32,
    /// Serving now.
    pub ready: u32,
    /// Asked for, not yet serving.
    pub starting: u32,
}

/// Where a variant's replicas live.
pub trait ScaleTarget: Send + Sync {
    /// What it is, for logs (`Deployment llm/decode`, `local pool of 2`).
    fn describe(&self) -> String;
    fn replicas(&self) -> BoxFuture<'_, Result<Replicas, String>>;
    /// Asks for `n` replicas.
    fn scale(&self, n: u32) -> BoxFuture<'_, Result<(), String>>;
    /// The base URLs of the ready replicas when the target knows them (the local pool); None:
    /// the router's list says which workers there are.
    fn endpoints(&self) -> Option<Vec<String>> {
        None
    }
}

/// A shared target (the loop and its caller both hold the pool).
impl<T: ScaleTarget> ScaleTarget for Arc<T> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn replicas(&self) -> BoxFuture<'_, Result<Replicas, String>> {
        (**self).replicas()
    }
    fn scale(&self, n: u32) -> BoxFuture<'_, Result<(), String>> {
        (**self).scale(n)
    }
    fn endpoints(&self) -> Option<Vec<String>> {
        (**self).endpoints()
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// The workload kinds with a `scale` subresource that a variant may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `apps/v1` `Deployment`.
    Deployment,
    /// `leaderworkerset.x-k8s.io/v1` `LeaderWorkerSet` (a replica is one group).
    LeaderWorkerSet,
}

/// A workload's `scale` subresource through the Kubernetes API (token and CA as the router's
/// discovery takes them, [`crate::router::k8s::Api`]).
pub struct Kubernetes {
    pub api: Arc<crate::router::k8s::Api>,
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

/// Largest `Scale` object read.
const MAX_SCALE: usize = 1 << 20;

impl Kubernetes {
    /// The `scale` subresource's URL.
    pub fn url(&self) -> String {
        let (group, plural) = match self.kind {
            WorkloadKind::Deployment => ("apis/apps/v1", "deployments"),
            WorkloadKind::LeaderWorkerSet => {
                ("apis/leaderworkerset.x-k8s.io/v1", "leaderworkersets")
            }
        };
        format!(
            "{}/{group}/namespaces/{}/{plural}/{}/scale",
            self.api.base.trim_end_matches('/'),
            self.namespace,
            self.name
        )
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<serde_json::Value, String> {
        let mut req = req.timeout(self.api.timeout);
        if let Some(t) = self.api.token().await? {
            req = req.bearer_auth(t);
        }
        let what = self.describe();
        let call = crate::router::k8s::send_bounded(req, MAX_SCALE);
        let (status, body) = match tokio::time::timeout(self.api.timeout, call).await {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => return Err(format!("{what}: Kubernetes API: {e}")),
            Err(_) => {
                return Err(format!(
                    "{what}: Kubernetes API: no answer within {:?}",
                    self.api.timeout
                ))
            }
        };
        let body = body.ok_or_else(|| format!("{what}: a Scale over {MAX_SCALE} bytes"))?;
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(format!(
                "{what}: Kubernetes API: {status}: {}",
                text.chars().take(300).collect::<String>()
            ));
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{what}: the Scale: {e}"))?;
        if v["kind"] != "Scale" {
            return Err(format!(
                "{what}: the answer's kind is {}, not Scale",
                v["kind"]
            ));
        }
        Ok(v)
    }
}

/// A `Scale`'s replicas: `spec.replicas` asked for, `status.replicas` there (the `scale`
/// subresource does not say how many are ready: those there count as ready).
fn scale_replicas(v: &serde_json::Value) -> Replicas {
    let n = |x: &serde_json::Value| x.as_u64().map_or(0, |n| n.min(u32::MAX as u64) as u32);
    let desired = n(&v["spec"]["replicas"]);
    let there = n(&v["status"]["replicas"]);
    Replicas {
        desired,
        ready: there.min(desired),
        starting: desired.saturating_sub(there),
    }
}

impl ScaleTarget for Kubernetes {
    fn describe(&self) -> String {
        let kind = match self.kind {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::LeaderWorkerSet => "LeaderWorkerSet",
        };
        format!("{kind} {}/{}", self.namespace, self.name)
    }

    fn replicas(&self) -> BoxFuture<'_, Result<Replicas, String>> {
        Box::pin(async move {
            let v = self.call(self.api.client.get(self.url())).await?;
            Ok(scale_replicas(&v))
        })
    }

    fn scale(&self, n: u32) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            // A merge patch of spec.replicas alone: nothing else of the object is touched and no
            // resourceVersion is needed.
            let req = self
                .api
                .client
                .patch(self.url())
                .header("content-type", "application/merge-patch+json")
                .body(serde_json::json!({"spec": {"replicas": n}}).to_string());
            let v = self.call(req).await?;
            let got = scale_replicas(&v).desired;
            if got != n {
                return Err(format!(
                    "{}: asked for {n} replicas, the Scale says {got}",
                    self.describe()
                ));
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The router's workers file

/// The workers file the router reads (`llmd route --workers-file`), shared by every local pool
/// of one autoscaler: each pool sets its own lines, the file holds them all. Written to a
/// temporary file and renamed over, so the router never reads half of one.
pub struct WorkersFile {
    pub path: PathBuf,
    lines: Mutex<BTreeMap<String, Vec<String>>>,
}

impl WorkersFile {
    /// Starts the file empty (the pools list their workers as they become ready).
    pub fn create(path: PathBuf) -> Result<Arc<Self>, String> {
        let f = Arc::new(Self {
            path,
            lines: Mutex::new(BTreeMap::new()),
        });
        f.write(&BTreeMap::new())?;
        Ok(f)
    }

    fn write(&self, lines: &BTreeMap<String, Vec<String>>) -> Result<(), String> {
        let mut text = String::from("# written by llmd autoscale run; one worker a line\n");
        for (pool, urls) in lines {
            text.push_str(&format!("# {pool}\n"));
            for u in urls {
                text.push_str(u);
                text.push('\n');
            }
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| format!("workers file {}: {e}", self.path.display()))
    }

    /// Sets `pool`'s workers (base URLs) and rewrites the file.
    pub fn set(&self, pool: &str, urls: &[String]) -> Result<(), String> {
        let mut g = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(pool.to_string(), urls.to_vec());
        self.write(&g)
    }
}

// ---------------------------------------------------------------------------------------------
// The local process pool

/// How a local pool starts and stops its workers.
#[derive(Clone, Debug)]
pub struct LocalPoolConfig {
    /// The variant's name (its lines in the workers file).
    pub name: String,
    /// The `llmd` binary.
    pub exe: PathBuf,
    /// `llmd serve --model` this.
    pub model: String,
    /// More `llmd serve` arguments (never `--host`/`--port`: the pool picks them).
    pub args: Vec<String>,
    /// The router whose `/metrics` tells when a worker has left its list.
    pub router: String,
    /// Longest wait for a worker's `/health` after it starts.
    pub start_timeout: Duration,
    /// Longest wait for a leaving worker to finish its requests before it is stopped anyway.
    pub drain_timeout: Duration,
    /// Echo every line of the workers' logs (tagged) to the autoscaler's stderr; otherwise only
    /// their warnings and errors.
    pub verbose: bool,
    /// What the workers do: both (aggregated), prefill (KV producers) or decode (KV consumers,
    /// each behind a sidecar).
    pub role: Role,
    /// More `llmd sidecar` arguments for a decode pool (never `--host`/`--port`/
    /// `--decoder-port`).
    pub sidecar_args: Vec<String>,
}

pub use super::config::Role;

/// The KV connector config a disaggregated pool's workers get unless their args set one.
fn kv_transfer_config(role: Role) -> Option<&'static str> {
    match role {
        Role::Both => None,
        Role::Prefill => Some(r#"{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}"#),
        Role::Decode => Some(r#"{"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}"#),
    }
}

/// A flag's name, whether given as `--flag value` or `--flag=value`.
fn flag_name(arg: &str) -> Option<&str> {
    arg.split('=').next()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Draining,
}

type Proc = Arc<Mutex<Option<Child>>>;

struct Member {
    id: u64,
    phase: Phase,
    /// What the router lists: the worker's base URL, or its sidecar's for a decode replica.
    url: Option<String>,
    /// The worker's own base URL (its `/metrics`).
    worker_url: Option<String>,
    pid: u32,
    child: Proc,
    /// A decode replica's sidecar, once started.
    sidecar: Option<(u32, Proc)>,
}

impl Member {
    /// The processes, sidecar first (the order they stop in).
    fn procs(&self) -> Vec<Proc> {
        self.sidecar
            .iter()
            .map(|s| s.1.clone())
            .chain([self.child.clone()])
            .collect()
    }
}

struct PoolState {
    next_id: u64,
    members: Vec<Member>,
}

/// `llmd serve` processes on this machine, registered with the router through a workers file.
pub struct LocalPool {
    cfg: LocalPoolConfig,
    file: Arc<WorkersFile>,
    state: Arc<Mutex<PoolState>>,
    client: reqwest::Client,
    /// Workers drained that still had requests when the router stopped sending them any.
    busy_drains: Arc<std::sync::atomic::AtomicU64>,
}

/// How often a leaving worker's queue is looked at.
const DRAIN_POLL: Duration = Duration::from_millis(200);

impl LocalPool {
    pub fn new(cfg: LocalPoolConfig, file: Arc<WorkersFile>) -> Result<Self, String> {
        let mut own = vec!["--host", "--port", "--model"];
        if cfg.role == Role::Prefill {
            own.push("--kv-transfer-port");
        }
        if let Some(bad) = cfg
            .args
            .iter()
            .find(|a| flag_name(a).is_some_and(|f| own.contains(&f)))
        {
            return Err(format!(
                "variant {}: the local pool sets {bad} itself; leave it out of args",
                cfg.name
            ));
        }
        if cfg.role != Role::Decode && !cfg.sidecar_args.is_empty() {
            return Err(format!(
                "variant {}: sidecar_args are for a decode pool (its workers' sidecars)",
                cfg.name
            ));
        }
        if let Some(bad) = cfg.sidecar_args.iter().find(|a| {
            matches!(
                flag_name(a),
                Some("--host" | "--port" | "--decoder-port" | "--vllm-port" | "--decoder-host")
            )
        }) {
            return Err(format!(
                "variant {}: the local pool sets the sidecar's {bad} itself; leave it out of sidecar_args",
                cfg.name
            ));
        }
        Ok(Self {
            cfg,
            file,
            state: Arc::new(Mutex::new(PoolState {
                next_id: 0,
                members: Vec::new(),
            })),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .map_err(|e| e.to_string())?,
            busy_drains: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rewrites the pool's lines of the workers file: its ready workers, with their role.
    fn publish(cfg: &LocalPoolConfig, file: &WorkersFile, st: &PoolState) {
        let prefix = match cfg.role {
            Role::Both => "",
            Role::Prefill => "prefill ",
            Role::Decode => "decode ",
        };
        let urls: Vec<String> = st
            .members
            .iter()
            .filter(|m| m.phase == Phase::Ready)
            .filter_map(|m| m.url.as_ref().map(|u| format!("{prefix}{u}")))
            .collect();
        if let Err(e) = file.set(&cfg.name, &urls) {
            tracing::error!(error = %e, "could not write the workers file");
        }
    }

    /// Starts one replica; a task waits for its health (and then starts a decode replica's
    /// sidecar and waits for its) and lists it.
    fn start_one(&self) -> Result<(), String> {
        let cfg = &self.cfg;
        let mut args: Vec<String> = [
            "serve",
            "--model",
            &cfg.model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        .map(str::to_string)
        .to_vec();
        args.extend(cfg.args.iter().cloned());
        if let Some(kv) = kv_transfer_config(cfg.role) {
            if !cfg
                .args
                .iter()
                .any(|a| flag_name(a) == Some("--kv-transfer-config"))
            {
                args.extend(["--kv-transfer-config".to_string(), kv.to_string()]);
            }
        }
        if cfg.role == Role::Prefill {
            // The side channel decoders pull from: a free port now (another process could take
            // it before the worker binds it; the worker then fails to start and is replaced).
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("finding a free port: {e}"))?
                .port();
            args.extend(["--kv-transfer-port".to_string(), port.to_string()]);
        }
        let id = {
            let mut st = self.lock();
            st.next_id += 1;
            st.next_id
        };
        let tag = format!("{}#{id}", cfg.name);
        let (child, pid, listening) = spawn_logged(&cfg.exe, &args, tag.clone(), cfg.verbose)?;
        self.lock().members.push(Member {
            id,
            phase: Phase::Starting,
            url: None,
            worker_url: None,
            pid,
            child,
            sidecar: None,
        });
        let (state, file, cfg, client) = (
            self.state.clone(),
            self.file.clone(),
            self.cfg.clone(),
            self.client.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let ready = async {
                let worker = healthy(&client, listening, "worker").await?;
                if cfg.role != Role::Decode {
                    return Ok::<_, String>((worker.clone(), worker));
                }
                let port = worker.rsplit(':').next().unwrap_or_default().to_string();
                let mut args: Vec<String> = [
                    "sidecar",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--decoder-port",
                    &port,
                ]
                .map(str::to_string)
                .to_vec();
                args.extend(cfg.sidecar_args.iter().cloned());
                let (sidecar, spid, listening) =
                    spawn_logged(&cfg.exe, &args, format!("{tag}/sidecar"), cfg.verbose)?;
                let gone = {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    match st.members.iter_mut().find(|m| m.id == id) {
                        Some(m) => {
                            m.sidecar = Some((spid, sidecar.clone()));
                            false
                        }
                        None => true,
                    }
                };
                if gone {
                    stop(&sidecar, Duration::from_secs(1)).await;
                    return Err("stopped while starting".to_string());
                }
                Ok((healthy(&client, listening, "sidecar").await?, worker))
            };
            let got = match tokio::time::timeout(cfg.start_timeout, ready).await {
                Ok(r) => r,
                Err(_) => Err(format!("not healthy within {:?}", cfg.start_timeout)),
            };
            let failed = {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                let Some(m) = st.members.iter_mut().find(|m| m.id == id) else {
                    return; // stopped while starting
                };
                match got {
                    Ok((url, worker)) if m.phase == Phase::Starting => {
                        tracing::info!(variant = %cfg.name, worker = %url, secs = started.elapsed().as_secs_f64(), "worker ready; listed for the router");
                        m.url = Some(url);
                        m.worker_url = Some(worker);
                        m.phase = Phase::Ready;
                        Self::publish(&cfg, &file, &st);
                        Vec::new()
                    }
                    Ok(_) => Vec::new(),
                    Err(e) => {
                        tracing::error!(variant = %cfg.name, error = %e, "worker did not start");
                        let procs = m.procs();
                        st.members.retain(|m| m.id != id);
                        procs
                    }
                }
            };
            for p in failed {
                stop(&p, Duration::from_secs(1)).await;
            }
        });
        Ok(())
    }

    /// Takes one worker away: one still starting is stopped at once; a ready one is drained.
    fn stop_one(&self) {
        let mut st = self.lock();
        let starting = st.members.iter().rposition(|m| m.phase == Phase::Starting);
        if let Some(i) = starting {
            let m = st.members.remove(i);
            drop(st);
            tokio::spawn(async move {
                for p in m.procs() {
                    stop(&p, Duration::from_secs(1)).await;
                }
            });
            return;
        }
        let Some(m) = st
            .members
            .iter_mut()
            .rev()
            .find(|m| m.phase == Phase::Ready)
        else {
            return;
        };
        m.phase = Phase::Draining;
        let (id, url, worker, procs) = (
            m.id,
            m.url.clone().unwrap_or_default(),
            m.worker_url.clone().unwrap_or_default(),
            m.procs(),
        );
        Self::publish(&self.cfg, &self.file, &st);
        drop(st);
        let (state, cfg, client) = (self.state.clone(), self.cfg.clone(), self.client.clone());
        let busy_drains = self.busy_drains.clone();
        tracing::info!(variant = %cfg.name, worker = %url, "draining worker: unlisted for the router");
        tokio::spawn(async move {
            let t = Instant::now();
            let drained = tokio::time::timeout(
                cfg.drain_timeout,
                drain(&client, &cfg.router, &url, &worker),
            )
            .await;
            match drained {
                Ok(busy) => {
                    if busy {
                        busy_drains.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::info!(variant = %cfg.name, worker = %url, had_requests = busy, secs = t.elapsed().as_secs_f64(), "worker drained; stopping it")
                }
                Err(_) => {
                    tracing::warn!(variant = %cfg.name, worker = %url, "worker not drained within the drain timeout; stopping it anyway")
                }
            }
            for p in procs {
                stop(&p, cfg.drain_timeout).await;
            }
            state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .members
                .retain(|m| m.id != id);
        });
    }

    /// The process ids of the workers and their sidecars (starting, ready and draining).
    pub fn pids(&self) -> Vec<u32> {
        self.lock()
            .members
            .iter()
            .flat_map(|m| [m.pid].into_iter().chain(m.sidecar.as_ref().map(|s| s.0)))
            .collect()
    }

    /// Workers drained so far that still had requests running or waiting when the router
    /// had stopped sending them more.
    pub fn busy_drains(&self) -> u64 {
        self.busy_drains.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Workers being drained now.
    pub fn draining(&self) -> usize {
        self.lock()
            .members
            .iter()
            .filter(|m| m.phase == Phase::Draining)
            .count()
    }
}

/// Starts `exe args`, its log echoed to stderr (tagged; all of it when `verbose`, otherwise
/// its warnings and errors) and read for the address it listens on (sent once).
fn spawn_logged(
    exe: &std::path::Path,
    args: &[String],
    tag: String,
    verbose: bool,
) -> Result<(Proc, u32, tokio::sync::oneshot::Receiver<String>), String> {
    let mut child = Command::new(exe)
        .args(args)
        // Info: the line that says where it listens is read.
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {} {}: {e}", exe.display(), args[0]))?;
    let pid = child.id();
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if verbose || line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("[{tag}] {line}");
                }
                if let Some(addr) = crate::server::logged_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
    }
    Ok((Arc::new(Mutex::new(Some(child))), pid, rx))
}

/// The base URL of a process once it listens and its `/health` answers 2xx.
async fn healthy(
    client: &reqwest::Client,
    listening: tokio::sync::oneshot::Receiver<String>,
    what: &str,
) -> Result<String, String> {
    let addr = listening
        .await
        .map_err(|_| format!("the {what} exited before listening"))?;
    let url = format!("http://{addr}");
    loop {
        if let Ok(r) = client.get(format!("{url}/health")).send().await {
            if r.status().is_success() {
                return Ok(url);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the router no longer lists `url` and then until the worker at `worker` (the
/// same URL, or the one behind a decode replica's sidecar) has had no request running or
/// waiting at two looks in a row; true when it still had some at the first look.
async fn drain(client: &reqwest::Client, router: &str, url: &str, worker: &str) -> bool {
    let listed = format!("worker=\"{url}\"");
    loop {
        match client.get(format!("{router}/metrics")).send().await {
            Ok(r) => match r.text().await {
                Ok(t) if !t.contains(&listed) => break,
                _ => {}
            },
            // No router to send it anything: nothing more will come.
            Err(_) => break,
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let (mut idle, mut first_busy) = (0, None);
    while idle < 2 {
        let busy = match client.get(format!("{worker}/metrics")).send().await {
            Ok(r) => match r.text().await {
                Ok(t) => {
                    crate::prometheus::sum(&t, "vllm:num_requests_running").unwrap_or(0.0)
                        + crate::prometheus::sum(&t, "vllm:num_requests_waiting").unwrap_or(0.0)
                }
                Err(_) => break,
            },
            Err(_) => break, // gone already
        };
        first_busy.get_or_insert(busy > 0.0);
        idle = if busy > 0.0 { 0 } else { idle + 1 };
        tokio::time::sleep(DRAIN_POLL).await;
    }
    first_busy.unwrap_or(false)
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
async fn stop(child: &Arc<Mutex<Option<Child>>>, grace: Duration) {
    let Some(mut c) = child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let pid = c.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid (not yet reaped, so not reused).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        match c.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = c.kill();
                let _ = tokio::task::spawn_blocking(move || c.wait()).await;
                return;
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

impl ScaleTarget for LocalPool {
    fn describe(&self) -> String {
        format!("local pool {} ({})", self.cfg.name, self.cfg.model)
    }

    fn replicas(&self) -> BoxFuture<'_, Result<Replicas, String>> {
        let st = self.lock();
        let count = |p: Phase| st.members.iter().filter(|m| m.phase == p).count() as u32;
        let (ready, starting) = (count(Phase::Ready), count(Phase::Starting));
        drop(st);
        Box::pin(async move {
            Ok(Replicas {
                desired: ready + starting,
                ready,
                starting,
            })
        })
    }

    fn scale(&self, n: u32) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let alive = {
                let st = self.lock();
                st.members
                    .iter()
                    .filter(|m| m.phase != Phase::Draining)
                    .count() as u32
            };
            for _ in alive..n {
                self.start_one()?;
            }
            for _ in n..alive {
                self.stop_one();
            }
            Ok(())
        })
    }

    fn endpoints(&self) -> Option<Vec<String>> {
        Some(
            self.lock()
                .members
                .iter()
                .filter(|m| m.phase == Phase::Ready)
                .filter_map(|m| m.worker_url.clone())
                .collect(),
        )
    }
}

impl Drop for LocalPool {
    /// Its workers go with it (SIGTERM, then SIGKILL after a second).
    fn drop(&mut self) {
        let children: Vec<_> = self
            .lock()
            .members
            .drain(..)
            .flat_map(|m| m.procs())
            .collect();
        for c in &children {
            if let Some(c) = c.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                // SAFETY: kill(2) on our own, not yet reaped child.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for c in children {
            if let Some(mut c) = c.lock().unwrap_or_else(|e| e.into_inner()).take() {
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_object_gives_its_replicas() {
        let v = serde_json::json!({"kind": "Scale", "spec": {"replicas": 3}, "status": {"replicas": 1}});
        assert_eq!(
            scale_replicas(&v),
            Replicas {
                desired: 3,
                ready: 1,
                starting: 2
            }
        );
        let down = serde_json::json!({"kind": "Scale", "spec": {"replicas": 1}, "status": {"replicas": 3}});
        assert_eq!(scale_replicas(&down).ready, 1);
    }

    #[test]
    fn the_workers_file_holds_every_pool_and_the_pool_refuses_its_own_flags() {
        let dir = std::env::temp_dir().join(format!("llmd-wf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = WorkersFile::create(dir.join("workers")).unwrap();
        f.set("a", &["http://127.0.0.1:1".into()]).unwrap();
        f.set(
            "b",
            &["http://127.0.0.1:2".into(), "http://127.0.0.1:3".into()],
        )
        .unwrap();
        f.set("a", &[]).unwrap();
        let text = std::fs::read_to_string(dir.join("workers")).unwrap();
        let got = crate::router::workers::parse_workers_file(&text).unwrap();
        let urls: Vec<&str> = got.iter().map(|w| w.url.as_str()).collect();
        assert_eq!(urls, ["http://127.0.0.1:2", "http://127.0.0.1:3"]);
        let cfg = LocalPoolConfig {
            name: "cpu".into(),
            exe: "llmd".into(),
            model: "m".into(),
            args: vec!["--port=9000".into()],
            router: "http://127.0.0.1:1".into(),
            start_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
            verbose: false,
            role: Role::Both,
            sidecar_args: Vec::new(),
        };
        let e = LocalPool::new(cfg.clone(), f.clone()).err().unwrap();
        assert!(e.contains("--port") && e.contains("cpu"), "{e}");
        // A prefill pool picks each worker's side-channel port; sidecar args are a decode
        // pool's, and never the address the pool sets.
        let refused = |role, args: &[&str], sidecar: &[&str]| {
            let c = LocalPoolConfig {
                role,
                args: args.iter().map(|a| a.to_string()).collect(),
                sidecar_args: sidecar.iter().map(|a| a.to_string()).collect(),
                ..cfg.clone()
            };
            LocalPool::new(c, f.clone()).err()
        };
        let e = refused(Role::Prefill, &["--kv-transfer-port=5600"], &[]).unwrap();
        assert!(e.contains("--kv-transfer-port"), "{e}");
        assert!(refused(Role::Decode, &["--kv-transfer-port=5600"], &[]).is_none());
        let e = refused(Role::Both, &[], &["--prefiller-allowlist"]).unwrap();
        assert!(e.contains("sidecar_args") && e.contains("decode"), "{e}");
        let e = refused(Role::Decode, &[], &["--decoder-port", "1"]).unwrap();
        assert!(e.contains("--decoder-port"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
