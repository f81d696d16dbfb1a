//! A real Redis (or Valkey) server for the remote KV tier's tests: the distribution's
//! `valkey-server` or `redis-server` on a free loopback port, without persistence, killed on
//! drop. Without either binary the caller skips, except under `CI`, where it fails.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Redis server on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    pub fn start() -> Option<Self> {
        let bin = ["valkey-server", "redis-server"].into_iter().find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok()
        });
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have valkey-server or redis-server (.ci/run installs it)"
            );
            eprintln!("skipping: no valkey-server or redis-server on this machine");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{bin} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child, port })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
