//! The streaming server's protocols (Exec/Attach/PortForward); today the SPDY/3.1 session.
pub mod spdy;
