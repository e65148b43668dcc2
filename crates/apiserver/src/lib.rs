//! The Kubernetes API server: the hub every component talks to and the only one that touches
//! the store. Request pipeline: TLS + authentication → discovery/OpenAPI → registry → store.

pub mod allocation;
pub mod certs;
pub mod cli;
pub mod discovery;
mod error;
pub mod heap;
pub mod managed;
pub mod metrics;
pub mod openapi;
mod partial;
pub mod patch;
pub mod protobuf;
mod proxy;
pub mod registry;
pub mod selector;
mod server;
pub mod strategy;
pub mod table;
pub mod testing;
mod tls;

pub use error::{Error, Result};
pub use server::{ApiServer, Config, User};
