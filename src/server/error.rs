//! The one place where berth's errors become gRPC statuses.
//!
//! Domain modules return their own `thiserror` enums; handlers turn them into
//! a [`tonic::Status`] here, so that the same failure always answers with the
//! same code whichever RPC met it.

use tonic::Status;

use crate::store::StoreError;

/// An RPC whose capability is not built yet. CRI clients treat
/// `Unimplemented` as "this runtime cannot do that", which is the truth;
/// a fake success would make kubelet believe a pod exists.
pub fn not_built(rpc: &str, capability: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented by berth yet: {capability} is still being built"
    ))
}

/// A field of a request that cannot be accepted as sent.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        Status::internal(format!("metadata store: {e}"))
    }
}
