//! A real Redis (or Valkey) server for the remote KV tier's tests: the distribution's
//! `valkey-server` or `redis-server` on a free loopback port, without persistence, killed on
//! drop; optionally with a password (`requirepass`) and TLS only (`--tls-port`, the plain port
//! closed). Without either binary the caller skips, except under `CI`, where it fails.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Redis server on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    tls: bool,
    password: Option<String>,
}

/// How [`RedisServer::start_with`] configures the server.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `requirepass`: AUTH with this password before any command.
    pub password: Option<String>,
    /// Serve TLS only, with this certificate chain and key (PEM files); clients are not asked
    /// for certificates.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl RedisServer {
    pub fn start() -> Option<Self> {
        Self::start_with(&RedisOptions::default())
    }

    pub fn start_with(opts: &RedisOptions) -> Option<Self> {
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
        let mut cmd = Command::new(bin);
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        match &opts.tls {
            Some((cert, key)) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
        }
        if let Some(p) = &opts.password {
            cmd.args(["--requirepass", p]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut out = String::new();
                use std::io::Read;
                let _ = child.stdout.take().unwrap().read_to_string(&mut out);
                panic!("{bin} exited ({status}) with {opts:?}:\n{out}");
            }
            assert!(Instant::now() < deadline, "{bin} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The log is not read from here on; a pipe nobody drains could block the server.
        drop(child.stdout.take());
        drop(child.stderr.take());
        Some(Self {
            child,
            port,
            tls: opts.tls.is_some(),
            password: opts.password.clone(),
        })
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for a TLS server (no password in it).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A plain-TCP client connection (AUTH done when the server has a password).
    pub fn client(&self) -> ::redis::Connection {
        assert!(!self.tls, "the test client speaks plain TCP");
        let mut url = format!("redis://127.0.0.1:{}", self.port);
        if let Some(p) = &self.password {
            url = format!("redis://:{p}@127.0.0.1:{}", self.port);
        }
        ::redis::Client::open(url)
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
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
