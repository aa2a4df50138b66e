//! The image store: references, registry pull, content store, layer unpack
//! and overlay snapshots. Built piece by piece; see the images issue.

pub mod auth;
pub mod authorizer;
pub mod content;
pub mod digest;
pub mod direct;
pub mod http_errors;
pub mod layers;
pub mod manifest;
pub mod mirrors;
pub mod pull;
pub mod reference;
pub mod snapshot;
pub mod store;
#[cfg(test)]
mod test_http;
pub mod token;
pub mod unpack;
