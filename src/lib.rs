//! berth: a Kubernetes node runtime serving the CRI v1 API. The module map
//! and the rules that hold everywhere are in the project's DESIGN.md; `cli`
//! is where every command starts.

#![deny(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod bench;
pub mod check;
pub mod cli;
pub mod config;
pub mod container;
pub mod daemon;
pub mod events;
pub mod executor;
pub mod idle;
pub mod ids;
pub mod image;
pub mod locks;
pub mod logging;
pub mod logs;
pub mod monitor;
pub mod network;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod streaming;
