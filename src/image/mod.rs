//! The image store: references, registry pull, content store, layer unpack
//! and overlay snapshots. Built piece by piece; see the images issue.

pub mod content;
pub mod digest;
pub mod mirrors;
pub mod reference;
pub mod unpack;
