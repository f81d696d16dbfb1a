//! Who may move KV: the cluster secret shared by the workers, sidecars and routers of one
//! deployment, and the unguessable tokens that name one transfer.
//!
//! - [`ClusterSecret`] (`--kv-transfer-secret-file`) is never sent anywhere. Everything that
//!   crosses the network is an HMAC-SHA256 under it, with a label per use, so a value taken
//!   from one use is worthless in another:
//!   - the **trusted-hop header** ([`TRUSTED_HOP_HEADER`]) that a sidecar or router puts on the
//!     requests it forwards, so that a worker believes their `kv_transfer_params`;
//!   - the **side-channel handshake** ([`Handshake`]): both ends of a KV pull prove they hold
//!     the secret over fresh nonces, so neither a stranger's pull nor a forged producer gets
//!     through;
//!   - the **MAC of a record** in a shared tier (Redis), so that a writer to Redis who lacks
//!     the secret cannot plant blocks.
//! - [`TransferToken`]: 128 random bits a producer issues per held request, returned in its
//!   `kv_transfer_params`; a pull of that request's KV must present it.
use hmac::{KeyInit, Mac};
use std::fmt;
use std::path::Path;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The header a trusted hop (llmd's sidecar or router) sets on what it forwards to a worker:
/// the hex HMAC of the label `trusted-hop` under the cluster secret.
pub const TRUSTED_HOP_HEADER: &str = "x-llmd-trusted-hop";

/// Shortest secret accepted (bytes): 128 bits of a random key, hex or base64 encoded at least.
pub const MIN_SECRET_LEN: usize = 16;

/// The deployment's shared secret (the file's bytes, surrounding whitespace trimmed).
#[derive(Clone)]
pub struct ClusterSecret {
    key: Vec<u8>,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// The secret in `bytes`; an error when it is shorter than [`MIN_SECRET_LEN`] once trimmed.
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        let key = bytes.trim_ascii().to_vec();
        if key.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the cluster secret has {} bytes; at least {MIN_SECRET_LEN} are needed \
                 (e.g. `openssl rand -hex 32`)",
                key.len()
            ));
        }
        Ok(Self { key })
    }

    /// Reads the secret from `path` (a Kubernetes Secret mounted as a file).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("reading the cluster secret {}: {e}", path.display()))?;
        Self::new(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn hmac(&self, label: &str, parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(&(label.len() as u32).to_le_bytes());
        m.update(label.as_bytes());
        for p in parts {
            // Lengths first: ("ab", "c") and ("a", "bc") differ.
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// The MAC of `parts` under the secret, for the use named by `label`.
    pub fn mac(&self, label: &str, parts: &[&[u8]]) -> [u8; 32] {
        self.hmac(label, parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `parts` for `label` (in constant time).
    pub fn verify(&self, label: &str, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.hmac(label, parts).verify_slice(tag).is_ok()
    }

    /// The value of [`TRUSTED_HOP_HEADER`].
    pub fn hop_token(&self) -> String {
        hex(&self.mac("trusted-hop", &[]))
    }

    /// Whether a request's [`TRUSTED_HOP_HEADER`] value proves a trusted hop.
    pub fn is_trusted_hop(&self, header: &str) -> bool {
        decode_hex(header).is_some_and(|tag| self.verify("trusted-hop", &[], &tag))
    }
}

/// 128 random bits naming one transfer (hex on the wire and in `kv_transfer_params`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TransferToken(pub [u8; 16]);

impl fmt::Debug for TransferToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never logged whole: it is a capability.
        write!(f, "TransferToken({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl TransferToken {
    /// A fresh token from the operating system's random source.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the operating system's random source");
        Self(b)
    }

    pub fn to_hex(self) -> String {
        hex(&self.0)
    }

    /// The token written by [`Self::to_hex`]; None for anything else.
    pub fn from_hex(s: &str) -> Option<Self> {
        let b = decode_hex(s)?;
        Some(Self(b.try_into().ok()?))
    }

    /// Whether `other` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, other: &TransferToken) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of an even-length hex string; None for anything else.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 1024 {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The side channel's mutual proof of the secret, over a nonce from each end:
///
/// ```text
/// consumer → producer: "LLMDKVA1" | consumer nonce (16)
/// producer → consumer: producer nonce (16) | MAC("kv-producer", cn, pn) (32)
/// consumer → producer: MAC("kv-consumer", cn, pn) (32), then its pull as without a secret
/// ```
///
/// A producer that cannot answer is not one of ours (the consumer recomputes); a consumer that
/// cannot is disconnected before anything is read.
pub struct Handshake;

impl Handshake {
    pub const MAGIC: &'static [u8; 8] = b"LLMDKVA1";
    pub const NONCE: usize = 16;

    pub fn nonce() -> [u8; 16] {
        TransferToken::random().0
    }

    pub fn producer_proof(secret: &ClusterSecret, cn: &[u8], pn: &[u8]) -> [u8; 32] {
        secret.mac("kv-producer", &[cn, pn])
    }

    pub fn consumer_proof(secret: &ClusterSecret, cn: &[u8], pn: &[u8]) -> [u8; 32] {
        secret.mac("kv-consumer", &[cn, pn])
    }

    pub fn check_producer(secret: &ClusterSecret, cn: &[u8], pn: &[u8], tag: &[u8]) -> bool {
        secret.verify("kv-producer", &[cn, pn], tag)
    }

    pub fn check_consumer(secret: &ClusterSecret, cn: &[u8], pn: &[u8], tag: &[u8]) -> bool {
        secret.verify("kv-consumer", &[cn, pn], tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_is_rfc_4231s() {
        // RFC 4231 test case 2 (key "Jefe"), through the crate this module uses.
        let mut m = HmacSha256::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn short_secrets_are_refused_and_whitespace_is_not_part_of_one() {
        assert!(ClusterSecret::new(b"short")
            .unwrap_err()
            .contains("at least 16"));
        let a = ClusterSecret::new(b"0123456789abcdef0123\n").unwrap();
        let b = ClusterSecret::new(b"  0123456789abcdef0123").unwrap();
        assert_eq!(a.hop_token(), b.hop_token());
        assert!(!format!("{a:?}").contains("0123"), "never printed");
    }

    #[test]
    fn a_hop_token_proves_only_its_own_secret_and_label() {
        let a = ClusterSecret::new(b"0123456789abcdef0123").unwrap();
        let b = ClusterSecret::new(b"0123456789abcdef0124").unwrap();
        assert!(a.is_trusted_hop(&a.hop_token()));
        assert!(!a.is_trusted_hop(&b.hop_token()));
        assert!(!a.is_trusted_hop(""));
        assert!(!a.is_trusted_hop("zz"));
        // The handshake's MACs are not hop tokens, and the two directions differ.
        let (cn, pn) = ([1u8; 16], [2u8; 16]);
        let p = Handshake::producer_proof(&a, &cn, &pn);
        assert!(!a.is_trusted_hop(&hex(&p)));
        assert!(Handshake::check_producer(&a, &cn, &pn, &p));
        assert!(!Handshake::check_consumer(&a, &cn, &pn, &p));
        assert!(!Handshake::check_producer(&b, &cn, &pn, &p));
        assert!(!Handshake::check_producer(&a, &pn, &cn, &p));
    }

    #[test]
    fn tokens_are_random_and_survive_hex() {
        let (a, b) = (TransferToken::random(), TransferToken::random());
        assert_ne!(a, b);
        assert_eq!(TransferToken::from_hex(&a.to_hex()), Some(a));
        assert!(a.matches(&a) && !a.matches(&b));
        assert_eq!(TransferToken::from_hex("abc"), None);
        assert_eq!(TransferToken::from_hex(&"ab".repeat(17)), None);
        assert!(!format!("{a:?}").contains(&a.to_hex()));
    }
}
