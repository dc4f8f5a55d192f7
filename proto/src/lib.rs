//! The gRPC contract of mdcluster: package `mdcluster.v1`.
//!
//! The `.proto` files live in `proto/mdcluster/v1/`; `build.rs` compiles every one of
//! them with tonic/prost. This crate re-exports the generated code as [`v1`].
//!
//! # Layout
//! - [`v1`]: the generated messages, clients and servers.
//! - [`lock_client`]: the typed client of the lock service that agents use (sessions with
//!   heartbeats, resume on another replica, self-fencing deadline, locks, messages).
//! - [`quote`]: long user input (names, paths) cut short where an error echoes it.
//! - [`status`]: the errno + resource + sentence error model and its `tonic::Status` form,
//!   used on every hop.
//! - [`tls`]: mutual TLS (files, reload, accept loop, client connector), the caller's
//!   identity from its certificate, and the authorization layer.

/// Generated code of package `mdcluster.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("mdcluster.v1");
}

pub mod lock_client;
pub mod metrics_http;
pub mod quote;
pub mod status;
pub mod tls;
