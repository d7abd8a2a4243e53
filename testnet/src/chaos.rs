//! `mycel testnet chaos`: kill -9 a random node of a running testnet on a
//! schedule, start it again on the same data directory with the same
//! command line, and log each step. The schedule comes from a seed, so a
//! run can be repeated (the swarm's own timing still varies).

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::net::{Manifest, NodeEntry, is_our_node};

/// What `chaos` does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The testnet directory.
    pub dir: PathBuf,
    /// Time between kills.
    pub kill_every: Duration,
    /// How long a killed node stays down.
    pub down: Duration,
    /// Decides the victims.
    pub seed: u64,
    /// Stop after this long; `None`: until interrupted.
    pub duration: Option<Duration>,
    /// Node indexes never killed (the bootstrap, a requester under test).
    pub spare: Vec<usize>,
}

/// What a chaos run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChaosReport {
    /// Nodes killed, by name, in order.
    pub killed: Vec<String>,
    /// Of those, started again and running.
    pub restarted: usize,
}

/// A small generator for the schedule (xorshift64*): the seed decides it.
struct Schedule(u64);

impl Schedule {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1) as u64) as usize
    }
}

/// Runs the schedule, writing one line per step to `log`.
pub fn chaos(opts: &ChaosOptions, log: &mut dyn Write) -> Result<ChaosReport> {
    if opts.kill_every.is_zero() {
        bail!("--kill-every must be more than 0");
    }
    let started = Instant::now();
    let mut schedule = Schedule(opts.seed.max(1));
    let mut report = ChaosReport::default();
    let stamp = |started: Instant| format!("{:7.1}s", started.elapsed().as_secs_f64());
    writeln!(
        log,
        "{} chaos in {}: a kill every {:?}, down {:?}, seed {}, sparing {:?}",
        stamp(started),
        opts.dir.display(),
        opts.kill_every,
        opts.down,
        opts.seed,
        opts.spare
    )?;
    loop {
        if opts.duration.is_some_and(|d| started.elapsed() + opts.kill_every > d) {
            break;
        }
        std::thread::sleep(opts.kill_every);
        let manifest = Manifest::read(&opts.dir)?;
        let candidates: Vec<usize> =
            (0..manifest.nodes.len()).filter(|i| !opts.spare.contains(i) && is_our_node(&manifest.nodes[*i])).collect();
        if candidates.is_empty() {
            writeln!(log, "{} no node to kill (all spared or stopped)", stamp(started))?;
            continue;
        }
        let index = candidates[schedule.below(candidates.len())];
        let victim = manifest.nodes[index].clone();
        let args = command_line(victim.pid)
            .with_context(|| format!("reading {}'s command line (pid {})", victim.name, victim.pid))?;
        crate::signal(victim.pid as libc::pid_t, libc::SIGKILL);
        writeln!(log, "{} killed {} (pid {})", stamp(started), victim.name, victim.pid)?;
        report.killed.push(victim.name.clone());
        std::thread::sleep(opts.down);
        // A node of a --netns testnet starts again inside its namespace.
        let namespace = manifest.netns.as_ref().map(|n| n.namespace(index as u32));
        match restart(&victim, &args, namespace.as_deref()) {
            Ok(node) => {
                writeln!(log, "{} restarted {} (pid {}, api {})", stamp(started), node.name, node.pid, node.api)?;
                // The manifest follows the node, so `status` and `down` find it.
                let mut manifest = Manifest::read(&opts.dir)?;
                if let Some(entry) = manifest.nodes.get_mut(index) {
                    *entry = node;
                }
                manifest.write(&opts.dir)?;
                report.restarted += 1;
            }
            Err(e) => writeln!(log, "{} could not restart {}: {e:#}", stamp(started), victim.name)?,
        }
    }
    writeln!(log, "{} chaos over: {} kills, {} restarts", stamp(started), report.killed.len(), report.restarted)?;
    Ok(report)
}

/// A running process's arguments: the program, then the rest.
fn command_line(pid: u32) -> Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<String> =
        raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    if args.len() < 2 {
        bail!("no command line");
    }
    Ok(args)
}

/// Starts the node again exactly as it was started, appending to its log,
/// and waits for its runtime file.
fn restart(node: &NodeEntry, args: &[String], namespace: Option<&str>) -> Result<NodeEntry> {
    let runtime = node.data_dir.join(mycel_api::types::RUNTIME_FILE);
    // The dead process's runtime file would be mistaken for the new one's.
    let _ = fs::remove_file(&runtime);
    let log = fs::OpenOptions::new().create(true).append(true).open(node.data_dir.join("node.log"))?;
    let cmd = match namespace {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).args(args);
            cmd
        }
        None => {
            let mut cmd = Command::new(&args[0]);
            cmd.args(&args[1..]);
            cmd
        }
    };
    let mut starting =
        crate::net::Starting::launch(node.name.clone(), node.data_dir.clone(), cmd, node.api_token.clone(), log)?;
    // The node is on its own once up, like every testnet node: `down` stops it.
    starting.wait_ready(Instant::now() + Duration::from_secs(120))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_decides_the_victims() {
        let picks = |seed| {
            let mut s = Schedule(seed);
            (0..20).map(|_| s.below(5)).collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
        assert_ne!(picks(7), picks(8));
        assert!(picks(3).iter().all(|i| *i < 5));
    }
}
