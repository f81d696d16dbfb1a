//! The remote tier: block records in a Redis/Valkey server shared by workers (east/west
//! sharing, as LMCache's remote backend), so a prefix one worker computed is loaded by another.
//!
//! Keys are `llmd:kv:<layout>:<block hash hex>` where `<layout>` digests the model and KV
//! layout identity; values are the checksummed records, so a key from another model, a stale
//! value or a corrupted one is refused by the reader like a bad disk file. Capacity and
//! eviction are the server's (`maxmemory` + `allkeys-lru`).
//!
//! Security (issue 20):
//! - `rediss://` URLs speak TLS (rustls), trusting the Mozilla roots compiled in, or only the
//!   CA of `--kv-remote-tls-ca-file` when one is given. There is no way to turn verification
//!   off (`#insecure` URLs are refused).
//! - The password comes from `--kv-remote-password-file` or `LLMD_KV_REMOTE_PASSWORD` (one in
//!   the URL still works, with a warning); the URL is only ever printed through
//!   [`redact_url`], and a server error that echoes the password is scrubbed.
//! - With a cluster secret, a value is `record || HMAC(secret, "kv-remote-record", key,
//!   record)`: a value whose tag does not verify — planted by anyone who can write to the
//!   server but lacks the secret — is refused like a corrupt record. Without a secret the tier
//!   warns at start that any writer to the server can plant blocks.
//!
//! Failure policy: the server is an accelerator, never a dependency. Every call has a short
//! timeout; after a failure the tier stays down (calls fail at once, without the network) for
//! [`RETRY_AFTER`], then one call tries to reconnect. The caller treats a failure as a miss.
use super::{Storage, Tier, TierError};
use crate::kv::auth::ClusterSecret;
use crate::kv::BlockHash;
use redis::IntoConnectionInfo;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the tier stays down after a failure before it tries the server again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Connect, read and write timeout of every call.
const TIMEOUT: Duration = Duration::from_millis(500);
/// The MAC label of a remote record (see [`ClusterSecret::mac`]).
pub const RECORD_MAC_LABEL: &str = "kv-remote-record";
/// Bytes of the tag after a record.
pub const TAG_LEN: usize = 32;
/// The environment variable a password may come from.
pub const PASSWORD_ENV: &str = "LLMD_KV_REMOTE_PASSWORD";

/// `url` fit to print: the user-info part (`user:password@`) becomes `user:***@` (`***@` when
/// it has no `:`), whether or not the rest parses as a URL. Everything that prints a remote
/// tier's URL (logs, errors) goes through here.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    // The last '@' ends the user info, even one a careless password left unescaped ('@', '/').
    let Some(at) = url[start..].rfind('@').map(|i| start + i) else {
        return url.to_string();
    };
    let info = &url[start..at];
    let masked = match info.find(':') {
        Some(colon) => format!("{}:***", &info[..colon]),
        None => "***".to_string(),
    };
    format!("{}{masked}{}", &url[..start], &url[at..])
}

/// The remote server's password; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RemotePassword(String);

impl fmt::Debug for RemotePassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RemotePassword(..)")
    }
}

impl RemotePassword {
    pub fn new(password: impl Into<String>) -> Result<Self, TierError> {
        let p = password.into();
        if p.is_empty() {
            return Err(TierError::Config(
                "the remote KV tier's password is empty".into(),
            ));
        }
        Ok(Self(p))
    }

    /// The password of `--kv-remote-password-file` (its one line; the line end is not part of
    /// it) when given, else of [`PASSWORD_ENV`] when set, else None.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>, TierError> {
        Self::from_file_or(file, std::env::var(PASSWORD_ENV).ok())
    }

    /// [`Self::from_file_or_env`] with the environment variable's value given.
    pub fn from_file_or(
        file: Option<&Path>,
        env: Option<String>,
    ) -> Result<Option<Self>, TierError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                TierError::Config(format!(
                    "reading --kv-remote-password-file {}: {e}",
                    path.display()
                ))
            })?;
            let p = text.trim_end_matches(['\n', '\r']);
            return Self::new(p)
                .map(Some)
                .map_err(|e| TierError::Config(format!("{}: {e}", path.display())));
        }
        match env {
            Some(p) => Self::new(p)
                .map(Some)
                .map_err(|e| TierError::Config(format!("{PASSWORD_ENV}: {e}"))),
            None => Ok(None),
        }
    }
}

/// How to reach and trust the remote server, beyond its URL.
#[derive(Clone, Debug, Default)]
pub struct RemoteOptions {
    /// Sent with AUTH (over the URL's, when both are given).
    pub password: Option<RemotePassword>,
    /// PEM file of the CA that signed the server's certificate (`rediss://` only); None: the
    /// Mozilla roots.
    pub tls_ca_file: Option<PathBuf>,
    /// The cluster secret that tags and checks every record (None: records are not
    /// authenticated, and the tier warns).
    pub secret: Option<ClusterSecret>,
}

/// What the server holds under one key.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Missing,
    /// The record, its tag checked (when there is a secret) and removed.
    Record(Vec<u8>),
    /// A value whose tag did not verify: not written by a holder of the secret.
    Forged,
}

pub struct RemoteStore {
    /// The URL as it may be printed ([`redact_url`]).
    url: String,
    client: redis::Client,
    conn: Option<redis::Connection>,
    layout: String,
    secret: Option<ClusterSecret>,
    /// Strings never to be printed (the passwords), scrubbed from server errors.
    hidden: Vec<String>,
    down_until: Option<Instant>,
    /// Records this worker put (the server's own count is not ours to know).
    stored: usize,
}

impl RemoteStore {
    /// A client for `url` (`redis://` or `rediss://`, `[user[:password]@]host:port[/db]`)
    /// with the defaults of [`RemoteOptions`] (no password beyond the URL's, the Mozilla roots,
    /// no secret).
    pub fn new(url: &str, identity: &str) -> Result<Self, TierError> {
        Self::open(url, identity, &RemoteOptions::default())
    }

    /// A client for `url` with `opts`; connects lazily, so a server that is not up yet only
    /// means misses until it is. Errors (a bad URL, an unreadable CA) never contain the
    /// password.
    pub fn open(url: &str, identity: &str, opts: &RemoteOptions) -> Result<Self, TierError> {
        let shown = redact_url(url);
        let mut hidden: Vec<String> = opts.password.iter().map(|p| p.0.clone()).collect();
        let bad = |what: String| TierError::Config(format!("--kv-remote-url {shown}: {what}"));
        let mut info = url
            .into_connection_info()
            .map_err(|e| bad(scrub(&e.to_string(), &hidden)))?;
        if let Some(p) = info.redis_settings().password() {
            hidden.push(p.to_string());
            tracing::warn!(
                url = %shown,
                "the remote KV tier's password is in --kv-remote-url, where the process list \
                 and the pod spec show it; prefer --kv-remote-password-file or {PASSWORD_ENV}"
            );
        }
        if let Some(p) = &opts.password {
            let settings = info.redis_settings().clone().set_password(&p.0);
            info = info.set_redis_settings(settings);
        }
        let tls = match info.addr() {
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(bad(
                    "TLS without certificate checks (#insecure) is not supported; give the \
                     server's CA with --kv-remote-tls-ca-file"
                        .into(),
                ))
            }
            redis::ConnectionAddr::TcpTls { .. } => true,
            _ => false,
        };
        let client = match &opts.tls_ca_file {
            Some(ca) => {
                if !tls {
                    return Err(bad(
                        "--kv-remote-tls-ca-file needs a rediss:// URL (TLS)".into()
                    ));
                }
                let pem = std::fs::read(ca).map_err(|e| {
                    bad(format!(
                        "reading --kv-remote-tls-ca-file {}: {e}",
                        ca.display()
                    ))
                })?;
                if !pem
                    .windows(b"-----BEGIN CERTIFICATE-----".len())
                    .any(|w| w == b"-----BEGIN CERTIFICATE-----")
                {
                    return Err(bad(format!(
                        "--kv-remote-tls-ca-file {} holds no PEM certificate",
                        ca.display()
                    )));
                }
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(info, certs)
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| bad(scrub(&e.to_string(), &hidden)))?;
        if opts.secret.is_none() {
            tracing::warn!(
                url = %shown,
                "remote KV tier without a cluster secret (--kv-transfer-secret-file): anyone \
                 who can write to this server can plant KV blocks that this worker will load \
                 as a prompt's"
            );
        }
        Ok(Self {
            url: shown,
            client,
            conn: None,
            layout: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(identity.as_bytes())),
            secret: opts.secret.clone(),
            hidden,
            down_until: None,
            stored: 0,
        })
    }

    /// The key of `hash`'s record.
    pub fn key(&self, hash: &BlockHash) -> String {
        format!("llmd:kv:{}:{}", self.layout, hash.to_hex())
    }

    /// The URL as it may be printed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True while the tier is down after a failure.
    pub fn is_down(&self) -> bool {
        self.down_until.is_some_and(|t| Instant::now() < t)
    }

    fn fail(&mut self, reason: String) -> TierError {
        let reason = scrub(&reason, &self.hidden);
        if !self.is_down() {
            tracing::warn!(url = %self.url, %reason, "remote KV tier unreachable; recomputing instead for {}s", RETRY_AFTER.as_secs());
        }
        self.conn = None;
        self.down_until = Some(Instant::now() + RETRY_AFTER);
        TierError::Remote {
            url: self.url.clone(),
            reason,
        }
    }

    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, TierError> {
        if self.is_down() {
            return Err(TierError::Remote {
                url: self.url.clone(),
                reason: "down (retrying later)".into(),
            });
        }
        if self.conn.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(TIMEOUT)
                .and_then(|c| {
                    c.set_read_timeout(Some(TIMEOUT))?;
                    c.set_write_timeout(Some(TIMEOUT))?;
                    Ok(c)
                });
            match conn {
                Ok(c) => {
                    if self.down_until.take().is_some() {
                        tracing::info!(url = %self.url, "remote KV tier reachable again");
                    }
                    self.conn = Some(c);
                }
                Err(e) => return Err(self.fail(e.to_string())),
            }
        }
        let conn = self.conn.as_mut().expect("connected above");
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.fail(e.to_string())),
        }
    }

    /// What is stored under `key` for `record`: the record, then its tag when there is a
    /// secret.
    fn seal(&self, key: &str, mut record: Vec<u8>) -> Vec<u8> {
        if let Some(s) = &self.secret {
            let tag = s.mac(RECORD_MAC_LABEL, &[key.as_bytes(), &record]);
            record.extend_from_slice(&tag);
        }
        record
    }

    /// The record in the value stored under `key`, its tag checked and removed.
    fn unseal(&self, key: &str, value: Option<Vec<u8>>) -> Fetched {
        let Some(mut value) = value else {
            return Fetched::Missing;
        };
        let Some(s) = &self.secret else {
            return Fetched::Record(value);
        };
        if value.len() < TAG_LEN {
            return Fetched::Forged;
        }
        let tag = value.split_off(value.len() - TAG_LEN);
        if s.verify(RECORD_MAC_LABEL, &[key.as_bytes(), &value], &tag) {
            Fetched::Record(value)
        } else {
            Fetched::Forged
        }
    }

    /// What the server holds for `hashes`, in order, tags checked.
    pub fn get_many(&mut self, hashes: &[BlockHash]) -> Result<Vec<Fetched>, TierError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = hashes.iter().map(|h| self.key(h)).collect();
        let values: Vec<Option<Vec<u8>>> =
            self.with_conn(|c| redis::cmd("MGET").arg(&keys).query(c))?;
        Ok(keys
            .iter()
            .zip(values)
            .map(|(k, v)| self.unseal(k, v))
            .collect())
    }
}

/// `text` with every one of `hidden` (non-empty) replaced by `***`.
fn scrub(text: &str, hidden: &[String]) -> String {
    hidden
        .iter()
        .filter(|h| !h.is_empty())
        .fold(text.to_string(), |t, h| t.replace(h.as_str(), "***"))
}

impl Storage for RemoteStore {
    fn tier(&self) -> Tier {
        Tier::Remote
    }

    fn put(
        &mut self,
        hash: BlockHash,
        record: Vec<u8>,
    ) -> Result<Vec<(BlockHash, Vec<u8>)>, TierError> {
        let key = self.key(&hash);
        let value = self.seal(&key, record);
        self.with_conn(|c| redis::cmd("SET").arg(&key).arg(&value).query::<()>(c))?;
        self.stored += 1;
        Ok(Vec::new())
    }

    /// The record (a forged one reads as none).
    fn get(&mut self, hash: &BlockHash) -> Result<Option<Vec<u8>>, TierError> {
        let key = self.key(hash);
        let value = self.with_conn(|c| redis::cmd("GET").arg(&key).query(c))?;
        Ok(match self.unseal(&key, value) {
            Fetched::Record(r) => Some(r),
            Fetched::Missing | Fetched::Forged => None,
        })
    }

    fn remove(&mut self, hash: &BlockHash) {
        let key = self.key(hash);
        let _ = self.with_conn(|c| redis::cmd("DEL").arg(&key).query::<()>(c));
    }

    fn len(&self) -> usize {
        self.stored
    }

    fn capacity(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_server_is_a_fast_miss_not_a_hang() {
        // Nothing listens on port 1.
        let mut s = RemoteStore::new("redis://127.0.0.1:1", "id").unwrap();
        assert!(s.get(&BlockHash([1; 32])).is_err());
        assert!(s.is_down());
        let t = Instant::now();
        assert!(s.put(BlockHash([1; 32]), vec![1]).is_err());
        assert!(t.elapsed() < Duration::from_millis(50), "down: no network");
        assert!(RemoteStore::new("not a url", "id").is_err());
    }

    #[test]
    fn urls_are_printed_without_their_password() {
        for (url, want) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "rediss://user:pw@host:6380/2",
                "rediss://user:***@host:6380/2",
            ),
            ("redis://:pw@host", "redis://:***@host"),
            ("redis://pw@host", "redis://***@host"),
            // Unescaped '@' and '/' in a password, and no URL at all.
            ("redis://u:p@w/x@host:1", "redis://u:***@host:1"),
            ("u:pw@host:1", "u:***@host:1"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn errors_never_carry_the_password() {
        let pw = "hunter2-very-secret";
        // A port out of range, a database that is not a number, an insecure TLS URL: each an
        // error at start, each naming the URL without its password.
        for url in [
            format!("redis://user:{pw}@127.0.0.1:99999999"),
            format!("redis://user:{pw}@127.0.0.1:6379/notadb"),
            format!("rediss://user:{pw}@127.0.0.1:6379/#insecure"),
            format!("http://user:{pw}@127.0.0.1:6379"),
        ] {
            let e = RemoteStore::new(&url, "id").err().expect(&url).to_string();
            assert!(!e.contains(pw), "{e}");
            assert!(e.contains("user:***@"), "{e}");
        }
        // A connection failure names the URL the same way.
        let mut s = RemoteStore::new(&format!("redis://user:{pw}@127.0.0.1:1"), "id").unwrap();
        let e = s.get(&BlockHash([1; 32])).unwrap_err().to_string();
        assert!(!e.contains(pw) && e.contains("user:***@"), "{e}");
        // A password from a file: never in Debug output.
        let o = RemoteOptions {
            password: Some(RemotePassword::new(pw).unwrap()),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains(pw));
    }

    #[test]
    fn the_password_file_wins_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from file\n").unwrap();
        let env = || Some("from env".to_string());
        let p = |file, env| RemotePassword::from_file_or(file, env).unwrap();
        assert_eq!(
            p(Some(f.as_path()), env()),
            Some(RemotePassword::new("from file").unwrap())
        );
        assert_eq!(
            p(None, env()),
            Some(RemotePassword::new("from env").unwrap())
        );
        assert_eq!(p(None, None), None);
        std::fs::write(&f, "\n").unwrap();
        let e = RemotePassword::from_file_or(Some(&f), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = RemotePassword::from_file_or(Some(&dir.path().join("none")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--kv-remote-password-file"), "{e}");
    }

    #[test]
    fn a_ca_file_needs_tls_and_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let opts = |p: &Path| RemoteOptions {
            tls_ca_file: Some(p.to_path_buf()),
            ..Default::default()
        };
        let e = RemoteStore::open("redis://127.0.0.1:1", "id", &opts(&junk))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rediss://"), "{e}");
        let e = RemoteStore::open("rediss://127.0.0.1:1", "id", &opts(&junk))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = RemoteStore::open(
            "rediss://127.0.0.1:1",
            "id",
            &opts(&dir.path().join("none")),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("reading --kv-remote-tls-ca-file"), "{e}");
    }

    #[test]
    fn a_tag_binds_the_record_to_its_key_and_the_secret() {
        let secret = ClusterSecret::new(b"0123456789abcdef0123").unwrap();
        let with = |s: Option<ClusterSecret>| {
            RemoteStore::open(
                "redis://127.0.0.1:1",
                "id",
                &RemoteOptions {
                    secret: s,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let s = with(Some(secret));
        let other = with(Some(ClusterSecret::new(b"another secret of 20b").unwrap()));
        let none = with(None);
        let sealed = s.seal("k1", b"record".to_vec());
        assert_eq!(sealed.len(), 6 + TAG_LEN);
        assert_eq!(
            s.unseal("k1", Some(sealed.clone())),
            Fetched::Record(b"record".to_vec())
        );
        assert_eq!(s.unseal("k2", Some(sealed.clone())), Fetched::Forged);
        assert_eq!(other.unseal("k1", Some(sealed.clone())), Fetched::Forged);
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(s.unseal("k1", Some(flipped)), Fetched::Forged);
        assert_eq!(s.unseal("k1", Some(b"short".to_vec())), Fetched::Forged);
        assert_eq!(s.unseal("k1", None), Fetched::Missing);
        // Without a secret values are records as they are.
        assert_eq!(none.seal("k1", b"r".to_vec()), b"r".to_vec());
    }
}
