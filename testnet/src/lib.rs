//! Local testnets of real mycel processes, and the process control they and
//! the crash tests need.
//!
//! [`net`] starts, inspects and stops a swarm of `mycel node` processes on
//! 127.0.0.1 (`mycel testnet up|status|down`). [`Proc`] wraps a child process: its stdout arrives as lines on a bounded
//! channel (read on a thread, so the child never blocks on a full pipe while
//! the parent waits), it can be stopped gracefully (SIGTERM) or killed
//! abruptly (SIGKILL, as a crash), and it is always reaped: dropping a
//! `Proc` kills a child that is still running, so a failing test leaves no
//! stray processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod chaos;
pub mod net;
pub mod netns;

/// Lines buffered between the reader thread and the test. When full, the
/// reader waits, and so, through the pipe, does the child.
const LINE_BUFFER: usize = 4096;

/// A child process under test control.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    lines: Receiver<String>,
    reader: Option<JoinHandle<()>>,
    name: String,
}

impl Proc {
    /// Starts `cmd` with stdout piped; stderr goes to the parent's stderr.
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Result<Self> {
        let name = name.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdout = child.stdout.take().context("child stdout was not piped")?;
        let (tx, lines): (SyncSender<String>, _) = sync_channel(LINE_BUFFER);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines, reader: Some(reader), name })
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line of stdout, waiting up to `timeout`. `None` at end of
    /// output or on timeout.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits for a line satisfying `pred`, failing after `timeout`.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{}: no matching line within {timeout:?}", self.name);
            }
            match self.next_line(left) {
                Some(line) if pred(&line) => return Ok(line),
                Some(_) => {}
                None if Instant::now() < deadline => bail!("{}: output ended before a matching line", self.name),
                None => {}
            }
        }
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    /// Returns every line it wrote to stdout that was not yet consumed.
    pub fn kill9(mut self) -> Result<Vec<String>> {
        // std's kill sends SIGKILL on Unix.
        self.child.kill().with_context(|| format!("killing {}", self.name))?;
        self.child.wait().with_context(|| format!("reaping {}", self.name))?;
        Ok(self.drain())
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace` for it to
    /// exit; kills it if it does not.
    pub fn terminate(mut self, grace: Duration) -> Result<ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        bail!("{} did not stop within {grace:?} of SIGTERM and was killed", self.name)
    }

    /// Waits for the process to exit by itself.
    pub fn wait(mut self) -> Result<(ExitStatus, Vec<String>)> {
        let status = self.child.wait().with_context(|| format!("waiting for {}", self.name))?;
        Ok((status, self.drain()))
    }

    fn drain(&mut self) -> Vec<String> {
        // The pipe closed with the process; the reader thread ends after
        // sending what was left.
        if let Some(reader) = self.reader.take() {
            let mut out: Vec<String> = Vec::new();
            while !reader.is_finished() {
                out.extend(self.lines.try_iter());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = reader.join();
            out.extend(self.lines.try_iter());
            return out;
        }
        self.lines.try_iter().collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to `pid`; false when there is no such process.
#[allow(unsafe_code)]
pub fn signal(pid: libc::pid_t, sig: libc::c_int) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}
