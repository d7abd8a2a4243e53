//! Direct messages between two nodes over [`crate::version::RPC_PROTOCOL`]:
//! one request, one response, correlated by the transport.
//!
//! Responses are immediate: nothing waits on an inference while a request
//! is open. Long work is answered later by a request of its own.

use serde::{Deserialize, Serialize};

use crate::codec::rules::at_most;
use crate::{Advert, Award, Bid, Cfp, ResultAck, ShardResult, Signed, TaskId, limits};

/// What one node asks of another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// "Send me the adverts you hold": lets a node that just joined see the
    /// swarm at once instead of waiting for every peer's next advert.
    Adverts,
    /// A market message. Answered at once with [`Response::Accepted`] (or
    /// `Refused`); whatever it leads to comes back as a request of its own.
    Market(Box<Market>),
    /// "Send me what your model router learned": answered at once with
    /// [`Response::RouterOutcomes`] (its latest signed share) or `Refused`.
    RouterOutcomes,
    /// "Send me your own advert": answered with [`Response::Adverts`]
    /// holding the signed advert it last published (empty before the
    /// first). How a node that found a provider in the DHT learns what it
    /// serves, without taking the provider's whole table.
    OwnAdvert,
}

impl Request {
    fn check(&self) -> Result<(), String> {
        match self {
            Request::Market(m) => match m.as_ref() {
                Market::Result(result) => crate::Wire::validate(result),
                Market::Partial { text, .. } => crate::codec::rules::short("partial text", text, limits::PARTIAL_TEXT),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

crate::wire!(Request, limits::RPC_REQUEST, validate = Request::check);

/// The market's direct messages (see `crates/market`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Market {
    /// Requester to worker: a call for proposals.
    Cfp(Signed<Cfp>),
    /// Worker to requester: an offer.
    Bid(Signed<Bid>),
    /// Requester to worker: shards to run, with their data.
    Award(Signed<Award>),
    /// Worker to requester: a finished shard.
    Result(ShardResult),
    /// Requester to worker: what it thought of a result.
    Ack(Signed<ResultAck>),
    /// Worker to requester: it will not run this shard after all.
    Refuse {
        /// The task.
        task: TaskId,
        /// The shard.
        shard: u32,
    },
    /// Worker to requester: text generated so far for one item of a
    /// streaming task. Unsigned and advisory: only the signed
    /// [`Market::Result`] counts, and pieces from anyone but the shard's
    /// current worker are dropped.
    Partial {
        /// The task.
        task: TaskId,
        /// The shard.
        shard: u32,
        /// The item's index in the task.
        item: u64,
        /// Text that follows what was sent before for this item.
        text: String,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Signed adverts as their authors published them. Each is verified on
    /// receipt like a gossiped one (signature, age, sequence).
    Adverts(Vec<Signed<Advert>>),
    /// The request was understood but refused (overloaded, rate limited).
    Refused(String),
    /// Received; the answer, if any, comes later as a request of its own.
    Accepted,
    /// What the answering node's router learned, signed by that node; the
    /// payload is checked (bounds, values) when the signature is.
    RouterOutcomes(Box<Signed<crate::router::RouterOutcomes>>),
}

impl Response {
    fn check(&self) -> Result<(), String> {
        match self {
            Response::Adverts(adverts) => at_most("adverts", adverts, limits::ADVERTS_PER_SYNC),
            Response::Refused(reason) => crate::codec::rules::short("reason", reason, limits::SHORT_STRING),
            Response::Accepted | Response::RouterOutcomes(_) => Ok(()),
        }
    }
}

crate::wire!(Response, limits::RPC_RESPONSE, validate = Response::check);
