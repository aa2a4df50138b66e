//! The executor: an OCI runtime spec becomes an isolated process. So far it
//! knows the host's cgroup layout; namespaces, rootfs and process setup come
//! with the executor issue.

pub mod cgroups;
