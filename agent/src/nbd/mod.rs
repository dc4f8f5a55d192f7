//! The NBD export: every active array served over the NBD protocol (fixed newstyle,
//! simple replies) on a unix socket per array and, optionally, one TCP listener.
//!
//! # Layout
//! - [`proto`]: the wire format, pure (constants, encode/decode, request validation).
//! - [`exports`]: how the server opens an export ([`Exports`], [`OpenExport`],
//!   [`OpenError`]) and the client bookkeeping a stop uses ([`ClientSet`]); a map-backed
//!   [`MapExports`] for tests.
//! - [`server`]: listeners, connections, negotiation and transmission I/O.
//! - [`tls`]: x509 TLS with client certificates for the TCP listener (`NBD_OPT_STARTTLS`).
//!
//! # Lifecycle contract (`docs/LIFECYCLE.md` §2)
//! The server only ever *looks up* exports through [`Exports::open`]; an absent export is
//! refused with ENOENT (`NBD_REP_ERR_UNKNOWN`), an assembling or stopping one with EBUSY
//! (`NBD_REP_ERR_SHUTDOWN`, with a message saying EBUSY and naming the state), at once and
//! never retried. (`NBD_OPT_EXPORT_NAME` has no error reply: the connection is closed.)
//! The owner learns who is connected, waits for them (bounded) and forces them off through
//! [`ClientSet`].

pub mod exports;
pub mod proto;
pub mod server;
pub mod tls;

pub use exports::{ClientInfo, ClientSet, ExportState, Exports, MapExports, OpenError, OpenExport};
pub use server::{
    serve_tcp, serve_unix, spawn_tcp, spawn_unix, NbdUnixListener, PayloadBudget, Scope,
    ServeError, ServerConfig, ServerHandle,
};
pub use tls::{NbdTls, TlsError};
