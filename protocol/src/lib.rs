//! mycel's wire protocol: the types nodes exchange, how they are encoded,
//! and how they are signed. No runtime lives here (no tokio, no sockets), so
//! every other crate, the offline `mycel verify` and the fuzzer can use it.
//!
//! - [`codec`]: the single bincode configuration, size caps checked before
//!   decoding, trailing bytes rejected. Implemented per type with [`wire!`].
//! - [`keys`]: ed25519 node keys, convertible to the libp2p `PeerId`.
//! - [`signed`]: [`Signed<T>`] envelopes with a domain per message kind.
//! - [`advert`], [`market`], [`task`]: the messages themselves.
//! - [`rpc`]: direct request-response messages between two nodes.
//! - [`merkle`]: the Merkle root that receipts commit to.
//! - [`spot`]: spot checks committed to before any award, revealed in the
//!   receipt.
//! - [`version`] and [`limits`]: protocol names and size caps.

pub mod advert;
mod bytes;
pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod limits;
pub mod market;
pub mod merkle;
pub mod router;
pub mod rpc;
pub mod signed;
pub mod spot;
pub mod task;
pub mod version;

pub use advert::{Advert, Gpu, Hardware, Load, ModelAdvert, ModelKind, ModelProfile, Price, Quantization, Throughput};
pub use bytes::Digest;
pub use codec::{DecodeError, EncodeError, Wire};
pub use keys::{KeyError, Keypair, PublicKey, Signature};
pub use libp2p_identity::PeerId;
pub use market::{
    Award, AwardedShard, Bid, Cfp, FinishReason, Generation, RejectReason, ResultAck, ResultClaim, ShardOffer,
    ShardOutput, ShardResult, Timings, TokenLogprob, ToolCall, TopLogprob, Verdict, VerifiedResult,
};
pub use signed::{Signed, SignedKind, Verified, VerifyError};
pub use task::{
    Aggregation, ChatTurn, GenerateParams, JobMismatch, JobReceipt, ModelSelector, OutputFormat, Receipt,
    ReceiptMismatch, Role, Split, StagedMismatch, StagedReceipt, TaskId, TaskSpec, ToolChoice, Work,
};

#[cfg(test)]
mod proptests;
