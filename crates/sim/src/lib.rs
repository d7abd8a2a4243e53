//! Deterministic simulation of a mycel swarm.
//!
//! The market core ([`mycel_market::Node`]) does no I/O: it takes inputs
//! with the time and returns actions. This crate steps thousands of those
//! real machines from one seeded event loop, the way FoundationDB's
//! simulator and TigerBeetle's VOPR test their systems: virtual time; a
//! network with latency, loss, duplication and reordering, partitions and
//! heals; crashes that keep exactly what was journaled; and peers that lie,
//! forge, replay, stall, crawl, refuse every award or collude. Invariants are checked as the
//! run goes ([`check`]); the same seed replays the same run, event for
//! event.
//!
//! ```no_run
//! use mycel_sim::{Scenario, Sim};
//! let report = Sim::new(Scenario::default(), 7).run();
//! assert!(report.ok(), "{report}");
//! ```
//!
//! What it does not model: the bytes on the wire (messages travel as
//! values; the codec has its own tests and fuzzers), gossip's mesh (a
//! requester hears the adverts of a fixed random `view` of the swarm, and
//! a gossiped CFP reaches that view), and the models (a text's vector is a
//! hash of it).

pub mod check;
pub mod report;
pub mod rng;
pub mod scenario;
mod world;

pub use report::Report;
pub use scenario::{Behaviour, Scenario};
pub use world::{Sim, Stats, embed};
