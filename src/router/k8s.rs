//! The Kubernetes API as the router reads it: one collection of objects (the InferencePool,
//! its pods, the InferenceObjectives) kept current by LIST then WATCH.
//!
//! [`list_watch`] lists the collection, then watches it from the list's `resourceVersion`:
//! the answer is a chunked stream of JSON lines, one event each (`ADDED`, `MODIFIED`,
//! `DELETED`, `BOOKMARK`, `ERROR`), read by [`Lines`] with a bound on a line's length. When
//! the server ends a watch cleanly (its `timeoutSeconds`) the watch resumes from the last
//! version seen (bookmarks keep it fresh); a `410 Gone` (as the answer or as an `ERROR` event),
//! any other error, a bad line or a silent stream lists again. Failures back off, doubling
//! from [`BACKOFF_MIN`] to [`BACKOFF_MAX`]. The caller sees the whole collection after every
//! change, never single events.
//!
//! The service account token is read again for every call (projected tokens rotate).
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Limit on connecting to the API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest LIST answer read (a namespace of thousands of pods is a few MiB).
pub const MAX_LIST_BYTES: usize = 64 << 20;
/// Longest watch event line (a pod is a few KiB; a huge one is not one the router wants).
pub const MAX_LINE_BYTES: usize = 4 << 20;
/// The watch length asked of the server (`timeoutSeconds`).
pub const WATCH_SECONDS: u64 = 290;
/// First and largest pause after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where the API is and how to call it.
pub struct Api {
    /// e.g. `https://kubernetes.default.svc`.
    pub base: String,
    /// The service account token's file, read again for every call.
    pub token_file: Option<PathBuf>,
    /// Limit on a LIST; a watch may be silent for [`WATCH_SECONDS`] plus this.
    pub timeout: Duration,
    /// Made by [`Api::client`]: bounds connecting, not the whole call (a watch is long).
    pub client: reqwest::Client,
}

impl Api {
    /// An HTTP client for the API: connecting is bounded by [`CONNECT_TIMEOUT`]; `ca_pem` is
    /// the cluster's CA (in a pod: the service account's `ca.crt`).
    pub fn client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(pem) = ca_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| format!("the Kubernetes CA certificate: {e}"))?;
            b = b.add_root_certificate(cert);
        }
        b.build()
            .map_err(|e| format!("building the Kubernetes API client: {e}"))
    }

    /// The token as the file holds it now.
    pub async fn token(&self) -> Result<Option<String>, String> {
        read_token(self.token_file.as_deref()).await
    }

    async fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, String> {
        let mut req = self.client.get(url);
        if let Some(t) = self.token().await? {
            req = req.bearer_auth(t);
        }
        Ok(req)
    }
}

/// A service account token file as it is now (trimmed).
pub async fn read_token(path: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    let t = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("reading the service account token {}: {e}", path.display()))?;
    Ok(Some(t.trim().to_string()))
}

/// A collection to follow: its path and selectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collection {
    /// e.g. `/api/v1/namespaces/llm/pods`.
    pub path: String,
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
}

impl Collection {
    /// The URL of a LIST (`watch_from: None`) or of a WATCH from a resource version.
    pub fn url(&self, base: &str, watch_from: Option<&str>) -> String {
        let mut q = Vec::new();
        if let Some(s) = &self.label_selector {
            q.push(format!("labelSelector={}", urlencode(s)));
        }
        if let Some(s) = &self.field_selector {
            q.push(format!("fieldSelector={}", urlencode(s)));
        }
        if let Some(rv) = watch_from {
            q.push("watch=true".into());
            q.push(format!("resourceVersion={}", urlencode(rv)));
            q.push("allowWatchBookmarks=true".into());
            q.push(format!("timeoutSeconds={WATCH_SECONDS}"));
        }
        let mut url = format!("{}{}", base.trim_end_matches('/'), self.path);
        if !q.is_empty() {
            url.push('?');
            url.push_str(&q.join("&"));
        }
        url
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The objects of a collection by name (one namespace: names are unique).
pub type Store = BTreeMap<String, Value>;

/// Splits a byte stream into lines, refusing one longer than its bound.
pub struct Lines {
    buf: Vec<u8>,
    max: usize,
}

impl Lines {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Adds `chunk`; the lines it completes (without `\n` or `\r\n`; empty lines skipped).
    /// Err when a line, complete or not, is longer than the bound (the stream is then
    /// unusable: the caller starts again).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if self.buf.len() + i > self.max {
                return Err(self.too_long());
            }
            self.buf.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            let mut line = std::mem::take(&mut self.buf);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if !line.is_empty() {
                out.push(line);
            }
        }
        if self.buf.len() + rest.len() > self.max {
            return Err(self.too_long());
        }
        self.buf.extend_from_slice(rest);
        Ok(out)
    }

    /// The stream ended: Err when it ended inside a line.
    pub fn finish(&mut self) -> Result<(), String> {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            self.buf.clear();
            return Ok(());
        }
        let n = self.buf.len();
        self.buf.clear();
        Err(format!("the watch stream ended inside a line ({n} bytes)"))
    }

    fn too_long(&mut self) -> String {
        self.buf.clear();
        format!("a watch event line over {} bytes", self.max)
    }
}

/// One watch event.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// ADDED or MODIFIED: the object as it is now.
    Put {
        name: String,
        object: Value,
    },
    Deleted {
        name: String,
    },
    /// Nothing changed up to this resource version.
    Bookmark,
    /// The version watched from is gone (410): list again.
    Gone,
    /// Any other ERROR event.
    Error(String),
}

/// One watch line; the resource version it carries, if any.
pub fn parse_event(line: &[u8]) -> Result<(Event, Option<String>), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        format!(
            "a watch event that is not JSON ({e}): {}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        )
    })?;
    let object = &v["object"];
    let rv = object["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    let name = || {
        object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("a {} watch event without a name", v["type"]))
    };
    let event = match v["type"].as_str() {
        Some("ADDED") | Some("MODIFIED") => Event::Put {
            name: name()?,
            object: object.clone(),
        },
        Some("DELETED") => Event::Deleted { name: name()? },
        Some("BOOKMARK") => Event::Bookmark,
        Some("ERROR") if object["code"] == 410 => Event::Gone,
        Some("ERROR") => Event::Error(format!(
            "{} {}: {}",
            object["code"], object["reason"], object["message"]
        )),
        _ => return Err(format!("a watch event of type {}", v["type"])),
    };
    Ok((event, rv))
}

/// What the caller of [`list_watch`] is told.
pub enum Change<'a> {
    /// A LIST just replaced the whole collection.
    Listed(&'a Store),
    /// A watch event changed it.
    Updated(&'a Store),
    /// A call failed (the collection stays as it was; the watch starts again).
    Failed(&'a str),
}

/// How a watch ended.
enum Ended {
    /// The server closed the stream at a line's end.
    Closed,
    /// 410: the version is too old.
    Gone,
    Failed(String),
}

/// Lists `what`, then watches it, forever; `on` sees the collection after every change.
pub async fn list_watch(api: &Api, what: &Collection, mut on: impl FnMut(Change<'_>)) {
    let mut store = Store::new();
    let mut rv: Option<String> = None;
    let mut delay = BACKOFF_MIN;
    loop {
        if rv.is_none() {
            match list(api, what).await {
                Ok((items, version)) => {
                    store = items;
                    rv = Some(version);
                    on(Change::Listed(&store));
                }
                Err(e) => {
                    on(Change::Failed(&e));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let version = rv.as_mut().expect("listed");
        let started = Instant::now();
        let mut events = 0usize;
        let ended = watch(api, what, version, &mut store, &mut events, &mut on).await;
        match ended {
            Ended::Closed => tracing::debug!(path = %what.path, "watch closed; resuming"),
            Ended::Gone => {
                tracing::info!(path = %what.path, "watch expired (410); listing again");
                rv = None;
            }
            Ended::Failed(e) => {
                on(Change::Failed(&e));
                rv = None;
            }
        }
        // A watch that ran a while or carried news is a healthy one: no back-off earned.
        if events > 0 || started.elapsed() >= Duration::from_secs(10) {
            delay = BACKOFF_MIN;
            if rv.is_some() {
                continue;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// Sends `req` and reads the answer's status and body, the body `None` when it is over
/// `limit` bytes (read no further).
pub async fn send_bounded(
    req: reqwest::RequestBuilder,
    limit: usize,
) -> Result<(reqwest::StatusCode, Option<Vec<u8>>), reqwest::Error> {
    let mut r = req.send().await?;
    let status = r.status();
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok((status, None));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, Some(body)))
}

/// A LIST: the objects by name and the list's resource version.
pub async fn list(api: &Api, what: &Collection) -> Result<(Store, String), String> {
    let url = what.url(&api.base, None);
    let req = api.get(&url).await?.timeout(api.timeout);
    let call = send_bounded(req, MAX_LIST_BYTES);
    let (status, body) = match tokio::time::timeout(api.timeout, call).await {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => return Err(format!("Kubernetes API: listing {}: {e}", what.path)),
        Err(_) => {
            return Err(format!(
                "Kubernetes API: listing {}: no answer within {:?}",
                what.path, api.timeout
            ))
        }
    };
    let Some(body) = body else {
        return Err(format!(
            "Kubernetes API: a list of {} over {MAX_LIST_BYTES} bytes",
            what.path
        ));
    };
    if !status.is_success() {
        return Err(format!(
            "Kubernetes API: listing {}: {status}: {}",
            what.path,
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        ));
    }
    parse_list(&body).map_err(|e| format!("Kubernetes API: listing {}: {e}", what.path))
}

/// A LIST answer: the objects by name and its resource version.
pub fn parse_list(body: &[u8]) -> Result<(Store, String), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Some(items) = v["items"].as_array() else {
        return Err(format!("no items (kind {})", v["kind"]));
    };
    let rv = v["metadata"]["resourceVersion"]
        .as_str()
        .ok_or("no metadata.resourceVersion")?
        .to_string();
    let mut store = Store::new();
    for item in items {
        let name = item["metadata"]["name"]
            .as_str()
            .ok_or("an item without metadata.name")?;
        store.insert(name.to_string(), item.clone());
    }
    Ok((store, rv))
}

/// One WATCH from `rv` (updated as events arrive), applying its events to `store`.
async fn watch(
    api: &Api,
    what: &Collection,
    rv: &mut String,
    store: &mut Store,
    events: &mut usize,
    on: &mut impl FnMut(Change<'_>),
) -> Ended {
    let url = what.url(&api.base, Some(rv));
    let req = match api.get(&url).await {
        Ok(r) => r,
        Err(e) => return Ended::Failed(e),
    };
    let idle = Duration::from_secs(WATCH_SECONDS) + api.timeout;
    let mut resp = match tokio::time::timeout(api.timeout, req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Ended::Failed(format!("Kubernetes API: watching {}: {e}", what.path)),
        Err(_) => {
            return Ended::Failed(format!(
                "Kubernetes API: watching {}: no answer within {:?}",
                what.path, api.timeout
            ))
        }
    };
    let status = resp.status();
    if status == reqwest::StatusCode::GONE {
        return Ended::Gone;
    }
    if !status.is_success() {
        let body = tokio::time::timeout(api.timeout, resp.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        return Ended::Failed(format!(
            "Kubernetes API: watching {}: {status}: {}",
            what.path,
            body.chars().take(300).collect::<String>()
        ));
    }
    let mut lines = Lines::new(MAX_LINE_BYTES);
    loop {
        let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => {
                return match lines.finish() {
                    Ok(()) => Ended::Closed,
                    Err(e) => Ended::Failed(e),
                }
            }
            Ok(Err(e)) => {
                return Ended::Failed(format!("Kubernetes API: watching {}: {e}", what.path))
            }
            Err(_) => {
                return Ended::Failed(format!(
                    "Kubernetes API: watching {}: silent for {idle:?}",
                    what.path
                ))
            }
        };
        let got = match lines.push(&chunk) {
            Ok(l) => l,
            Err(e) => return Ended::Failed(format!("Kubernetes API: watching {}: {e}", what.path)),
        };
        for line in got {
            let (event, version) = match parse_event(&line) {
                Ok(e) => e,
                Err(e) => {
                    return Ended::Failed(format!("Kubernetes API: watching {}: {e}", what.path))
                }
            };
            let changed = match event {
                Event::Put { name, object } => {
                    store.insert(name, object);
                    true
                }
                Event::Deleted { name } => store.remove(&name).is_some(),
                Event::Bookmark => false,
                Event::Gone => return Ended::Gone,
                Event::Error(e) => {
                    return Ended::Failed(format!("Kubernetes API: watching {}: {e}", what.path))
                }
            };
            if let Some(v) = version {
                *rv = v;
            }
            if changed {
                *events += 1;
                on(Change::Updated(store));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks_and_an_over_long_one_is_refused() {
        let mut l = Lines::new(8);
        assert_eq!(l.push(b"ab").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(
            l.push(b"c\n\r\nde\r\nf").unwrap(),
            [b"abc".to_vec(), b"de".to_vec()]
        );
        assert_eq!(l.push(b"\n").unwrap(), [b"f".to_vec()]);
        // Exactly the bound is allowed; one more byte is not, complete or not.
        assert_eq!(l.push(b"12345678\n").unwrap(), [b"12345678".to_vec()]);
        assert!(l.push(b"123456789\n").unwrap_err().contains("over 8 bytes"));
        assert!(l.push(b"1234").is_ok());
        assert!(l.push(b"56789").is_err());
        // After an error the reader starts clean.
        assert_eq!(l.push(b"ok\n").unwrap(), [b"ok".to_vec()]);
        assert!(l.finish().is_ok());
        l.push(b"{\"half").unwrap();
        assert!(l.finish().unwrap_err().contains("inside a line"));
    }

    #[test]
    fn watch_events_parse_and_bad_ones_say_why() {
        let (e, rv) = parse_event(
            br#"{"type":"ADDED","object":{"metadata":{"name":"p","resourceVersion":"7"}}}"#,
        )
        .unwrap();
        assert!(matches!(e, Event::Put { ref name, .. } if name == "p"));
        assert_eq!(rv.as_deref(), Some("7"));
        let (e, _) =
            parse_event(br#"{"type":"DELETED","object":{"metadata":{"name":"p"}}}"#).unwrap();
        assert_eq!(e, Event::Deleted { name: "p".into() });
        let (e, rv) = parse_event(
            br#"{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"12"}}}"#,
        )
        .unwrap();
        assert_eq!((e, rv.as_deref()), (Event::Bookmark, Some("12")));
        let (e, _) = parse_event(
            br#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired"}}"#,
        )
        .unwrap();
        assert_eq!(e, Event::Gone);
        let (e, _) = parse_event(
            br#"{"type":"ERROR","object":{"kind":"Status","code":500,"reason":"InternalError","message":"boom"}}"#,
        )
        .unwrap();
        assert!(
            matches!(e, Event::Error(ref m) if m.contains("boom")),
            "{e:?}"
        );
        assert!(parse_event(b"{not json").unwrap_err().contains("not JSON"));
        assert!(parse_event(br#"{"type":"ADDED","object":{}}"#)
            .unwrap_err()
            .contains("without a name"));
        assert!(parse_event(br#"{"type":"RENAMED","object":{}}"#)
            .unwrap_err()
            .contains("RENAMED"));
    }

    #[test]
    fn lists_parse_and_the_urls_carry_the_selectors() {
        let (s, rv) = parse_list(
            br#"{"kind":"PodList","metadata":{"resourceVersion":"9"},"items":[{"metadata":{"name":"a"}},{"metadata":{"name":"b"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            (
                s.keys().map(String::as_str).collect::<Vec<_>>(),
                rv.as_str()
            ),
            (vec!["a", "b"], "9")
        );
        assert!(parse_list(br#"{"kind":"Status","code":403}"#).is_err());
        assert!(
            parse_list(br#"{"items":[{"metadata":{}}],"metadata":{"resourceVersion":"1"}}"#)
                .is_err()
        );
        let c = Collection {
            path: "/api/v1/namespaces/llm/pods".into(),
            label_selector: Some("app=vllm,tier=gpu".into()),
            field_selector: None,
        };
        assert_eq!(
            c.url("http://k:1/", None),
            "http://k:1/api/v1/namespaces/llm/pods?labelSelector=app%3Dvllm%2Ctier%3Dgpu"
        );
        assert_eq!(
            c.url("http://k:1", Some("42")),
            "http://k:1/api/v1/namespaces/llm/pods?labelSelector=app%3Dvllm%2Ctier%3Dgpu&watch=true&resourceVersion=42&allowWatchBookmarks=true&timeoutSeconds=290"
        );
    }
}
