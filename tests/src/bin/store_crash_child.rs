//! Child process for the store crash test.
//!
//! Usage: `store-crash-child DIR RUN`. Opens the sled store in DIR and
//! journals records forever: record `i` of run `RUN` is one atomic batch
//! writing a task entry, a shard entry of varying size and the run's state
//! counter (a conditional transition from `i - 1` to `i`). After each commit
//! returns, prints `durable RUN i` and flushes stdout. The parent kills it at
//! a random moment and checks that every record printed is in the store.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use mycel_store::{Batch, Expect, SledStore, Store, Tree};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().context("usage: store-crash-child DIR RUN")?);
    let run: u32 = args.next().context("usage: store-crash-child DIR RUN")?.parse()?;
    let store = SledStore::open(&dir)?;

    let state_key = state_key(run);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {run}")?;
    out.flush()?;
    for i in 0u64.. {
        let expect = Expect {
            tree: Tree::Tasks,
            key: state_key.clone(),
            value: i.checked_sub(1).map(|p| p.to_le_bytes().to_vec()),
        };
        let mut batch = Batch::new();
        batch
            .put(Tree::Tasks, record_key(run, i), task_value(run, i))
            .put(Tree::Shards, record_key(run, i), shard_value(run, i))
            .put(Tree::Tasks, state_key.clone(), i.to_le_bytes().to_vec());
        anyhow::ensure!(store.commit_if(&[expect], &batch)?, "state counter moved under us at {i}");
        writeln!(out, "durable {run} {i}")?;
        out.flush()?;
    }
    Ok(())
}

/// The key of the run's state counter.
pub fn state_key(run: u32) -> Vec<u8> {
    format!("state/{run:04}").into_bytes()
}

/// The key of record `i` of run `run`.
pub fn record_key(run: u32, i: u64) -> Vec<u8> {
    format!("rec/{run:04}/{i:08}").into_bytes()
}

/// A task value that names its record.
pub fn task_value(run: u32, i: u64) -> Vec<u8> {
    format!("task {run} {i}").into_bytes()
}

/// A shard value whose size varies from bytes to 64 KiB, so kills land in
/// the middle of large writes too.
pub fn shard_value(run: u32, i: u64) -> Vec<u8> {
    let len = [16usize, 1024, 65_536, 300][(i % 4) as usize];
    let seed = (u64::from(run) << 32) ^ i;
    (0..len).map(|j| (seed.wrapping_mul(31).wrapping_add(j as u64) % 251) as u8).collect()
}
