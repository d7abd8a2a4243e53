//! Direct messages between two nodes over [`crate::version::RPC_PROTOCOL`]:
//! one request, one response, correlated by the transport.
//!
//! Responses are immediate: nothing waits on an inference while a request
//! is open. Long work is answered later by a request of its own.

use serde::{Deserialize, Serialize};

use crate::codec::rules::at_most;
use crate::{Advert, Signed, limits};

/// What one node asks of another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// "Send me the adverts you hold": lets a node that just joined see the
    /// swarm at once instead of waiting for every peer's next advert.
    Adverts,
}

crate::wire!(Request, limits::RPC_REQUEST);

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Signed adverts as their authors published them. Each is verified on
    /// receipt like a gossiped one (signature, age, sequence).
    Adverts(Vec<Signed<Advert>>),
    /// The request was understood but refused (overloaded, rate limited).
    Refused(String),
}

impl Response {
    fn check(&self) -> Result<(), String> {
        match self {
            Response::Adverts(adverts) => at_most("adverts", adverts, limits::ADVERTS_PER_SYNC),
            Response::Refused(reason) => crate::codec::rules::short("reason", reason, limits::SHORT_STRING),
        }
    }
}

crate::wire!(Response, limits::RPC_RESPONSE, validate = Response::check);
