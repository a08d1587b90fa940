//! podrouter: a tenant-aware router for fleets of PostgreSQL servers. Each tenant is one
//! database on one pod; clients connect with the tenant as the database name and podrouter
//! authenticates them (SCRAM, against verifiers in its catalog), finds the tenant's pod in an
//! immutable RoutingTable, and relays their session through a pool of server connections.
//! An admin API (and the CLI on it) creates tenants and pods; `podrouter demo` runs the whole
//! thing on local Postgres clusters. See ARCHITECTURE.md for the map.

#![forbid(unsafe_code)]

pub mod admin;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod demo;
pub mod failover;
pub mod fleet;
pub mod health;
pub mod http;
pub mod jobs;
pub mod limits;
pub mod localpg;
pub mod metrics;
pub mod mover;
pub mod planner;
pub mod podadmin;
pub mod protocol;
pub mod proxy;
pub mod routing;
pub mod service;
