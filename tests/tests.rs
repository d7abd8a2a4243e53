//! End-to-end tests across processes. One test binary; one module per area.

// Test code: a panic with a message is the right way to fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod interfaces;
mod market;
mod netns;
mod node;
mod pipeline;
mod route;
mod store_crash;
mod support;
mod testnet;
