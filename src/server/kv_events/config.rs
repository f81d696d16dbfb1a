//! vLLM's `KVEventsConfig` (`vllm/config/kv_events.py`): the `--kv-events-config` JSON, with
//! vLLM's field names and defaults. Invariant: a parsed config has a resolved publisher (vLLM's
//! `__post_init__`) and a bounded queue.
use serde::Deserialize;

/// The `publisher` field of the config: vLLM's `EventPublisherFactory` registry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publisher {
    /// Events are not published.
    Null,
    /// Events are published over ZeroMQ.
    Zmq,
}

/// vLLM's `KVEventsConfig` (`vllm/config/kv_events.py`), as given to `--kv-events-config`: the
/// same field names and defaults; unknown fields are refused.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawKvEventsConfig")]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    /// vLLM's default: `"zmq"` when events are enabled, `"null"` otherwise.
    pub publisher: Publisher,
    /// The PUB socket. Bound when it has `*` or `::` in it (`tcp://*:5557`), connected to any
    /// other host (`tcp://router:5557`), as vLLM does (see [`super::pub_target`]).
    pub endpoint: String,
    /// The ROUTER socket serving replays, always bound; `None` disables replay.
    pub replay_endpoint: Option<String>,
    /// How many of the latest batches are kept for replay.
    pub buffer_steps: usize,
    /// vLLM's PUB high-water mark. The pure-Rust ZeroMQ used here fixes it at 100,000 messages
    /// per subscriber (vLLM's default) and drops past it, so other values are only logged.
    pub hwm: usize,
    /// How many batches may wait for the publisher thread before new ones are dropped.
    pub max_queue_size: usize,
    /// The first frame of every message; subscribers filter on its prefix.
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: Publisher::Null,
            endpoint: "tcp://*:5557".to_string(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

/// The JSON as written, before vLLM's `__post_init__` resolves the publisher.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKvEventsConfig {
    #[serde(default)]
    enable_kv_cache_events: bool,
    #[serde(default)]
    publisher: Option<Publisher>,
    #[serde(default = "default_endpoint")]
    endpoint: String,
    #[serde(default)]
    replay_endpoint: Option<String>,
    #[serde(default = "default_buffer_steps")]
    buffer_steps: usize,
    #[serde(default = "default_hwm")]
    hwm: usize,
    #[serde(default = "default_max_queue_size")]
    max_queue_size: usize,
    #[serde(default)]
    topic: String,
}

fn default_endpoint() -> String {
    KvEventsConfig::default().endpoint
}
fn default_buffer_steps() -> usize {
    KvEventsConfig::default().buffer_steps
}
fn default_hwm() -> usize {
    KvEventsConfig::default().hwm
}
fn default_max_queue_size() -> usize {
    KvEventsConfig::default().max_queue_size
}

impl TryFrom<RawKvEventsConfig> for KvEventsConfig {
    type Error = String;

    fn try_from(raw: RawKvEventsConfig) -> Result<Self, String> {
        // vLLM's Python queue takes 0 as "unbounded"; an unbounded queue would let a stalled
        // publisher thread grow the engine's memory without limit, so it is refused here.
        if raw.max_queue_size == 0 {
            return Err("max_queue_size must be at least 1".to_string());
        }
        let publisher = raw.publisher.unwrap_or(if raw.enable_kv_cache_events {
            Publisher::Zmq
        } else {
            Publisher::Null
        });
        Ok(Self {
            enable_kv_cache_events: raw.enable_kv_cache_events,
            publisher,
            endpoint: raw.endpoint,
            replay_endpoint: raw.replay_endpoint,
            buffer_steps: raw.buffer_steps,
            hwm: raw.hwm,
            max_queue_size: raw.max_queue_size,
            topic: raw.topic,
        })
    }
}

impl KvEventsConfig {
    /// Parses `--kv-events-config` JSON; the error names the offending field.
    pub fn parse(json: &str) -> Result<KvEventsConfig, String> {
        // A JSON object, as vLLM's KVEventsConfig: serde would also take its fields as an array.
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("invalid --kv-events-config: {e}"))?;
        if !v.is_object() {
            return Err("invalid --kv-events-config: expected a JSON object".into());
        }
        serde_json::from_value(v).map_err(|e| format!("invalid --kv-events-config: {e}"))
    }

    /// Whether events are published at all: vLLM's factory gives the null publisher unless
    /// events are enabled and the publisher is not `"null"`.
    pub fn publishes(&self) -> bool {
        self.enable_kv_cache_events && self.publisher == Publisher::Zmq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_vllms() {
        assert!(KvEventsConfig::parse("[]")
            .unwrap_err()
            .contains("JSON object"));
        let cfg = KvEventsConfig::parse("{}").unwrap();
        assert_eq!(cfg, KvEventsConfig::default());
        assert!(!cfg.enable_kv_cache_events);
        assert_eq!(cfg.publisher, Publisher::Null);
        assert_eq!(cfg.endpoint, "tcp://*:5557");
        assert_eq!(cfg.replay_endpoint, None);
        assert_eq!(cfg.buffer_steps, 10_000);
        assert_eq!(cfg.hwm, 100_000);
        assert_eq!(cfg.max_queue_size, 100_000);
        assert_eq!(cfg.topic, "");
        assert!(!cfg.publishes());
    }

    #[test]
    fn publisher_defaults_to_zmq_when_events_are_enabled() {
        let cfg = KvEventsConfig::parse(r#"{"enable_kv_cache_events": true}"#).unwrap();
        assert_eq!(cfg.publisher, Publisher::Zmq);
        assert!(cfg.publishes());
        let cfg = KvEventsConfig::parse(r#"{"enable_kv_cache_events": true, "publisher": "null"}"#)
            .unwrap();
        assert_eq!(cfg.publisher, Publisher::Null);
        assert!(!cfg.publishes());
        let cfg = KvEventsConfig::parse(r#"{"publisher": "zmq"}"#).unwrap();
        assert!(!cfg.publishes(), "publishing needs enable_kv_cache_events");
    }

    #[test]
    fn config_parses_vllm_examples() {
        // As in vLLM's docs and llm-d's precise prefix-cache guide.
        let cfg = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5556",
                "replay_endpoint":"tcp://*:5557","buffer_steps":2000,"hwm":50000,
                "max_queue_size":500,"topic":"kv@10.0.0.7@Qwen/Qwen3-8B"}"#,
        )
        .unwrap();
        assert_eq!(
            cfg,
            KvEventsConfig {
                enable_kv_cache_events: true,
                publisher: Publisher::Zmq,
                endpoint: "tcp://*:5556".to_string(),
                replay_endpoint: Some("tcp://*:5557".to_string()),
                buffer_steps: 2000,
                hwm: 50_000,
                max_queue_size: 500,
                topic: "kv@10.0.0.7@Qwen/Qwen3-8B".to_string(),
            }
        );
        let cfg = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events": true, "replay_endpoint": null, "topic": "kv-events"}"#,
        )
        .unwrap();
        assert_eq!(cfg.topic, "kv-events");
        assert_eq!(cfg.replay_endpoint, None);
    }

    #[test]
    fn config_errors_name_the_field() {
        let e =
            KvEventsConfig::parse(r#"{"enable_kv_cache_events": true, "topik": "x"}"#).unwrap_err();
        assert!(e.contains("unknown field `topik`"), "{e}");
        let e = KvEventsConfig::parse(r#"{"publisher": "kafka"}"#).unwrap_err();
        assert!(e.contains("kafka"), "{e}");
        let e = KvEventsConfig::parse(r#"{"buffer_steps": -1}"#).unwrap_err();
        assert!(e.contains("-1"), "{e}");
        let e = KvEventsConfig::parse(r#"{"max_queue_size": 0}"#).unwrap_err();
        assert!(e.contains("max_queue_size"), "{e}");
        let e = KvEventsConfig::parse("not json").unwrap_err();
        assert!(e.starts_with("invalid --kv-events-config"), "{e}");
    }
}
