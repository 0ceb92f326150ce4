//! `crd serve`: a resident service that keeps the BPF programs loaded and runs crd's
//! commands for clients over a unix socket, as `criu service` does for runc and LXD.
//! The protocol, the access rule and systemd use are in docs/service.md.
//!
//! - [`protocol`]: the request and reply lines (newline-delimited JSON).
//! - [`server`]: tokio, the socket, connections, deadlines, cancellation, SIGTERM.
//! - [`worker`]: the one OS thread that freezes and harvests, with the loaded programs.
//! - [`access`]: who the client is and what it may touch; [`identity`]: images written
//!   as the client; [`spawn`]: restore and graft as a `crd` of the client's own.
//! - [`activation`]: the listening socket, made or from systemd.
//! - [`client`]: the library's client, which `crd --service PATH CMD` uses.
pub mod access;
pub mod activation;
pub mod cancel;
pub mod client;
pub mod identity;
pub mod protocol;
pub mod server;
pub mod spawn;
pub mod worker;

pub use client::{Client, ClientError};
pub use protocol::{Envelope, Reply, Request};
pub use server::{ServeError, ServeOptions, run};

/// Where the service listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/crd.sock";
