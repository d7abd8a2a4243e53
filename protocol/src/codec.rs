//! The one place mycel touches bincode.
//!
//! Every message kind has a size cap ([`Wire::MAX_SIZE`]) that is checked
//! twice: on the raw input before any decoding starts, and as bincode's own
//! allocation limit while decoding, so a length prefix that claims a huge
//! container fails instead of allocating. Decoding must consume the whole
//! input: trailing bytes are an error, so one message has one encoding.
//!
//! Swapping bincode for another format means changing this file and bumping
//! the protocol versions in [`crate::version`].

use serde::{Serialize, de::DeserializeOwned};

/// Why bytes could not be turned into a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is larger than this message kind may ever be. Nothing was
    /// decoded; the sender is misbehaving or speaks another version.
    #[error("{kind} of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { kind: &'static str, len: usize, max: usize },
    /// The bytes are not a valid encoding (truncated, corrupt, wrong type,
    /// or a container larger than the limit allows).
    #[error("malformed {kind}: {error}")]
    Malformed { kind: &'static str, error: bincode::error::DecodeError },
    /// A valid message was followed by extra bytes.
    #[error("{kind} has {extra} trailing bytes")]
    TrailingBytes { kind: &'static str, extra: usize },
    /// The encoding is valid but the value breaks a rule of the protocol
    /// (too many entries, a non-finite number, an over-long string...).
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// Why a message could not be encoded. Seeing this is a bug on our side or
/// an attempt to send something a peer would refuse anyway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoding would exceed the message kind's size cap.
    #[error("{kind} would be {len} bytes, over the {max}-byte limit")]
    TooLarge { kind: &'static str, len: usize, max: usize },
    /// bincode refused the value.
    #[error("cannot encode {kind}: {error}")]
    Bincode { kind: &'static str, error: bincode::error::EncodeError },
}

/// A type that travels on the wire or into the journal.
///
/// Implemented through [`wire!`](crate::wire) so every kind names its size
/// cap once. bincode is not self-describing: never reorder or remove fields
/// of a `Wire` type; change the protocol version instead.
pub trait Wire: Serialize + DeserializeOwned {
    /// Name used in errors and logs.
    const KIND: &'static str;
    /// The largest encoding accepted, in bytes.
    const MAX_SIZE: usize;

    /// Decodes one message that must span all of `bytes`, then checks it
    /// with [`Wire::validate`].
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError>;

    /// Encodes the message, refusing to produce more than `MAX_SIZE` bytes.
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let bytes = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|error| EncodeError::Bincode { kind: Self::KIND, error })?;
        if bytes.len() > Self::MAX_SIZE {
            return Err(EncodeError::TooLarge { kind: Self::KIND, len: bytes.len(), max: Self::MAX_SIZE });
        }
        Ok(bytes)
    }

    /// Protocol rules that the type system can't express. Called after
    /// every decode; the default accepts everything.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Implements [`Wire`] for a type with a given size cap.
///
/// The cap must be a constant expression: it becomes bincode's compile-time
/// allocation limit.
#[macro_export]
macro_rules! wire {
    ($ty:ty, $max:expr) => {
        $crate::wire!($ty, $max, validate = |_v: &$ty| Ok(()));
    };
    ($ty:ty, $max:expr, validate = $validate:expr) => {
        impl $crate::codec::Wire for $ty {
            const KIND: &'static str = stringify!($ty);
            const MAX_SIZE: usize = $max;

            fn decode(bytes: &[u8]) -> Result<Self, $crate::codec::DecodeError> {
                let value: Self = $crate::codec::decode_limited::<Self, { $max }>(Self::KIND, bytes)?;
                <Self as $crate::codec::Wire>::validate(&value)
                    .map_err(|reason| $crate::codec::DecodeError::Invalid { kind: Self::KIND, reason })?;
                Ok(value)
            }

            fn validate(&self) -> Result<(), String> {
                #[allow(clippy::redundant_closure_call)]
                ($validate)(self)
            }
        }
    };
}

/// Decodes `bytes` as one `T` with a hard limit of `MAX` bytes. Use
/// [`Wire::decode`]; this is public only for the [`wire!`](crate::wire) macro.
#[doc(hidden)]
pub fn decode_limited<T: DeserializeOwned, const MAX: usize>(
    kind: &'static str,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    if bytes.len() > MAX {
        return Err(DecodeError::TooLarge { kind, len: bytes.len(), max: MAX });
    }
    let config = bincode::config::standard().with_limit::<MAX>();
    let (value, read) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|error| DecodeError::Malformed { kind, error })?;
    if read != bytes.len() {
        return Err(DecodeError::TrailingBytes { kind, extra: bytes.len() - read });
    }
    Ok(value)
}

/// Checks shared by `validate` implementations.
pub(crate) mod rules {
    /// `Err` when a collection holds more than `max` entries.
    pub fn at_most<T>(what: &str, items: &[T], max: usize) -> Result<(), String> {
        if items.len() > max {
            return Err(format!("{what}: {} entries, at most {max} allowed", items.len()));
        }
        Ok(())
    }

    /// `Err` when a string is longer than `max` bytes.
    pub fn short(what: &str, s: &str, max: usize) -> Result<(), String> {
        if s.len() > max {
            return Err(format!("{what}: {} bytes, at most {max} allowed", s.len()));
        }
        Ok(())
    }

    /// `Err` for NaN, infinities and negative numbers.
    pub fn non_negative(what: &str, x: f32) -> Result<(), String> {
        if !x.is_finite() || x < 0.0 {
            return Err(format!("{what}: {x} is not a finite non-negative number"));
        }
        Ok(())
    }

    /// `Err` for NaN, infinities, negative numbers and speeds over
    /// [`crate::limits::MAX_UNITS_PER_S`].
    pub fn speed(what: &str, x: f32) -> Result<(), String> {
        non_negative(what, x)?;
        if x > crate::limits::MAX_UNITS_PER_S {
            return Err(format!("{what}: {x} is over {}", crate::limits::MAX_UNITS_PER_S));
        }
        Ok(())
    }

    /// `Err` when an integer a peer sent is over `max`.
    pub fn bounded<T: PartialOrd + std::fmt::Display>(what: &str, x: T, max: T) -> Result<(), String> {
        if x > max {
            return Err(format!("{what}: {x} is over {max}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Small {
        items: Vec<u32>,
    }
    crate::wire!(Small, 64, validate = |s: &Small| rules::at_most("items", &s.items, 10));

    #[test]
    fn round_trip() {
        let v = Small { items: vec![1, 2, 3] };
        assert_eq!(Small::decode(&v.encode().unwrap()).unwrap(), v);
    }

    #[test]
    fn oversized_input_is_rejected_before_decoding() {
        let err = Small::decode(&[0u8; 65]).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { len: 65, max: 64, .. }), "{err}");
    }

    #[test]
    fn oversized_value_is_not_encoded() {
        let v = Small { items: (0..40).map(|i| 1_000_000 + i).collect() };
        assert!(matches!(v.encode(), Err(EncodeError::TooLarge { .. })));
    }

    #[test]
    fn huge_length_prefix_fails_without_allocating() {
        // varint 253 = u64 follows: claims 2^60 elements in 10 bytes.
        let mut bytes = vec![253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(Small::decode(&bytes), Err(DecodeError::Malformed { .. })));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = Small { items: vec![7] }.encode().unwrap();
        bytes.push(0);
        assert!(matches!(Small::decode(&bytes), Err(DecodeError::TrailingBytes { extra: 1, .. })));
    }

    #[test]
    fn validation_runs_on_decode() {
        let bytes = bincode::serde::encode_to_vec(Small { items: vec![0; 11] }, bincode::config::standard()).unwrap();
        assert!(matches!(Small::decode(&bytes), Err(DecodeError::Invalid { .. })));
    }
}
