//! The gRPC contract of mdcluster: package `mdcluster.v1`.
//!
//! The `.proto` files live in `proto/mdcluster/v1/`; `build.rs` compiles every one of
//! them with tonic/prost. This crate re-exports the generated code as [`v1`].

/// Generated code of package `mdcluster.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("mdcluster.v1");
}
