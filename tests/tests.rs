//! End-to-end tests across processes. One test binary; one module per area.

mod store_crash;
