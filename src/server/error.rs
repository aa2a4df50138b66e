//! The one place where berth's errors become gRPC statuses.
//!
//! Domain modules return their own `thiserror` enums; handlers turn them into
//! a [`tonic::Status`] here, so that the same failure always answers with the
//! same code whichever RPC met it.

use tonic::Status;

use crate::container::ContainerError;
use crate::image::auth::AuthError;
use crate::image::mirrors::MirrorError;
use crate::image::pull::PullError;
use crate::image::store::ImageError;
use crate::sandbox::SandboxError;
use crate::store::StoreError;
use crate::streaming::TokenError;

/// A field of a request that cannot be accepted as sent.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        Status::internal(format!("metadata store: {e}"))
    }
}

impl From<ImageError> for Status {
    fn from(e: ImageError) -> Self {
        let message = e.to_string();
        match e {
            ImageError::Reference(_) | ImageError::Ambiguous { .. } => {
                Status::invalid_argument(message)
            }
            ImageError::Auth(AuthError::File { .. }) => Status::failed_precondition(message),
            ImageError::Auth(_) | ImageError::Pull(PullError::Auth(_)) => {
                Status::invalid_argument(message)
            }
            ImageError::InUse { .. }
            | ImageError::Pull(PullError::Mirrors(MirrorError::Blocked { .. })) => {
                Status::failed_precondition(message)
            }
            // What the registry said is in the message; kubelet reports it
            // as ErrImagePull whatever the code, as with containerd's Unknown.
            ImageError::Pull(_) => Status::unknown(message),
            ImageError::Store(_)
            | ImageError::Content(_)
            | ImageError::Layer(_)
            | ImageError::Task(_) => Status::internal(message),
        }
    }
}

impl From<SandboxError> for Status {
    fn from(e: SandboxError) -> Self {
        let message = e.to_string();
        match e {
            SandboxError::Invalid { .. } | SandboxError::Ambiguous { .. } => {
                Status::invalid_argument(message)
            }
            SandboxError::NameTaken { .. } => Status::already_exists(message),
            SandboxError::NotFound(_) => Status::not_found(message),
            SandboxError::Pin(crate::sandbox::namespaces::PinError::Sysctl(_)) => {
                Status::invalid_argument(message)
            }
            // A plugin's own words are in the message; kubelet retries.
            SandboxError::Network(_) => Status::unknown(message),
            SandboxError::Store(_)
            | SandboxError::Pin(_)
            | SandboxError::Files(_)
            | SandboxError::Cgroup(_)
            | SandboxError::Infra(_)
            | SandboxError::Io { .. }
            | SandboxError::Task(_) => Status::internal(message),
        }
    }
}

impl From<ContainerError> for Status {
    fn from(e: ContainerError) -> Self {
        let message = e.to_string();
        match e {
            ContainerError::Invalid { .. }
            | ContainerError::Ambiguous { .. }
            | ContainerError::Spec(_)
            | ContainerError::User(_) => Status::invalid_argument(message),
            ContainerError::NameTaken { .. } => Status::already_exists(message),
            ContainerError::NotFound(_) | ContainerError::ImageNotFound(_) => {
                Status::not_found(message)
            }
            // The host cannot apply what the pod asks: AppArmor's default
            // profile without apparmor_parser.
            ContainerError::WrongState { .. }
            | ContainerError::PodNotReady(_)
            | ContainerError::AppArmor(_) => Status::failed_precondition(message),
            ContainerError::Exec(crate::container::exec::ExecError::Timeout(_)) => {
                Status::deadline_exceeded(message)
            }
            ContainerError::Sandbox(e) => e.into(),
            ContainerError::Image(e) => e.into(),
            // The executor's own words (missing binary, bad mount) are the
            // message kubelet shows in the pod's events.
            ContainerError::Monitor(_) | ContainerError::Exec(_) => Status::unknown(message),
            ContainerError::Snapshot(_)
            | ContainerError::Cgroup(_)
            | ContainerError::Store(_)
            | ContainerError::Io { .. }
            | ContainerError::Task(_) => Status::internal(message),
        }
    }
}

impl From<TokenError> for Status {
    fn from(e: TokenError) -> Self {
        let message = e.to_string();
        match e {
            TokenError::TooManyInFlight => Status::resource_exhausted(message),
            TokenError::Random(_) => Status::internal(message),
        }
    }
}
