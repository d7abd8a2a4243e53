//! Signed envelopes: a message, who signed it, and the signature.
//!
//! The signature covers `DOMAIN || 0x00 || payload`, where the domain names
//! the message kind and protocol version (`mycel/bid/1`). A bid's signature
//! therefore never verifies as a result's, even if the payload bytes were
//! identical. Domains contain no zero byte, so the split is unambiguous.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::codec::{DecodeError, EncodeError, Wire};
use crate::keys::{BadSignature, Keypair, PublicKey, Signature};

/// A message kind that travels signed.
pub trait SignedKind: Wire {
    /// Domain separation tag, unique per kind and version.
    const DOMAIN: &'static str;
}

/// Bytes an envelope adds around its payload: key, signature and the
/// payload's length prefix, with room to spare.
pub const ENVELOPE_OVERHEAD: usize = 32 + 64 + 16;

/// Why a signed message was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The signature does not match the payload and signer under this
    /// message kind's domain (tampered, or replayed from another kind).
    #[error("bad signature on {kind}")]
    BadSignature { kind: &'static str },
    /// Signed by someone other than the peer it had to come from.
    #[error("{kind} signed by {got}, expected {expected}")]
    WrongSigner { kind: &'static str, expected: Box<PublicKey>, got: Box<PublicKey> },
    /// The signature is fine but the payload is not a valid message.
    #[error(transparent)]
    Payload(#[from] DecodeError),
}

/// A `T` signed by a node. Holds the payload as bytes: the signature is over
/// exactly these bytes, so nothing is re-encoded before checking.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    signer: PublicKey,
    signature: Signature,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    #[serde(skip)]
    kind: PhantomData<fn() -> T>,
}

impl<T: SignedKind> Signed<T> {
    /// Encodes and signs `value` with `key`.
    pub fn sign(key: &Keypair, value: &T) -> Result<Self, EncodeError> {
        let payload = value.encode()?;
        let signature = key.sign_raw(&signing_input::<T>(&payload));
        Ok(Self { signer: key.public(), signature, payload, kind: PhantomData })
    }

    /// Checks the signature, then decodes and validates the payload.
    pub fn verify(&self) -> Result<T, VerifyError> {
        self.signer
            .verify_raw(&signing_input::<T>(&self.payload), &self.signature)
            .map_err(|BadSignature| VerifyError::BadSignature { kind: T::KIND })?;
        Ok(T::decode(&self.payload)?)
    }

    /// Checks the signature once and keeps the decoded value beside the
    /// envelope: code that holds a [`Verified`] never checks again.
    pub fn into_verified(self) -> Result<Verified<T>, VerifyError> {
        let value = self.verify()?;
        Ok(Verified { value, signed: self })
    }

    /// [`Signed::verify`], and the signer must be `expected`.
    pub fn verify_from(&self, expected: &PublicKey) -> Result<T, VerifyError> {
        if self.signer != *expected {
            return Err(VerifyError::WrongSigner {
                kind: T::KIND,
                expected: Box::new(*expected),
                got: Box::new(self.signer),
            });
        }
        self.verify()
    }

    /// Reassembles a signed message from its parts (as stored or received
    /// elsewhere). Nothing is checked until [`Signed::verify`].
    pub fn from_parts(signer: PublicKey, signature: Signature, payload: Vec<u8>) -> Self {
        Self { signer, signature, payload, kind: PhantomData }
    }

    /// Who claims to have signed this (unchecked until [`Signed::verify`]).
    pub fn signer(&self) -> &PublicKey {
        &self.signer
    }

    /// The signature bytes.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The signed payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// A digest that names this exact signed message (payload, signer and
    /// signature), used to refer to it from awards and receipts.
    pub fn digest(&self) -> Digest {
        Digest::of_parts(&[T::DOMAIN.as_bytes(), &[0], &self.signer.to_bytes(), &self.signature.0, &self.payload])
    }
}

/// A signed message whose signature has been checked and whose payload
/// decoded: made only by [`Signed::into_verified`], so holding one is proof
/// of both. Peer messages become `Verified` where they enter the node; the
/// market core takes nothing else.
///
/// Stored as the envelope: reading it back (from the journal) verifies it
/// again, so a tampered journal entry is refused rather than trusted.
#[derive(Deserialize)]
#[serde(bound = "T: SignedKind", try_from = "Signed<T>")]
pub struct Verified<T: SignedKind> {
    value: T,
    signed: Signed<T>,
}

impl<T: SignedKind> Verified<T> {
    /// The checked envelope, as it travelled.
    pub fn signed(&self) -> &Signed<T> {
        &self.signed
    }

    /// Who signed it (checked).
    pub fn signer(&self) -> &PublicKey {
        self.signed.signer()
    }

    /// [`Signed::digest`] of the envelope.
    pub fn digest(&self) -> Digest {
        self.signed.digest()
    }

    /// The envelope, dropping the decoded value.
    pub fn into_signed(self) -> Signed<T> {
        self.signed
    }
}

impl<T: SignedKind> std::ops::Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: SignedKind> TryFrom<Signed<T>> for Verified<T> {
    type Error = VerifyError;
    fn try_from(signed: Signed<T>) -> Result<Self, VerifyError> {
        signed.into_verified()
    }
}

impl<T: SignedKind> Serialize for Verified<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.signed.serialize(s)
    }
}

impl<T: SignedKind> From<Verified<T>> for Signed<T> {
    fn from(v: Verified<T>) -> Self {
        v.signed
    }
}

impl<T: SignedKind + Clone> Clone for Verified<T> {
    fn clone(&self) -> Self {
        Self { value: self.value.clone(), signed: self.signed.clone() }
    }
}

impl<T: SignedKind> PartialEq for Verified<T> {
    fn eq(&self, other: &Self) -> bool {
        self.signed == other.signed
    }
}

impl<T: SignedKind> Eq for Verified<T> {}

impl<T: SignedKind + std::fmt::Debug> std::fmt::Debug for Verified<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified").field("signer", self.signer()).field("value", &self.value).finish()
    }
}

fn signing_input<T: SignedKind>(payload: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(T::DOMAIN.len() + 1 + payload.len());
    input.extend_from_slice(T::DOMAIN.as_bytes());
    input.push(0);
    input.extend_from_slice(payload);
    input
}

/// The largest envelope of any kind; bincode's hard limit for envelopes.
/// Each kind's own, smaller cap is checked first in [`Signed::decode`].
const ANY_ENVELOPE_MAX: usize = crate::limits::LARGEST_MESSAGE + ENVELOPE_OVERHEAD;

impl<T: SignedKind> Wire for Signed<T> {
    const KIND: &'static str = "Signed";
    const MAX_SIZE: usize = T::MAX_SIZE + ENVELOPE_OVERHEAD;

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > Self::MAX_SIZE {
            return Err(DecodeError::TooLarge { kind: T::KIND, len: bytes.len(), max: Self::MAX_SIZE });
        }
        let envelope: Self = crate::codec::decode_limited::<Self, ANY_ENVELOPE_MAX>(T::KIND, bytes)?;
        if envelope.payload.len() > T::MAX_SIZE {
            return Err(DecodeError::TooLarge { kind: T::KIND, len: envelope.payload.len(), max: T::MAX_SIZE });
        }
        Ok(envelope)
    }
}

// Manual impls: derives would demand `T: Clone` etc. for a PhantomData.
impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self { signer: self.signer, signature: self.signature, payload: self.payload.clone(), kind: PhantomData }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.signer == other.signer && self.signature == other.signature && self.payload == other.payload
    }
}

impl<T> Eq for Signed<T> {}

impl<T> std::fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("kind", &std::any::type_name::<T>().rsplit("::").next().unwrap_or("?"))
            .field("signer", &self.signer)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}
