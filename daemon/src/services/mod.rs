//! The host supervisor and its gRPC face: wiring of core to sys and to tonic.

pub mod grpc;
pub mod host;
pub mod member;
pub mod metrics;
pub mod scheduler;
pub mod server;
