//! A running `llmd` subcommand (`serve`, `route`, `sidecar`) on a free port, killed on drop.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct LlmdProcess {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl LlmdProcess {
    /// Runs `llmd <args>` (which must listen on port 0 and log its `addr=`), then waits until
    /// `health_path` answers 200. `tag` prefixes its log lines.
    pub async fn start(tag: &str, args: &[String], health_path: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmd"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning llmd");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let tag = tag.to_string();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                if let Some(i) = line.find("addr=") {
                    let addr: String = line[i + 5..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("llmd logged no listening address");
        let p = Self {
            child,
            base: format!("http://{addr}"),
        };
        if !health_path.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Ok(r) = reqwest::get(p.url(health_path)).await {
                    if r.status() == 200 {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "{health_path} not 200 in time");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        p
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
