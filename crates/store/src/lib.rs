//! mycel's persistence.
//!
//! - [`identity`]: the node's key file (created once, mode 0600, never
//!   silently replaced).
//! - [`Store`]: the journal. Named trees ([`Tree`]) of byte keys and values;
//!   every write is a [`Batch`] that lands whole or not at all and is durable
//!   when `commit` returns; [`Store::commit_if`] makes a state transition
//!   conditional on the current state, so a task never half-moves and two
//!   writers can't both move it.
//! - [`SledStore`] is the on-disk backend, [`MemStore`] its in-memory twin
//!   for tests; both pass the same conformance suite, and the sled one a
//!   kill -9 test (`tests/store_crash.rs`).
//!
//! Values are usually protocol types: [`StoreExt`] encodes them with the
//! protocol codec, so the journal and the wire share one format.

pub mod identity;
mod mem;
mod sled_store;

use std::fmt;

use mycel_protocol::{DecodeError, EncodeError, Wire};

pub use mem::MemStore;
pub use sled_store::SledStore;

/// The keyspaces of the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Tree {
    /// Tasks this node requested: spec and state.
    Tasks,
    /// Shards of those tasks: assignment and state.
    Shards,
    /// Accepted shard results.
    Results,
    /// Peers seen: last advert, addresses.
    Peers,
    /// Reputation per peer.
    Reputation,
    /// Store bookkeeping (schema version).
    Meta,
    /// What the model router learned: outcomes per model, routed tasks.
    Router,
    /// Embeddings computed for searches, by model and text digest.
    Embeddings,
}

impl Tree {
    /// Every tree, in a fixed order.
    pub const ALL: [Tree; 8] = [
        Tree::Tasks,
        Tree::Shards,
        Tree::Results,
        Tree::Peers,
        Tree::Reputation,
        Tree::Meta,
        Tree::Router,
        Tree::Embeddings,
    ];

    /// One byte that prefixes the tree's keys in a single-keyspace backend.
    /// Never renumber: it is on disk.
    fn tag(self) -> u8 {
        match self {
            Tree::Tasks => 1,
            Tree::Shards => 2,
            Tree::Results => 3,
            Tree::Peers => 4,
            Tree::Reputation => 5,
            Tree::Meta => 6,
            Tree::Router => 7,
            Tree::Embeddings => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Tree::Tasks => "tasks",
            Tree::Shards => "shards",
            Tree::Results => "results",
            Tree::Peers => "peers",
            Tree::Reputation => "reputation",
            Tree::Meta => "meta",
            Tree::Router => "router",
            Tree::Embeddings => "embeddings",
        }
    }
}

impl fmt::Display for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One write in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put { tree: Tree, key: Vec<u8>, value: Vec<u8> },
    /// Remove `key` (no error if absent).
    Delete { tree: Tree, key: Vec<u8> },
}

/// Writes that land together or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, tree: Tree, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Put { tree, key: key.into(), value: value.into() });
        self
    }

    /// Adds a put of a protocol value, encoded with the protocol codec.
    pub fn put_wire<T: Wire>(
        &mut self,
        tree: Tree,
        key: impl Into<Vec<u8>>,
        value: &T,
    ) -> Result<&mut Self, StoreError> {
        let bytes = value.encode().map_err(|error| StoreError::Encode { tree, error })?;
        Ok(self.put(tree, key, bytes))
    }

    /// Adds a delete.
    pub fn delete(&mut self, tree: Tree, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete { tree, key: key.into() });
        self
    }

    /// The writes, in order; later writes to the same key win.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A condition on the current value of one key: the state a transition
/// starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// Tree of the key.
    pub tree: Tree,
    /// The key.
    pub key: Vec<u8>,
    /// Required current value; `None` requires the key to be absent.
    pub value: Option<Vec<u8>>,
}

/// Why a store operation failed. Nothing was written when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the store open.
    #[error("the store at {path} is in use by another process (is another mycel node running with this data dir?)")]
    InUse { path: String },
    /// The store was written by an incompatible version of mycel.
    #[error("the store at {path} has schema version {found}; this build reads version {expected}")]
    Schema { path: String, found: String, expected: u32 },
    /// A stored value does not decode: disk corruption or a bug.
    #[error("corrupt value in {tree} at key {key}: {error}")]
    Corrupt { tree: Tree, key: String, error: DecodeError },
    /// A value could not be encoded for storing.
    #[error("cannot store value in {tree}: {error}")]
    Encode { tree: Tree, error: EncodeError },
    /// The backend failed (I/O error, disk full...).
    #[error("storage backend failed: {0}")]
    Backend(String),
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The journal: trees of byte keys to byte values.
///
/// Implementations must make each `commit`/`commit_if` atomic (all of the
/// batch or none of it, also across trees and across a crash) and durable
/// (on disk when the call returns `Ok`).
pub trait Store: Send + Sync + fmt::Debug {
    /// The value at `key`, if any.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// All entries of `tree` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;

    /// Applies `batch` atomically and durably.
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;

    /// Applies `batch` only if every `expect`ation holds at the moment of
    /// writing; checks and writes are one atomic step. Returns whether the
    /// batch was applied.
    fn commit_if(&self, expect: &[Expect], batch: &Batch) -> Result<bool, StoreError>;
}

/// Typed reads on top of any [`Store`].
pub trait StoreExt: Store {
    /// Reads and decodes a protocol value. A value that does not decode is
    /// [`StoreError::Corrupt`], never silently skipped.
    fn get_wire<T: Wire>(&self, tree: Tree, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.get(tree, key)? {
            None => Ok(None),
            Some(bytes) => {
                T::decode(&bytes).map(Some).map_err(|error| StoreError::Corrupt { tree, key: printable(key), error })
            }
        }
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Keys are often binary; show them as text when they are, hex otherwise.
fn printable(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => hex::encode(key),
    }
}

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema";

/// Records the schema version in a new store, or checks an existing one's.
fn check_schema(store: &dyn Store, path: &str) -> Result<(), StoreError> {
    let expected = SCHEMA_VERSION.to_le_bytes().to_vec();
    match store.get(Tree::Meta, SCHEMA_KEY)? {
        Some(found) if found == expected => Ok(()),
        Some(found) => Err(StoreError::Schema {
            path: path.to_string(),
            found: match <[u8; 4]>::try_from(found.as_slice()) {
                Ok(b) => u32::from_le_bytes(b).to_string(),
                Err(_) => format!("unreadable ({})", hex::encode(&found)),
            },
            expected: SCHEMA_VERSION,
        }),
        None => {
            let mut batch = Batch::new();
            batch.put(Tree::Meta, SCHEMA_KEY, expected);
            store.commit(&batch)
        }
    }
}

#[cfg(test)]
mod conformance;
