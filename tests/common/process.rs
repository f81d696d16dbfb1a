//! A running `llmd` subcommand (`serve`, `route`, `sidecar`) on a free port, killed on drop.
//! Also compiled into the benches (`#[path]`), which use a subset.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct LlmdProcess {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

/// Where a process's log lines go.
pub enum Echo {
    /// Every line, prefixed with `[tag]`.
    Tagged(String),
    /// Only lines with `ERROR` (benchmarks: quiet unless something breaks).
    Errors,
    Silent,
}

impl LlmdProcess {
    /// Runs `llmd <args>` (which must listen on port 0 and log its `addr=`) with
    /// `RUST_LOG=rust_log`, and returns once it has logged the address (at most `timeout`).
    pub fn spawn(args: &[String], rust_log: &str, echo: Echo, timeout: Duration) -> Self {
        Self::spawn_env(args, &[], rust_log, echo, timeout)
    }

    /// [`Self::spawn`] with `env` set (a value of None removes the variable).
    pub fn spawn_env(
        args: &[String],
        env: &[(&str, Option<&str>)],
        rust_log: &str,
        echo: Echo,
        timeout: Duration,
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmd"));
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning llmd");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        // Keeps draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match &echo {
                    Echo::Tagged(tag) => eprintln!("[{tag}] {line}"),
                    Echo::Errors if line.contains("ERROR") => eprintln!("{line}"),
                    _ => {}
                }
                if let Some(addr) = llmd::server::logged_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(timeout)
            .expect("llmd logged no listening address");
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// Runs `llmd <args>` (see [`Self::spawn`]), echoing its log with `tag`, then waits until
    /// `health_path` answers 200 (not at all when it is empty).
    pub async fn start(tag: &str, args: &[String], health_path: &str) -> Self {
        Self::start_env(tag, args, &[], health_path).await
    }

    /// [`Self::start`] with `env` set (see [`Self::spawn_env`]).
    pub async fn start_env(
        tag: &str,
        args: &[String],
        env: &[(&str, Option<&str>)],
        health_path: &str,
    ) -> Self {
        let p = Self::spawn_env(
            args,
            env,
            "info",
            Echo::Tagged(tag.to_string()),
            Duration::from_secs(60),
        );
        if !health_path.is_empty() {
            p.wait_healthy(health_path, Duration::from_secs(120)).await;
        }
        p
    }

    /// Waits until `path` answers 200; panics after `timeout`.
    pub async fn wait_healthy(&self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = reqwest::get(self.url(path)).await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{path} not 200 in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port`.
    pub fn host_port(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Polls `/metrics` until `done` holds for its text, and returns that text; panics with
    /// `what` and the last text after 20 s.
    pub async fn metrics_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.metrics().await;
            if done(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "{what}:\n{m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlmdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The sum of the samples of `name` whose labels contain `label` ("" for all); 0 when none.
pub fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name).is_some_and(|rest| {
                (rest.starts_with('{') || rest.starts_with(' ')) && rest.contains(label)
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny real model the process tests serve (`../shared/models/stories260K`).
pub fn stories() -> String {
    format!(
        "{}/../shared/models/stories260K",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A command line's arguments as owned strings.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
