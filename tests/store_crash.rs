//! kill -9 test for the sled store: a child journals records and reports
//! each one after `commit` returns; we kill it at random moments and check
//! that the store reopens and holds every record reported durable, with
//! each batch whole (task, shard and state counter together) or absent.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mycel_store::{SledStore, Store, Tree};
use mycel_testnet::Proc;

#[path = "src/bin/store_crash_child.rs"]
#[allow(dead_code)]
mod child;

/// Rounds of start, journal, kill -9, reopen, check.
const ROUNDS: u32 = 120;

/// A small xorshift: reproducible kill timings from a printed seed, without
/// pulling a RNG crate into the test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn store_survives_kill_9_at_random_moments() -> Result<()> {
    let seed = std::env::var("MYCEL_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("crash test seed {seed} (rerun with MYCEL_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("store");
    let mut total_durable = 0u64;
    let mut killed_mid_run = 0;

    for run in 0..ROUNDS {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_store-crash-child"));
        cmd.arg(&store_dir).arg(run.to_string());
        let proc = Proc::spawn(format!("crash child {run}"), cmd)?;
        proc.wait_for_line(Duration::from_secs(30), |l| l.starts_with("ready"))?;

        // Kill after 0-40 ms of journaling: early kills hit recovery and the
        // first writes, later ones land mid-batch or mid-flush.
        let delay = Duration::from_micros(rng.next() % 40_000);
        let start = Instant::now();
        let mut lines = Vec::new();
        while start.elapsed() < delay {
            if let Some(line) = proc.next_line(Duration::from_millis(1)) {
                lines.push(line);
            }
        }
        lines.extend(proc.kill9()?);

        let reported: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("durable {run} ")))
            .map(|i| i.parse::<u64>())
            .collect::<Result<_, _>>()
            .context("parsing child output")?;
        ensure!(reported.iter().copied().eq(0..reported.len() as u64), "run {run}: reports out of order");
        if !reported.is_empty() {
            killed_mid_run += 1;
        }
        total_durable += reported.len() as u64;

        let store = SledStore::open(&store_dir).with_context(|| format!("reopening after kill in run {run}"))?;
        check_run(&store, run, reported.len() as u64)?;
        // The previous runs must still be intact too (a later crash must not
        // damage earlier data); check one at random to bound the time.
        if run > 0 {
            let earlier = (rng.next() % u64::from(run)) as u32;
            let n = committed(&store, earlier)?;
            check_run(&store, earlier, n)?;
        }
    }
    eprintln!(
        "crash test: {ROUNDS} rounds, {killed_mid_run} killed after journaling started, {total_durable} records \
         reported durable, 0 lost"
    );
    ensure!(
        killed_mid_run >= ROUNDS / 2,
        "too few kills landed mid-journal ({killed_mid_run}); the test is not testing"
    );
    Ok(())
}

/// Records committed in a run, from its state counter.
fn committed(store: &SledStore, run: u32) -> Result<u64> {
    Ok(match store.get(Tree::Tasks, &child::state_key(run))? {
        None => 0,
        Some(v) => u64::from_le_bytes(v.as_slice().try_into().context("state counter is not 8 bytes")?) + 1,
    })
}

/// Every reported record is present and intact, the state counter agrees
/// with the records, and no record exists past the counter (no half batch).
fn check_run(store: &SledStore, run: u32, reported: u64) -> Result<()> {
    let n = committed(store, run)?;
    ensure!(n >= reported, "run {run}: {reported} records reported durable, the store has {n}");
    // At most one more than reported: the child may die between commit and print.
    ensure!(n <= reported + 1, "run {run}: store has {n} records, only {reported} were written");
    for i in 0..n {
        let key = child::record_key(run, i);
        let task = store.get(Tree::Tasks, &key)?;
        let shard = store.get(Tree::Shards, &key)?;
        ensure!(
            task.as_deref() == Some(child::task_value(run, i).as_slice()),
            "run {run} record {i}: task entry lost or damaged"
        );
        ensure!(
            shard.as_deref() == Some(child::shard_value(run, i).as_slice()),
            "run {run} record {i}: shard entry lost or damaged"
        );
    }
    let past = child::record_key(run, n);
    ensure!(store.get(Tree::Tasks, &past)?.is_none(), "run {run}: task entry past the state counter (half a batch)");
    ensure!(store.get(Tree::Shards, &past)?.is_none(), "run {run}: shard entry past the state counter (half a batch)");
    Ok(())
}
