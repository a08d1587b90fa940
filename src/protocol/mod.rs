//! PostgreSQL v3 wire codec: framing, the startup packet, the backend messages the router
//! writes itself, and SCRAM-SHA-256. No I/O lives here: everything takes and returns bytes,
//! so it is unit-tested without sockets.
//!
//! Frontend messages that the router *sends* to pods are built with `postgres-protocol`
//! (`postgres_protocol::message::frontend`); backend messages that the router *writes* to
//! clients (errors, authentication requests) are built here, because `postgres-protocol`
//! only implements the client side.

pub mod backend;
pub mod framing;
pub mod scram;

pub use framing::{FrameError, Startup};

/// SQLSTATE codes the router itself raises (Postgres' own spelling, `errcodes.txt`).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INTERNAL_ERROR: &str = "XX000";
}
