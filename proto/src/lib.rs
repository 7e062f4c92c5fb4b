//! The berth.v1 gRPC contract (shared/design/API.md): generated messages, clients and servers,
//! and the descriptor set that server reflection serves.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `berth.v1` package.
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

/// Encoded `FileDescriptorSet` of every berth.v1 file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("berth_descriptor");

/// Converts a `SystemTime` into a protobuf timestamp.
pub fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}
