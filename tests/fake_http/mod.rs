//! A fake HTTP peer on loopback for the router's and sidecar's tests: it records every request
//! (method, path, headers, body) and answers with a function of the request.
#![allow(dead_code)]
use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::Value;
use std::sync::{Arc, Mutex};

pub mod kube;

/// One request the fake peer got.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The query string, undecoded (empty without one).
    pub query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Seen {
    /// The body as JSON (Null when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A running fake peer.
pub struct Fake {
    /// `127.0.0.1:PORT`.
    pub host_port: String,
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    /// Serves on a free loopback port, answering each request with `answer`.
    pub async fn start(answer: impl Fn(&Seen) -> Response + Send + Sync + 'static) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let answer = Arc::new(answer);
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let (log, answer) = (log.clone(), answer.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 64 << 20)
                    .await
                    .unwrap_or_default()
                    .to_vec();
                let s = Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or("").to_string(),
                    headers: parts.headers,
                    body,
                };
                let r = answer(&s);
                log.lock().unwrap().push(s);
                r
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            axum::serve(l, app).await.unwrap();
        });
        Self {
            host_port: format!("127.0.0.1:{port}"),
            port,
            seen,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host_port)
    }

    /// The requests so far to paths other than /health and /metrics (the probes).
    pub fn requests(&self) -> Vec<Seen> {
        self.all()
            .into_iter()
            .filter(|s| s.path != "/health" && s.path != "/metrics")
            .collect()
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A JSON answer with status 200.
pub fn json(v: Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A worker-like answer: 200 `{}` for the probes, a completion for anything else.
pub fn worker(s: &Seen) -> Response {
    if s.path == "/metrics" {
        return Response::new(Body::from(""));
    }
    json(serde_json::json!({"object": "text_completion",
        "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}))
}
