//! Workers from a Gateway API `InferencePool` (`inference.networking.k8s.io/v1`), and the
//! priorities of llm-d's `InferenceObjective`s (`llm-d.ai/v1alpha2`), both watched.
//!
//! [`PoolSource`] watches one pool by name; its `spec.selector.matchLabels` picks the pods
//! (watched in turn, the watch started again when the selector changes) and every ready pod ×
//! every `spec.targetPorts[].number` is a worker (`http://podIP:port`), its role from the
//! pod's `llm-d.ai/role` label (none: prefill-decode; a value not known: left out). Changes
//! reach the router as they happen ([`WorkerSource::changed`]); nothing is polled.
//!
//! [`watch_objectives`] hands its caller the complete objective → priority map of a namespace
//! (optionally only the objectives whose `spec.poolRef` names the pool) after every change.
use super::k8s::{self, Api, Change, Collection, Store};
use super::workers::{pod_role, ready_pod_host, Role, WorkerSource, WorkerSpec};
use futures_util::future::BoxFuture;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What a pool says about its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// `spec.selector.matchLabels`.
    pub selector: BTreeMap<String, String>,
    /// `spec.targetPorts[].number`, in order.
    pub ports: Vec<u16>,
}

impl Pool {
    /// An `InferencePool` object (as the API serves it).
    pub fn parse(obj: &Value) -> Result<Pool, String> {
        let name = obj["metadata"]["name"].as_str().unwrap_or("?");
        let spec = &obj["spec"];
        let labels = spec["selector"]["matchLabels"]
            .as_object()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| format!("InferencePool {name}: no spec.selector.matchLabels"))?;
        let mut selector = BTreeMap::new();
        for (k, v) in labels {
            let v = v.as_str().ok_or_else(|| {
                format!("InferencePool {name}: matchLabels {k:?} is not a string")
            })?;
            selector.insert(k.clone(), v.to_string());
        }
        let ports = spec["targetPorts"]
            .as_array()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("InferencePool {name}: no spec.targetPorts"))?;
        let mut out = Vec::new();
        for p in ports {
            let n = p["number"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    format!(
                        "InferencePool {name}: target port {} is not 1..65535",
                        p["number"]
                    )
                })?;
            if !out.contains(&n) {
                out.push(n);
            }
        }
        Ok(Pool {
            selector,
            ports: out,
        })
    }

    /// The selector as a `labelSelector` (`k=v,k=v`).
    pub fn label_selector(&self) -> String {
        self.selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn selects(&self, pod: &Value) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| pod["metadata"]["labels"][k].as_str() == Some(v))
    }
}

/// A pod that takes traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ReadyPod {
    host: String,
    role: Role,
}

/// The pods of `pods` that take traffic, by name: ready, selected by `pool`, with a role
/// known (or none: prefill-decode).
fn ready_pods(pool: &Pool, pods: &Store) -> Vec<ReadyPod> {
    let mut out = Vec::new();
    for (name, pod) in pods {
        if !pool.selects(pod) {
            continue;
        }
        let role = match pod_role(pod) {
            None => Role::Both,
            Some(Some(r)) => r,
            Some(None) => {
                tracing::debug!(pod = %name, "pod with an unknown llm-d.ai/role left out");
                continue;
            }
        };
        if let Some(host) = ready_pod_host(pod) {
            out.push(ReadyPod { host, role });
        }
    }
    out
}

/// Ports on each pod beside the pool's target ports.
#[derive(Clone, Copy, Debug, Default)]
pub struct PodPorts {
    /// The KV events PUB socket of the first target port; the i-th target port's is this
    /// plus i (vLLM offsets a data-parallel rank's endpoint port by its rank).
    pub events: Option<u16>,
    /// The replay socket, offset the same way.
    pub replay: Option<u16>,
}

/// Every ready pod × every target port.
fn workers_of(pool: &Pool, pods: &[ReadyPod], extra: PodPorts) -> Vec<WorkerSpec> {
    let offset =
        |base: Option<u16>, i: usize| base.and_then(|p| u16::try_from(p as usize + i).ok());
    let mut out = Vec::with_capacity(pods.len() * pool.ports.len());
    for pod in pods {
        for (i, port) in pool.ports.iter().enumerate() {
            let h = &pod.host;
            out.push(WorkerSpec {
                url: format!("http://{h}:{port}"),
                role: pod.role,
                events: offset(extra.events, i).map(|p| format!("tcp://{h}:{p}")),
                replay: offset(extra.replay, i).map(|p| format!("tcp://{h}:{p}")),
            });
        }
    }
    out
}

/// The pool's collection, narrowed to the one pool.
pub fn pool_collection(namespace: &str, name: &str) -> Collection {
    Collection {
        path: format!("/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools"),
        label_selector: None,
        field_selector: Some(format!("metadata.name={name}")),
    }
}

/// Workers from an `InferencePool`, kept current by watches.
pub struct PoolSource {
    api: Arc<Api>,
    namespace: String,
    name: String,
    ports: PodPorts,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Shared {
    state: Mutex<State>,
    /// One permit per change not yet taken by [`WorkerSource::changed`].
    changed: Notify,
    /// True once the pool, and its pods when it exists, have been listed.
    synced: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    pool_listed: bool,
    pool: Option<Pool>,
    /// Which pods watch is current: an older one's news is dropped.
    pods_gen: u64,
    pods_task: Option<tokio::task::JoinHandle<()>>,
    pods_listed: bool,
    pods: Vec<ReadyPod>,
    workers: Vec<WorkerSpec>,
    last_error: Option<String>,
}

impl Drop for PoolSource {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = st.pods_task.take() {
            t.abort();
        }
    }
}

impl PoolSource {
    /// Watches start on the first [`WorkerSource::list`] (inside the router's runtime).
    pub fn new(api: Arc<Api>, namespace: String, name: String, ports: PodPorts) -> Self {
        Self {
            api,
            namespace,
            name,
            ports,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                synced: tokio::sync::watch::channel(false).0,
            }),
            task: Mutex::new(None),
        }
    }

    fn start(&self) {
        let mut t = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_some() {
            return;
        }
        let (api, shared) = (self.api.clone(), self.shared.clone());
        let (ns, name, ports) = (self.namespace.clone(), self.name.clone(), self.ports);
        *t = Some(tokio::spawn(async move {
            let coll = pool_collection(&ns, &name);
            k8s::list_watch(&api, &coll, |c| match c {
                Change::Listed(store) | Change::Updated(store) => {
                    let pool = match store.get(&name).map(Pool::parse) {
                        None => None,
                        Some(Ok(p)) => Some(p),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "InferencePool not usable; no workers");
                            None
                        }
                    };
                    pool_changed(&api, &shared, &ns, pool, ports);
                }
                Change::Failed(e) => failed(&shared, e),
            })
            .await
        }));
    }
}

fn failed(shared: &Shared, e: &str) {
    tracing::warn!(error = %e, "Kubernetes watch failed; starting it again");
    shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .last_error = Some(e.to_string());
}

/// The pool as it is now: a new selector starts a new pods watch.
fn pool_changed(
    api: &Arc<Api>,
    shared: &Arc<Shared>,
    namespace: &str,
    pool: Option<Pool>,
    ports: PodPorts,
) {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    st.pool_listed = true;
    let same_pods = st.pool.as_ref().map(|p| &p.selector) == pool.as_ref().map(|p| &p.selector);
    if pool != st.pool {
        match &pool {
            Some(p) => {
                tracing::info!(selector = %p.label_selector(), ports = ?p.ports, "InferencePool")
            }
            None => tracing::warn!("no InferencePool: no workers"),
        }
    }
    if !same_pods || (pool.is_some() && st.pods_task.is_none()) {
        if let Some(t) = st.pods_task.take() {
            t.abort();
        }
        st.pods_gen += 1;
        st.pods_listed = false;
        st.pods.clear();
        if let Some(p) = &pool {
            let coll = Collection {
                path: format!("/api/v1/namespaces/{namespace}/pods"),
                label_selector: Some(p.label_selector()),
                field_selector: None,
            };
            let (api, shared, gen) = (api.clone(), shared.clone(), st.pods_gen);
            st.pods_task = Some(tokio::spawn(async move {
                k8s::list_watch(&api, &coll, |c| match c {
                    Change::Listed(store) | Change::Updated(store) => {
                        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                        if st.pods_gen != gen {
                            return;
                        }
                        let Some(pool) = &st.pool else { return };
                        st.pods = ready_pods(pool, store);
                        st.pods_listed = true;
                        publish(&shared, &mut st, ports);
                    }
                    Change::Failed(e) => failed(&shared, e),
                })
                .await
            }));
        }
    }
    st.pool = pool;
    publish(shared, &mut st, ports);
}

/// Recomputes the workers once everything is listed; tells the router when they changed.
fn publish(shared: &Shared, st: &mut State, ports: PodPorts) {
    let listed = st.pool_listed && (st.pool.is_none() || st.pods_listed);
    if !listed {
        // A new selector's pods are not listed yet: the router keeps the last workers.
        return;
    }
    let workers = match &st.pool {
        Some(p) => workers_of(p, &st.pods, ports),
        None => Vec::new(),
    };
    st.last_error = None;
    if workers != st.workers {
        st.workers = workers;
        shared.changed.notify_one();
    }
    shared.synced.send_replace(true);
}

impl WorkerSource for PoolSource {
    /// The workers now; the first call starts the watches and waits (at most the API timeout)
    /// until the pool and its pods have been listed.
    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkerSpec>, String>> {
        Box::pin(async move {
            self.start();
            let mut rx = self.shared.synced.subscribe();
            // (The channel's read guard goes at once: `publish` sends while holding the state.)
            let synced = matches!(
                tokio::time::timeout(self.api.timeout, rx.wait_for(|s| *s)).await,
                Ok(Ok(_))
            );
            let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if !synced {
                return Err(format!(
                    "InferencePool {}/{}: not listed within {:?}: {}",
                    self.namespace,
                    self.name,
                    self.api.timeout,
                    st.last_error.as_deref().unwrap_or("no answer")
                ));
            }
            Ok(st.workers.clone())
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.changed.notified())
    }
}

/// The objectives' collection in a namespace.
pub fn objectives_collection(namespace: &str) -> Collection {
    Collection {
        path: format!("/apis/llm-d.ai/v1alpha2/namespaces/{namespace}/inferenceobjectives"),
        label_selector: None,
        field_selector: None,
    }
}

/// Objective name → `spec.priority` (unset: 0), only those whose `spec.poolRef.name` is
/// `pool` when one is given. One whose priority is not an int32 is left out.
pub fn objective_priorities(store: &Store, pool: Option<&str>) -> HashMap<String, i32> {
    let mut out = HashMap::new();
    for (name, o) in store {
        let spec = &o["spec"];
        if pool.is_some_and(|p| spec["poolRef"]["name"].as_str() != Some(p)) {
            continue;
        }
        let priority = match &spec["priority"] {
            Value::Null => Some(0),
            v => v.as_i64().and_then(|p| i32::try_from(p).ok()),
        };
        match priority {
            Some(p) => {
                out.insert(name.clone(), p);
            }
            None => tracing::warn!(objective = %name, priority = %spec["priority"],
                "InferenceObjective with a priority that is not an int32 left out"),
        }
    }
    out
}

/// Watches the `InferenceObjective`s of `namespace` forever: `on` gets the complete
/// name → priority map after the first list and after every change to it.
pub async fn watch_objectives(
    api: Arc<Api>,
    namespace: String,
    pool: Option<String>,
    on: impl Fn(HashMap<String, i32>) + Send + Sync + 'static,
) {
    let mut last: Option<HashMap<String, i32>> = None;
    k8s::list_watch(&api, &objectives_collection(&namespace), |c| match c {
        Change::Listed(store) | Change::Updated(store) => {
            let now = objective_priorities(store, pool.as_deref());
            if last.as_ref() != Some(&now) {
                last = Some(now.clone());
                on(now);
            }
        }
        Change::Failed(e) => {
            tracing::warn!(error = %e, "InferenceObjective watch failed; starting it again")
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture() -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/inference_pool.json"
            ))
            .unwrap(),
        )
        .unwrap()
    }

    fn pod(name: &str, ip: &str, labels: Value, ready: bool) -> (String, Value) {
        (
            name.to_string(),
            json!({"metadata": {"name": name, "labels": labels},
                   "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}),
        )
    }

    #[test]
    fn the_fixture_pool_parses_and_broken_ones_say_why() {
        let p = Pool::parse(&fixture()).unwrap();
        assert_eq!(p.ports, [8000, 8001]);
        assert_eq!(
            p.label_selector(),
            "app=smollm2,llm-d.ai/inferenceServing=true"
        );
        let mut bad = fixture();
        bad["spec"]["targetPorts"] = json!([{"number": 70000}]);
        assert!(Pool::parse(&bad).unwrap_err().contains("70000"));
        bad["spec"]["targetPorts"] = json!([]);
        assert!(Pool::parse(&bad).unwrap_err().contains("targetPorts"));
        let mut bad = fixture();
        bad["spec"]["selector"] = json!({"matchLabels": {}});
        assert!(Pool::parse(&bad).unwrap_err().contains("matchLabels"));
    }

    #[test]
    fn workers_are_the_ready_selected_pods_times_the_ports() {
        let pool = Pool::parse(&fixture()).unwrap();
        let sel = json!({"app": "smollm2", "llm-d.ai/inferenceServing": "true"});
        let mut decode = sel.clone();
        decode["llm-d.ai/role"] = json!("decode");
        let mut odd = sel.clone();
        odd["llm-d.ai/role"] = json!("router");
        let store: Store = [
            pod("a", "10.0.0.1", sel.clone(), true),
            pod("b", "fd00::2", decode, true),
            pod("c", "10.0.0.3", sel.clone(), false),
            pod("d", "10.0.0.4", json!({"app": "smollm2"}), true),
            pod("e", "10.0.0.5", odd, true),
        ]
        .into_iter()
        .collect();
        let w = workers_of(
            &pool,
            &ready_pods(&pool, &store),
            PodPorts {
                events: Some(5557),
                replay: None,
            },
        );
        let got: Vec<_> = w
            .iter()
            .map(|w| (w.url.as_str(), w.role, w.events.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "http://10.0.0.1:8000",
                    Role::Both,
                    Some("tcp://10.0.0.1:5557")
                ),
                (
                    "http://10.0.0.1:8001",
                    Role::Both,
                    Some("tcp://10.0.0.1:5558")
                ),
                (
                    "http://[fd00::2]:8000",
                    Role::Decode,
                    Some("tcp://[fd00::2]:5557")
                ),
                (
                    "http://[fd00::2]:8001",
                    Role::Decode,
                    Some("tcp://[fd00::2]:5558")
                ),
            ],
            "c is not ready, d is not selected, e has a role not known"
        );
    }

    #[test]
    fn objective_priorities_default_to_zero_and_follow_the_pool() {
        let store: Store = [
            (
                "chat",
                json!({"spec": {"poolRef": {"name": "p"}, "priority": 10}}),
            ),
            (
                "batch",
                json!({"spec": {"poolRef": {"name": "p"}, "priority": -1}}),
            ),
            ("plain", json!({"spec": {"poolRef": {"name": "p"}}})),
            (
                "other",
                json!({"spec": {"poolRef": {"name": "q"}, "priority": 5}}),
            ),
            (
                "huge",
                json!({"spec": {"poolRef": {"name": "p"}, "priority": 1u64 << 40}}),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let m = objective_priorities(&store, Some("p"));
        let want: HashMap<String, i32> = [("chat", 10), ("batch", -1), ("plain", 0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(m, want);
        assert_eq!(objective_priorities(&store, None).get("other"), Some(&5));
    }
}
