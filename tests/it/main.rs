//! The integration tests, as one test binary: each file is a module (`cargo test --release
//! moves::` runs one of them). One binary links the crate once instead of once per file, which
//! is most of CI's build time under `--release` with LTO.

mod support;

mod admin;
mod admin_jobs;
mod binary;
mod clients;
mod config_reload;
mod http;
mod limits;
mod metrics;
mod moves;
mod replicas;
mod routers;
mod split;
mod tls;
mod wire;
