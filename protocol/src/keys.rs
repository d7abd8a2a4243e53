//! Node identity: ed25519 keys, signatures, and their libp2p `PeerId`.
//!
//! One key does everything: it is the node's libp2p identity (so its
//! `PeerId` is derived from it) and it signs adverts, bids, results and
//! receipts. Secrets are zeroed on drop and never printed.

use std::fmt;

use ed25519_dalek::{SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::bytes::fixed;

/// Why key material was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// 32 bytes that are not a point on the curve (or a weak point).
    #[error("not a valid ed25519 public key")]
    InvalidPublicKey,
    /// The PeerId does not embed an ed25519 key (RSA, secp256k1, hashed...).
    #[error("PeerId {0} does not carry an ed25519 public key")]
    NotEd25519(PeerId),
    /// The operating system's random source failed.
    #[error("random source unavailable: {0}")]
    Random(String),
}

/// A signature did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("signature does not verify")]
pub struct BadSignature;

/// A node's secret signing key. Zeroed on drop; `Debug` shows only the
/// public half.
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_secret_bytes(&seed))
    }

    /// Rebuilds a key from its 32-byte secret seed.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(secret))
    }

    /// The secret seed, for writing the key file. Handle with care; the
    /// returned buffer zeroes itself when dropped.
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// This node's libp2p `PeerId`.
    pub fn peer_id(&self) -> PeerId {
        self.public().to_peer_id()
    }

    /// The same key as a libp2p keypair, for the transport's noise handshake.
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        let mut secret = self.0.to_bytes();
        // `ed25519_from_bytes` zeroes the buffer it is given.
        libp2p_identity::Keypair::ed25519_from_bytes(&mut secret)
            .unwrap_or_else(|_| unreachable!("any 32 bytes are an ed25519 secret"))
    }

    /// Signs raw bytes. Callers use [`crate::signed::Signed`], which adds
    /// the domain separation prefix.
    pub(crate) fn sign_raw(&self, message: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        Signature(self.0.sign(message).to_bytes())
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair").field("public", &self.public()).field("secret", &"<redacted>").finish()
    }
}

/// An ed25519 public key: a node's identity on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses 32 bytes, rejecting points that are not valid keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPublicKey)?;
        if key.is_weak() {
            return Err(KeyError::InvalidPublicKey);
        }
        Ok(Self(key))
    }

    /// The 32-byte compressed encoding.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The libp2p `PeerId` of the node holding this key.
    pub fn to_peer_id(&self) -> PeerId {
        self.to_libp2p().to_peer_id()
    }

    /// The same key as a libp2p public key.
    pub fn to_libp2p(&self) -> libp2p_identity::PublicKey {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.to_bytes())
            .unwrap_or_else(|_| unreachable!("a valid dalek key is a valid libp2p key"));
        libp2p_identity::PublicKey::from(key)
    }

    /// Recovers the key embedded in a `PeerId`. Ed25519 PeerIds inline the
    /// key (identity multihash), so no lookup is needed.
    pub fn from_peer_id(peer: &PeerId) -> Result<Self, KeyError> {
        // Multihash bytes: code, digest length, digest. An inlined key has
        // the identity code (0) and a digest shorter than 128 bytes, so both
        // varints are one byte each.
        let bytes = peer.to_bytes();
        let digest = match bytes.as_slice() {
            [0x00, len, digest @ ..] if usize::from(*len) == digest.len() && *len < 0x80 => digest,
            _ => return Err(KeyError::NotEd25519(*peer)),
        };
        let key = libp2p_identity::PublicKey::try_decode_protobuf(digest)
            .map_err(|_| KeyError::NotEd25519(*peer))?
            .try_into_ed25519()
            .map_err(|_| KeyError::NotEd25519(*peer))?;
        Self::from_bytes(&key.to_bytes())
    }

    /// Checks `signature` over `message` with the strict rules (no
    /// malleable signatures, no small-order keys).
    pub(crate) fn verify_raw(&self, message: &[u8], signature: &Signature) -> Result<(), BadSignature> {
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(message, &signature).map_err(|_| BadSignature)
    }
}

// Ordered by encoding, so keys can index sorted maps (deterministic
// iteration in the market's state machines).
impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.as_bytes().cmp(other.0.as_bytes())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_peer_id())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_peer_id(), f)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fixed::serialize(&self.to_bytes(), s)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: [u8; 32] = fixed::deserialize(d)?;
        Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A 64-byte ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "fixed")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_round_trips_through_public_key() {
        let key = Keypair::generate().unwrap();
        let peer = key.peer_id();
        assert_eq!(PublicKey::from_peer_id(&peer).unwrap(), key.public());
        assert_eq!(key.to_libp2p().public().to_peer_id(), peer);
    }

    #[test]
    fn non_ed25519_peer_id_is_refused() {
        // A sha2-256 multihash (code 0x12, 32 bytes): how RSA keys are named.
        let hashed = PeerId::from_bytes(&[[0x12, 0x20].as_slice(), &[7; 32]].concat()).unwrap();
        assert!(matches!(PublicKey::from_peer_id(&hashed), Err(KeyError::NotEd25519(_))));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = Keypair::from_secret_bytes(&[0xAB; 32]);
        let shown = format!("{key:?} {:#?}", key);
        assert!(shown.contains("redacted"));
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        assert!(!shown.contains("171, 171"), "{shown}");
    }

    #[test]
    fn secret_bytes_rebuild_the_same_key() {
        let key = Keypair::generate().unwrap();
        let again = Keypair::from_secret_bytes(&key.secret_bytes());
        assert_eq!(key.public(), again.public());
    }
}
