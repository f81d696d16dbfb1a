//! Demand per priority band as the router sees it: requests, their prompt and output tokens,
//! and the time to their first token — what an autoscaler needs to size the fleet per band
//! (`llmd autoscale`, [`crate::autoscale::scrape`]).
//!
//! Served under the names of the Gateway API Inference Extension's endpoint picker
//! (`inference_objective_request_total`, `inference_objective_input_tokens`,
//! `inference_objective_output_tokens`), labelled by `priority` (the band of the request's
//! `InferenceObjective`) where the EPP labels by model name, plus
//! `llmd_router:band_ttft_seconds` and `llmd_router:band_itl_seconds`. Prompt tokens are the router's own count (it tokenizes
//! every prompt); output tokens come from the worker's answer: its `usage.completion_tokens`
//! when it has one (a JSON answer; a stream asked with `include_usage`), otherwise the streamed
//! events that carry text. The time to first token is measured on streamed answers only (from
//! the request's arrival at the router — queueing included — to the first event with text); a
//! JSON answer shows no first token. The inter-token latency is each gap between two streamed
//! events with text (an event holding several tokens counts as one gap, as the client sees
//! it). The proxy mode sees the answer as it streams; in EPP mode the router sees what the
//! gateway sends it of the response body (ext_proc's streamed response body mode: all of it);
//! a gateway that sends no response body gives requests and prompt tokens only.
use crate::server::metrics::{Histogram, TPOT_BUCKETS, TTFT_BUCKETS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Token-count buckets (1-2-5 steps up to 128k).
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0, 131072.0,
];

/// Largest non-streamed answer kept to read its usage.
const MAX_JSON: usize = 4 << 20;
/// Longest SSE line kept while waiting for its end.
const MAX_LINE: usize = 1 << 20;

struct Band {
    requests: u64,
    input: Histogram,
    output: Histogram,
    ttft: Histogram,
    itl: Histogram,
}

impl Default for Band {
    fn default() -> Self {
        Self {
            requests: 0,
            input: Histogram::new(TOKEN_BUCKETS),
            output: Histogram::new(TOKEN_BUCKETS),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(TPOT_BUCKETS),
        }
    }
}

/// The per-band counters of one router.
#[derive(Default)]
pub struct BandStats {
    bands: Mutex<BTreeMap<i32, Band>>,
}

impl BandStats {
    fn with(&self, priority: i32, f: impl FnOnce(&mut Band)) {
        f(self
            .bands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(priority)
            .or_default())
    }

    /// A generation request of `priority` arrived with a prompt of `prompt_tokens`.
    pub fn arrived(&self, priority: i32, prompt_tokens: usize) {
        self.with(priority, |b| {
            b.requests += 1;
            b.input.observe(prompt_tokens as f64);
        })
    }

    /// Watches an answer's body (call [`ResponseWatch::chunk`] with each piece) for its first
    /// token and its output tokens, recorded when the watch drops.
    pub fn watch(self: &Arc<Self>, priority: i32, arrived: Instant, sse: bool) -> ResponseWatch {
        ResponseWatch {
            stats: self.clone(),
            priority,
            arrived,
            sse,
            buf: Vec::new(),
            usage: None,
            events: 0,
            last: None,
        }
    }

    pub fn write_metrics(&self, out: &mut String) {
        let g = self.bands.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP inference_objective_request_total Generation requests that reached the router, by priority band (shed ones included).\n# TYPE inference_objective_request_total counter");
        for (p, b) in g.iter() {
            let _ = writeln!(
                out,
                "inference_objective_request_total{{priority=\"{p}\"}} {}",
                b.requests
            );
        }
        type Pick = fn(&Band) -> &Histogram;
        let families: [(&str, &str, Pick); 4] = [
            ("inference_objective_input_tokens", "Prompt tokens of the generation requests that reached the router (its own tokenization), by priority band.", |b| &b.input),
            ("inference_objective_output_tokens", "Output tokens of the answered generation requests (the worker's usage, or its streamed events with text), by priority band.", |b| &b.output),
            ("llmd_router:band_ttft_seconds", "Time from a streamed request's arrival at the router (queueing included) to its first event with text, by priority band.", |b| &b.ttft),
            ("llmd_router:band_itl_seconds", "Time between two events with text of a streamed answer, as the router sees them, by priority band.", |b| &b.itl),
        ];
        for (name, help, pick) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (p, b) in g.iter() {
                pick(b).render_series(out, name, &format!("priority=\"{p}\""));
            }
        }
    }
}

/// One answer being streamed back: see [`BandStats::watch`].
pub struct ResponseWatch {
    stats: Arc<BandStats>,
    priority: i32,
    arrived: Instant,
    /// A server-sent event stream (else one JSON body).
    sse: bool,
    /// SSE: the line not yet ended; JSON: the body so far (up to [`MAX_JSON`]).
    buf: Vec<u8>,
    usage: Option<u64>,
    /// SSE events with text.
    events: u64,
    /// When the last event with text came.
    last: Option<Instant>,
}

impl ResponseWatch {
    pub fn chunk(&mut self, bytes: &[u8]) {
        if !self.sse {
            if self.buf.len() + bytes.len() <= MAX_JSON {
                self.buf.extend_from_slice(bytes);
            }
            return;
        }
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let line = if self.buf.is_empty() {
                &rest[..i]
            } else {
                self.buf.extend_from_slice(&rest[..i]);
                &self.buf[..]
            };
            let (text, usage) = sse_line(line);
            self.buf.clear();
            if text {
                self.events += 1;
                let now = Instant::now();
                let since = (now - self.last.unwrap_or(self.arrived)).as_secs_f64();
                let first = self.last.is_none();
                self.stats.with(self.priority, |b| {
                    if first { &mut b.ttft } else { &mut b.itl }.observe(since)
                });
                self.last = Some(now);
            }
            if usage.is_some() {
                self.usage = usage;
            }
            rest = &rest[i + 1..];
        }
        if self.buf.len() + rest.len() <= MAX_LINE {
            self.buf.extend_from_slice(rest);
        }
    }
}

/// An SSE line: whether it is an event with text, and the usage's completion tokens it has.
fn sse_line(line: &[u8]) -> (bool, Option<u64>) {
    let Some(data) = line.strip_prefix(b"data:") else {
        return (false, None);
    };
    let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
        return (false, None);
    };
    let text = v["choices"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            [&c["text"], &c["delta"]["content"]]
                .iter()
                .any(|t| t.as_str().is_some_and(|t| !t.is_empty()))
        })
    });
    (text, v["usage"]["completion_tokens"].as_u64())
}

impl Drop for ResponseWatch {
    fn drop(&mut self) {
        let tokens = if self.sse {
            self.usage.unwrap_or(self.events)
        } else {
            match serde_json::from_slice::<Value>(&self.buf) {
                Ok(v) => v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
                // Cut short (the client left) or not JSON: nothing known.
                Err(_) => return,
            }
        };
        self.stats
            .with(self.priority, |b| b.output.observe(tokens as f64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &BandStats) -> String {
        let mut out = String::new();
        s.write_metrics(&mut out);
        out
    }

    #[test]
    fn bands_count_requests_prompt_and_output_tokens_and_first_tokens() {
        let s = Arc::new(BandStats::default());
        s.arrived(10, 7);
        s.arrived(10, 3);
        s.arrived(-1, 100);
        // A stream split mid-line, with a role-only first event and a usage chunk.
        let mut w = s.watch(10, Instant::now(), true);
        w.chunk(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"choices\":[{\"del");
        w.chunk(b"ta\":{\"content\":\"Once\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" upon\"}}]}\n\n");
        drop(w);
        let mut u = s.watch(10, Instant::now(), true);
        u.chunk(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"completion_tokens\":9}}\n\ndata: [DONE]\n\n");
        drop(u);
        // A JSON answer: its usage, no first token.
        let mut j = s.watch(-1, Instant::now(), false);
        j.chunk(b"{\"choices\":[{\"text\":\"x\"}],\"usage\":{\"prompt_tokens\":100,");
        j.chunk(b"\"completion_tokens\":4}}");
        drop(j);
        let t = text(&s);
        let got = crate::prometheus::parse(&t).unwrap();
        let v = |name: &str, p: &str| {
            got.iter()
                .find(|s| s.name == name && s.label("priority") == Some(p))
                .map(|s| s.value)
        };
        assert_eq!(v("inference_objective_request_total", "10"), Some(2.0));
        assert_eq!(v("inference_objective_request_total", "-1"), Some(1.0));
        assert_eq!(v("inference_objective_input_tokens_sum", "10"), Some(10.0));
        assert_eq!(v("inference_objective_input_tokens_count", "-1"), Some(1.0));
        // 2 events with text, then the usage's 9.
        assert_eq!(v("inference_objective_output_tokens_sum", "10"), Some(11.0));
        assert_eq!(v("inference_objective_output_tokens_sum", "-1"), Some(4.0));
        assert_eq!(v("llmd_router:band_ttft_seconds_count", "10"), Some(2.0));
        assert_eq!(v("llmd_router:band_ttft_seconds_count", "-1"), Some(0.0));
        // One gap between the two events with text of the first stream, none in the others.
        assert_eq!(v("llmd_router:band_itl_seconds_count", "10"), Some(1.0));
        assert_eq!(v("llmd_router:band_itl_seconds_count", "-1"), Some(0.0));
        // Each gap is timed: events 30 ms apart.
        let mut g = s.watch(2, Instant::now(), true);
        g.chunk(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n");
        std::thread::sleep(std::time::Duration::from_millis(30));
        g.chunk(b"data: {\"choices\":[{\"text\":\"b\"}]}\n\n");
        drop(g);
        let got = crate::prometheus::parse(&text(&s)).unwrap();
        let gap = got
            .iter()
            .find(|s| {
                s.name == "llmd_router:band_itl_seconds_sum" && s.label("priority") == Some("2")
            })
            .map(|s| s.value)
            .unwrap();
        assert!((0.03..1.0).contains(&gap), "{gap}");
        assert_eq!(
            t.matches("# TYPE inference_objective_output_tokens histogram")
                .count(),
            1
        );
    }
}
