//! Integration tests of the server crate over real sockets: one test binary, shared helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod tls;
mod usage;
