//! The task market, sans IO.
//!
//! State machines take events (a bid arrived, a result arrived, a peer was
//! lost, a timer fired) and return actions (send this CFP, award these
//! shards, acknowledge that result, set a timer, complete the task). No
//! sockets, no clock, no threads: the node drives them with libp2p, a real
//! clock and the store; tests drive them with virtual time.
//!
//! - [`kind`]: each kind of work (embed, generate, chat) behind one trait:
//!   how it splits, checks and combines.
//! - [`plan`]: cutting a task into shards sized from the candidates' speed.
//! - [`requester`]: one task's auction, awards, verification, re-auctions
//!   and aggregation, ending in a receipt.
//! - [`worker`]: which CFPs to bid on, which awards to accept, the claim
//!   that goes with each result.
//! - [`node`]: the node's whole market as one machine: every requester,
//!   the worker, the reputation book, the capability index, retention and
//!   one timer queue. The node binary only interprets its actions.
//!
//! Every event's actions start with [`requester::Action::Persist`] when the
//! state changed: the driver stores the state before anything that depends
//! on it leaves the node, so a restarted requester resumes where it was.

pub mod kind;
pub mod node;
pub mod plan;
pub mod reputation;
pub mod requester;
pub mod worker;

pub use node::{Node, NodeConfig};
pub use plan::{Plan, PlannedShard};
pub use reputation::Reputation;
pub use requester::{Action, Candidate, Config, Event, Pool, Requester, Timer};
pub use worker::{AwardOutcome, Done, Job, Served, Worker, WorkerConfig};
