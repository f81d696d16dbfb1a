//! A fake Kubernetes API server on loopback: LIST and WATCH of namespaced collections, as the
//! real one answers them. Objects are kept by (collection path, name); every change bumps a
//! global resourceVersion and is kept in a history, so a WATCH from a version replays what
//! came after it, filtered by its `labelSelector` (`k=v,…`) or `fieldSelector`
//! (`metadata.name=…`) — an object whose labels stop matching arrives as DELETED, as the real
//! server sends it. A watch streams one JSON event per line, each line sent in two chunks.
//! The test can end every open watch cleanly ([`FakeKube::close_watches`]) or with a
//! `410 Gone` ERROR event ([`FakeKube::expire_watches`], which also forgets the history, so
//! resuming from an old version is a 410 answer), or send a line of its choosing
//! ([`FakeKube::send_raw_and_close`]).
use super::{Fake, Seen};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

pub const PODS: &str = "/api/v1/namespaces/llm/pods";
pub const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools";
pub const OBJECTIVES: &str = "/apis/llm-d.ai/v1alpha2/namespaces/llm/inferenceobjectives";

struct Change {
    rv: u64,
    coll: String,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Clone, Debug)]
struct Filter {
    labels: Vec<(String, String)>,
    name: Option<String>,
}

impl Filter {
    fn parse(q: &HashMap<String, String>) -> Result<Filter, String> {
        let mut labels = Vec::new();
        if let Some(sel) = q.get("labelSelector").filter(|s| !s.is_empty()) {
            for part in sel.split(',') {
                let (k, v) = part
                    .split_once("==")
                    .or_else(|| part.split_once('='))
                    .filter(|(k, _)| !k.is_empty() && !k.ends_with('!'))
                    .ok_or_else(|| format!("this fake takes only k=v selectors, not {part:?}"))?;
                labels.push((k.to_string(), v.to_string()));
            }
        }
        let name = match q.get("fieldSelector").filter(|s| !s.is_empty()) {
            None => None,
            Some(f) => Some(
                f.strip_prefix("metadata.name=")
                    .ok_or_else(|| format!("this fake takes only metadata.name=, not {f:?}"))?
                    .to_string(),
            ),
        };
        Ok(Filter { labels, name })
    }

    fn matches(&self, o: &Value) -> bool {
        self.name
            .as_ref()
            .is_none_or(|n| o["metadata"]["name"].as_str() == Some(n))
            && self
                .labels
                .iter()
                .all(|(k, v)| o["metadata"]["labels"][k].as_str() == Some(v))
    }
}

struct Watcher {
    coll: String,
    filter: Filter,
    tx: UnboundedSender<Bytes>,
}

impl Watcher {
    /// Sends one event line in two chunks; false when the client has gone.
    fn send(&self, event: &Value) -> bool {
        let line = format!("{event}\n").into_bytes();
        let (a, b) = line.split_at(line.len() / 2);
        self.tx.send(Bytes::copy_from_slice(a)).is_ok()
            && self.tx.send(Bytes::copy_from_slice(b)).is_ok()
    }

    /// The event a change is for this watcher, if any.
    fn event(&self, c: &Change) -> Option<Value> {
        if c.coll != self.coll {
            return None;
        }
        let was = c.old.as_ref().is_some_and(|o| self.filter.matches(o));
        let is = c.new.as_ref().is_some_and(|o| self.filter.matches(o));
        let kind = match (was, is) {
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
            (false, false) => return None,
        };
        let mut object = c.new.clone().or_else(|| c.old.clone())?;
        object["metadata"]["resourceVersion"] = json!(c.rv.to_string());
        Some(json!({"type": kind, "object": object}))
    }
}

#[derive(Default)]
struct Kube {
    rv: u64,
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// A watch from a version below this is answered 410.
    oldest: u64,
    watchers: Vec<Watcher>,
    lists: BTreeMap<String, usize>,
    watches: BTreeMap<String, usize>,
}

impl Kube {
    fn record(&mut self, coll: &str, old: Option<Value>, new: Option<Value>) {
        let c = Change {
            rv: self.rv,
            coll: coll.to_string(),
            old,
            new,
        };
        self.watchers.retain(|w| match w.event(&c) {
            Some(e) => w.send(&e),
            None => !w.tx.is_closed(),
        });
        self.history.push(c);
    }

    fn answer(&mut self, s: &Seen) -> Response {
        if s.method != "GET" {
            return status(405, "MethodNotAllowed", "this fake only reads");
        }
        let q: HashMap<String, String> = match format!("/?{}", s.query)
            .parse::<axum::http::Uri>()
            .ok()
            .and_then(|u| axum::extract::Query::try_from_uri(&u).ok())
        {
            Some(axum::extract::Query(q)) => q,
            None => return status(400, "BadRequest", "query not decodable"),
        };
        let filter = match Filter::parse(&q) {
            Ok(f) => f,
            Err(e) => return status(400, "BadRequest", &e),
        };
        let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
        if !watch {
            *self.lists.entry(s.path.clone()).or_default() += 1;
            let items: Vec<Value> = self
                .objects
                .iter()
                .filter(|((c, _), o)| *c == s.path && filter.matches(o))
                .map(|(_, o)| o.clone())
                .collect();
            return super::json(json!({"kind": "List", "apiVersion": "v1",
                "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}));
        }
        *self.watches.entry(s.path.clone()).or_default() += 1;
        let Some(from) = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()) else {
            return status(
                400,
                "BadRequest",
                "this fake watches only from a resourceVersion",
            );
        };
        if from < self.oldest {
            return status(410, "Expired", "too old resource version");
        }
        let (tx, rx) = unbounded_channel::<Bytes>();
        let w = Watcher {
            coll: s.path.clone(),
            filter,
            tx,
        };
        for c in self.history.iter().filter(|c| c.rv > from) {
            if let Some(e) = w.event(c) {
                w.send(&e);
            }
        }
        if q.get("allowWatchBookmarks").is_some_and(|b| b == "true") {
            w.send(&json!({"type": "BOOKMARK",
                "object": {"kind": "Bookmark", "metadata": {"resourceVersion": self.rv.to_string()}}}));
        }
        self.watchers.push(w);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        });
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let mut r = super::json(
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "message": message, "code": code}),
    );
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

/// The running fake API server.
pub struct FakeKube {
    pub http: Fake,
    state: Arc<Mutex<Kube>>,
}

impl FakeKube {
    pub async fn start() -> Self {
        let state: Arc<Mutex<Kube>> = Arc::default();
        let s = state.clone();
        let http = Fake::start(move |seen| s.lock().unwrap().answer(seen)).await;
        Self { http, state }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.http.url()
    }

    /// Creates or replaces `object` (by its metadata.name) in collection `coll`.
    pub fn put(&self, coll: &str, mut object: Value) {
        let mut k = self.state.lock().unwrap();
        k.rv += 1;
        object["metadata"]["resourceVersion"] = json!(k.rv.to_string());
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let old = k.objects.insert((coll.to_string(), name), object.clone());
        k.record(coll, old, Some(object));
    }

    /// Deletes `name` from `coll` (nothing when it is not there).
    pub fn delete(&self, coll: &str, name: &str) {
        let mut k = self.state.lock().unwrap();
        let Some(old) = k.objects.remove(&(coll.to_string(), name.to_string())) else {
            return;
        };
        k.rv += 1;
        k.record(coll, Some(old), None);
    }

    /// Ends every open watch cleanly (the server's own timeout does this).
    pub fn close_watches(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// Ends every open watch with a 410 ERROR event and forgets the history (a compaction).
    pub fn expire_watches(&self) {
        let mut k = self.state.lock().unwrap();
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version"}});
        for w in k.watchers.drain(..) {
            w.send(&gone);
        }
        k.oldest = k.rv + 1;
        k.history.clear();
    }

    /// Sends `line` (plus a newline) as it is on every open watch, then ends them.
    pub fn send_raw_and_close(&self, line: &[u8]) {
        let mut k = self.state.lock().unwrap();
        for w in k.watchers.drain(..) {
            let mut l = line.to_vec();
            l.push(b'\n');
            let _ = w.tx.send(Bytes::from(l));
        }
    }

    /// LISTs of `coll` so far.
    pub fn lists(&self, coll: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .lists
            .get(coll)
            .copied()
            .unwrap_or(0)
    }

    /// WATCHes of `coll` started so far.
    pub fn watches(&self, coll: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .watches
            .get(coll)
            .copied()
            .unwrap_or(0)
    }

    /// WATCHes of `coll` open now.
    pub fn open_watches(&self, coll: &str) -> usize {
        let mut k = self.state.lock().unwrap();
        k.watchers.retain(|w| !w.tx.is_closed());
        k.watchers.iter().filter(|w| w.coll == coll).count()
    }
}

/// A pod as the API serves it: running, with `ip`, ready or not.
pub fn pod(name: &str, ip: &str, labels: Value, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "llm", "uid": format!("uid-{name}"), "labels": labels},
        "spec": {"containers": [{"name": "llmd", "image": "llmd:dev"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

/// An InferenceObjective of `pool` with `priority` (None: unset).
pub fn objective(name: &str, pool: &str, priority: Option<i64>) -> Value {
    let mut spec = json!({"poolRef": {"group": "inference.networking.k8s.io",
        "kind": "InferencePool", "name": pool}});
    if let Some(p) = priority {
        spec["priority"] = json!(p);
    }
    json!({"apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "llm", "uid": format!("uid-{name}")},
        "spec": spec})
}
