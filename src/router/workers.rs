//! Where the router's workers come from: a static list from the command line, or Kubernetes
//! pods found by label (llm-d's `llm-d.ai/role=prefill|decode|prefill-decode`), behind one
//! interface.
use futures_util::future::BoxFuture;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// What a worker does in disaggregated serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Prefills and decodes (aggregated).
    Both,
    Prefill,
    /// A decode worker; its URL is its sidecar's, which takes `x-prefiller-host-port`.
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Both => "prefill-decode",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// One worker as a source lists it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkerSpec {
    /// Base URL, e.g. `http://10.0.0.5:8000` (for a decode worker, its sidecar's).
    pub url: String,
    pub role: Role,
    /// Its KV events PUB socket (`tcp://host:5557`), when it publishes them.
    pub events: Option<String>,
    /// Its KV events replay socket.
    pub replay: Option<String>,
}

impl WorkerSpec {
    /// `host:port` of the URL (what `x-prefiller-host-port` names).
    pub fn host_port(&self) -> &str {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest)
    }

    /// `URL[,events=tcp://…][,replay=tcp://…]` as `--worker` and its kin take it.
    pub fn parse(arg: &str, role: Role) -> Result<Self, String> {
        let mut parts = arg.split(',');
        let url = parts.next().unwrap_or("").trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "worker {arg:?}: the first part must be an http:// URL"
            ));
        }
        let mut w = WorkerSpec {
            url,
            role,
            events: None,
            replay: None,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("events", v)) if v.starts_with("tcp://") => w.events = Some(v.to_string()),
                Some(("replay", v)) if v.starts_with("tcp://") => w.replay = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "worker {arg:?}: unknown part {p:?} (events=tcp://HOST:PORT, \
                         replay=tcp://HOST:PORT)"
                    ))
                }
            }
        }
        Ok(w)
    }
}

/// A source of workers: the router lists them at start, then again every refresh interval
/// and whenever [`WorkerSource::changed`] says so.
pub trait WorkerSource: Send + Sync {
    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkerSpec>, String>>;

    /// Resolves when the list has changed since the last time it resolved (a source that
    /// watches pushes changes this way; one that is polled never resolves).
    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
}

/// The command line's list.
pub struct StaticSource(pub Vec<WorkerSpec>);

impl WorkerSource for StaticSource {
    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkerSpec>, String>> {
        let v = self.0.clone();
        Box::pin(async move { Ok(v) })
    }
}

/// A file of workers, one per line, read again whenever its content changes (polled every
/// [`FileSource::poll`]): what a local process pool (`llmd autoscale run`) writes to add and
/// take away workers while the router runs. A line is `[ROLE ]URL[,events=…][,replay=…]`
/// (ROLE `prefill-decode` — the default —, `prefill` or `decode`; the rest as `--worker`
/// takes it); blank lines and lines starting with `#` are skipped. Writers replace the file
/// by a rename, so the router never reads half of one.
pub struct FileSource {
    pub path: PathBuf,
    /// How often the file is looked at for a change.
    pub poll: Duration,
    /// The content last listed.
    last: std::sync::Mutex<Option<String>>,
}

impl FileSource {
    pub fn new(path: PathBuf, poll: Duration) -> Self {
        Self {
            path,
            poll,
            last: std::sync::Mutex::new(None),
        }
    }

    async fn read(&self) -> Result<String, String> {
        tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| format!("workers file {}: {e}", self.path.display()))
    }
}

/// The workers of a workers file's text (see [`FileSource`]); a bad line is an error naming
/// its number.
pub fn parse_workers_file(text: &str) -> Result<Vec<WorkerSpec>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (role, rest) = match line.split_once(char::is_whitespace) {
            Some((r, rest)) => {
                let role = match r {
                    "prefill-decode" | "both" => Role::Both,
                    "prefill" => Role::Prefill,
                    "decode" => Role::Decode,
                    _ => {
                        return Err(format!(
                            "line {}: unknown role {r:?} (prefill-decode, prefill, decode)",
                            i + 1
                        ))
                    }
                };
                (role, rest.trim())
            }
            None => (Role::Both, line),
        };
        let w = WorkerSpec::parse(rest, role).map_err(|e| format!("line {}: {e}", i + 1))?;
        if !out.iter().any(|o: &WorkerSpec| o.url == w.url) {
            out.push(w);
        }
    }
    Ok(out)
}

impl WorkerSource for FileSource {
    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkerSpec>, String>> {
        Box::pin(async move {
            let text = self.read().await?;
            // Remembered even when it does not parse: the next change is a new content.
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(text.clone());
            parse_workers_file(&text)
                .map_err(|e| format!("workers file {}: {e}", self.path.display()))
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                tokio::time::sleep(self.poll).await;
                // A file missing for a moment (being replaced) is no change.
                let Ok(now) = self.read().await else {
                    continue;
                };
                let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                if last.as_deref() != Some(now.as_str()) {
                    return;
                }
            }
        })
    }
}

/// Kubernetes: the ready, running pods of a namespace that carry `llm-d.ai/role`.
pub struct KubernetesSource {
    /// The API server, e.g. `https://kubernetes.default.svc` (in a pod: from
    /// `KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api: String,
    pub namespace: String,
    /// Extra label selector ANDed with the role label (e.g. `llm-d.ai/model=smollm2`).
    pub selector: Option<String>,
    /// The service account token's file (in a pod:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`), read again for every list:
    /// projected tokens are rotated (hourly by default) and the old one stops working.
    pub token_file: Option<PathBuf>,
    /// Limit on one API call, from connecting to the last byte of the answer.
    pub timeout: Duration,
    /// Ports on each pod: HTTP (a decode pod's sidecar), KV events, replay.
    pub http_port: u16,
    pub events_port: Option<u16>,
    pub replay_port: Option<u16>,
    /// Made by [`KubernetesSource::client`] (which bounds connecting).
    pub client: reqwest::Client,
}

/// Limit on connecting to the Kubernetes API.
pub const K8S_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default limit on one Kubernetes API call.
pub const K8S_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest pod list read (a namespace of thousands of pods is a few MiB).
const MAX_POD_LIST: usize = 64 << 20;

/// llm-d's role label.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

impl KubernetesSource {
    /// An HTTP client for the API: connecting is bounded by [`K8S_CONNECT_TIMEOUT`] and every
    /// call by `timeout`; `ca_pem` is the cluster's CA (in a pod: the service account's
    /// `ca.crt`).
    pub fn client(ca_pem: Option<&[u8]>, timeout: Duration) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(K8S_CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout);
        if let Some(pem) = ca_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| format!("the Kubernetes CA certificate: {e}"))?;
            b = b.add_root_certificate(cert);
        }
        b.build()
            .map_err(|e| format!("building the Kubernetes API client: {e}"))
    }

    /// The token as the file holds it now.
    async fn token(&self) -> Result<Option<String>, String> {
        super::k8s::read_token(self.token_file.as_deref()).await
    }

    /// The pod-list URL this source polls.
    pub fn url(&self) -> String {
        let mut selector = format!("{ROLE_LABEL} in (prefill,decode,prefill-decode,both)");
        if let Some(s) = &self.selector {
            selector.push(',');
            selector.push_str(s);
        }
        format!(
            "{}/api/v1/namespaces/{}/pods?labelSelector={}",
            self.api.trim_end_matches('/'),
            self.namespace,
            super::k8s::urlencode(&selector)
        )
    }
}

impl WorkerSource for KubernetesSource {
    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkerSpec>, String>> {
        Box::pin(async move {
            let mut req = self.client.get(self.url()).timeout(self.timeout);
            if let Some(t) = self.token().await? {
                req = req.bearer_auth(t);
            }
            let call = super::k8s::send_bounded(req, MAX_POD_LIST);
            // The client's own limit bounds each step; this bounds the whole call.
            let (status, body) = match tokio::time::timeout(self.timeout, call).await {
                Ok(Ok(got)) => got,
                Ok(Err(e)) => return Err(format!("Kubernetes API: {e}")),
                Err(_) => {
                    return Err(format!(
                        "Kubernetes API: no answer within {:?}",
                        self.timeout
                    ))
                }
            };
            let Some(body) = body else {
                return Err(format!(
                    "Kubernetes API: a pod list over {MAX_POD_LIST} bytes"
                ));
            };
            let body = String::from_utf8_lossy(&body);
            if !status.is_success() {
                return Err(format!(
                    "Kubernetes API: {status}: {}",
                    body.chars().take(300).collect::<String>()
                ));
            }
            pods_to_workers(&body, self.http_port, self.events_port, self.replay_port)
        })
    }
}

/// The workers of a `PodList` (the API's JSON): running, ready, not being deleted, with an IP
/// and a known role.
pub fn pods_to_workers(
    pod_list: &str,
    http_port: u16,
    events_port: Option<u16>,
    replay_port: Option<u16>,
) -> Result<Vec<WorkerSpec>, String> {
    let v: Value =
        serde_json::from_str(pod_list).map_err(|e| format!("Kubernetes pod list: {e}"))?;
    if v["kind"] != "PodList" {
        return Err(format!(
            "Kubernetes pod list: kind is {}, not PodList",
            v["kind"]
        ));
    }
    let mut out = Vec::new();
    for pod in v["items"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        // The label selector asked for a role; a pod without a known one is left out.
        let Some(Some(role)) = pod_role(pod) else {
            continue;
        };
        let Some(host) = ready_pod_host(pod) else {
            continue;
        };
        out.push(WorkerSpec {
            url: format!("http://{host}:{http_port}"),
            role,
            events: events_port.map(|p| format!("tcp://{host}:{p}")),
            replay: replay_port.map(|p| format!("tcp://{host}:{p}")),
        });
    }
    Ok(out)
}

/// A pod's `llm-d.ai/role`: None without the label, Some(None) with a value not known.
pub fn pod_role(pod: &Value) -> Option<Option<Role>> {
    let v = pod["metadata"]["labels"][ROLE_LABEL].as_str()?;
    Some(match v {
        "prefill" => Some(Role::Prefill),
        "decode" => Some(Role::Decode),
        "prefill-decode" | "both" => Some(Role::Both),
        _ => None,
    })
}

/// The host part of a URL for a pod that takes traffic (running, ready, not being deleted,
/// with an IP): the IP, bracketed when it is IPv6.
pub fn ready_pod_host(pod: &Value) -> Option<String> {
    if !pod["metadata"]["deletionTimestamp"].is_null() || pod["status"]["phase"] != "Running" {
        return None;
    }
    let ready = pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    let ip = pod["status"]["podIP"]
        .as_str()
        .filter(|ip| ready && !ip.is_empty())?;
    Some(if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_arguments_parse_and_bad_ones_say_why() {
        let w = WorkerSpec::parse(
            "http://127.0.0.1:8001/,events=tcp://127.0.0.1:5557,replay=tcp://127.0.0.1:5558",
            Role::Both,
        )
        .unwrap();
        assert_eq!(w.url, "http://127.0.0.1:8001");
        assert_eq!(w.host_port(), "127.0.0.1:8001");
        assert_eq!(w.events.as_deref(), Some("tcp://127.0.0.1:5557"));
        assert_eq!(w.replay.as_deref(), Some("tcp://127.0.0.1:5558"));
        assert!(WorkerSpec::parse("127.0.0.1:8001", Role::Both)
            .unwrap_err()
            .contains("http://"));
        assert!(WorkerSpec::parse("http://a:1,evnts=tcp://a:2", Role::Both)
            .unwrap_err()
            .contains("evnts"));
    }

    #[test]
    fn a_recorded_pod_list_gives_the_ready_pods_with_their_roles() {
        let list = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/k8s_pod_list.json"
        ))
        .unwrap();
        let w = pods_to_workers(&list, 8000, Some(5557), None).unwrap();
        let got: Vec<(&str, Role)> = w.iter().map(|w| (w.url.as_str(), w.role)).collect();
        assert_eq!(
            got,
            [
                ("http://10.244.0.11:8000", Role::Prefill),
                ("http://10.244.0.12:8000", Role::Decode),
                ("http://10.244.0.14:8000", Role::Both),
            ],
            "the pending, unready and terminating pods and the one without a role are left out"
        );
        assert_eq!(w[0].events.as_deref(), Some("tcp://10.244.0.11:5557"));
        assert!(pods_to_workers(r#"{"kind":"Status","code":403}"#, 8000, None, None).is_err());
    }

    #[test]
    fn the_selector_is_url_encoded() {
        let k = KubernetesSource {
            api: "https://k8s:6443/".into(),
            namespace: "llm".into(),
            selector: Some("llm-d.ai/model=smollm2".into()),
            token_file: None,
            timeout: K8S_TIMEOUT,
            http_port: 8000,
            events_port: None,
            replay_port: None,
            client: reqwest::Client::new(),
        };
        assert_eq!(
            k.url(),
            "https://k8s:6443/api/v1/namespaces/llm/pods?labelSelector=llm-d.ai%2Frole%20in%20%28prefill%2Cdecode%2Cprefill-decode%2Cboth%29%2Cllm-d.ai%2Fmodel%3Dsmollm2"
        );
    }

    #[test]
    fn a_workers_file_gives_its_workers_with_roles_and_bad_lines_are_named() {
        let w = parse_workers_file(
            "# the local pool\nhttp://127.0.0.1:8001\n\nprefill http://127.0.0.1:8002/,events=tcp://127.0.0.1:5557\ndecode http://127.0.0.1:8003\nhttp://127.0.0.1:8001\n",
        )
        .unwrap();
        let got: Vec<(&str, Role)> = w.iter().map(|w| (w.url.as_str(), w.role)).collect();
        assert_eq!(
            got,
            [
                ("http://127.0.0.1:8001", Role::Both),
                ("http://127.0.0.1:8002", Role::Prefill),
                ("http://127.0.0.1:8003", Role::Decode),
            ],
            "a URL listed twice is one worker"
        );
        assert_eq!(w[1].events.as_deref(), Some("tcp://127.0.0.1:5557"));
        assert!(parse_workers_file("").unwrap().is_empty());
        let e = parse_workers_file("http://a:1\nencode http://a:2\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("encode"), "{e}");
        let e = parse_workers_file("a:1\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("http://"), "{e}");
    }

    #[tokio::test]
    async fn a_workers_file_source_sees_a_replaced_file() {
        let dir = std::env::temp_dir().join(format!("llmd-workers-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("workers");
        std::fs::write(&path, "http://127.0.0.1:9001\n").unwrap();
        let src = FileSource::new(path.clone(), Duration::from_millis(10));
        assert_eq!(src.list().await.unwrap().len(), 1);
        // Unchanged: no change is reported.
        let quiet = tokio::time::timeout(Duration::from_millis(100), src.changed()).await;
        assert!(quiet.is_err());
        let tmp = dir.join("workers.tmp");
        std::fs::write(&tmp, "http://127.0.0.1:9001\nhttp://127.0.0.1:9002\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(10), src.changed())
            .await
            .expect("the change is seen");
        assert_eq!(src.list().await.unwrap().len(), 2);
        std::fs::write(&path, "nonsense\n").unwrap();
        assert!(src.list().await.unwrap_err().contains("line 1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
