//! The one place where berth's errors become gRPC statuses.
//!
//! Domain modules return their own `thiserror` enums; handlers turn them into
//! a [`tonic::Status`] here, so that the same failure always answers with the
//! same code whichever RPC met it.

use tonic::Status;

use crate::container::ContainerError;
use crate::image::auth::AuthError;
use crate::image::http_errors::Refusal;
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
            // kubelet reports any failed pull as ErrImagePull with the
            // message, whatever the code (images/image_manager.go,
            // evalCRIPullErr); containerd and CRI-O answer Unknown even for
            // a registry's 401 or 403. A code that says the registry turned
            // the credentials away costs kubelet nothing and tells crictl
            // and other clients a login problem from a broken registry: 401
            // (none, wrong or expired credentials) is Unauthenticated, 403
            // (known, but not allowed to pull this) is PermissionDenied.
            // The rest is what the registry said, in the message.
            ImageError::Pull(pull) => match pull.refusal() {
                Some(Refusal::Unauthenticated) => Status::unauthenticated(message),
                Some(Refusal::Denied) => Status::permission_denied(message),
                None => Status::unknown(message),
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::token::TokenError;

    fn failed(attempts: Vec<PullError>) -> Status {
        ImageError::Pull(PullError::Failed {
            image: "registry.example/team/app:1".to_string(),
            attempts,
        })
        .into()
    }

    fn unreachable_mirror() -> PullError {
        PullError::Registry {
            endpoint: "https://mirror.example/team/app".to_string(),
            message: "connection refused".to_string(),
        }
    }

    fn refused(refusal: Refusal) -> PullError {
        PullError::Refused {
            endpoint: "https://registry.example/team/app".to_string(),
            what: "fetch manifest registry.example/team/app:1".to_string(),
            refusal,
            message: "no".to_string(),
        }
    }

    #[test]
    fn registry_refusals_are_unauthenticated_or_permission_denied() {
        let status = failed(vec![
            unreachable_mirror(),
            refused(Refusal::Unauthenticated),
        ]);
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        for needle in ["registry.example/team/app:1", "connection refused", "no"] {
            assert!(status.message().contains(needle), "{status:?}");
        }
        let status = failed(vec![refused(Refusal::Denied)]);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    #[test]
    fn a_token_service_refusal_counts_as_the_registry_s() {
        let token = PullError::Token(TokenError::Fetch {
            registry: "registry.example".to_string(),
            realm: "https://auth.example/token".to_string(),
            kind: "oauth",
            message: "POST answered HTTP 401 Unauthorized".to_string(),
            refusal: Some(Refusal::Unauthenticated),
        });
        let status = failed(vec![token]);
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }

    #[test]
    fn the_registry_s_own_verdict_wins_over_a_mirror_s() {
        let status = failed(vec![
            refused(Refusal::Denied),
            refused(Refusal::Unauthenticated),
        ]);
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }

    #[test]
    fn other_pull_failures_stay_unknown() {
        let status = failed(vec![unreachable_mirror()]);
        assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
        let token = PullError::Token(TokenError::Fetch {
            registry: "registry.example".to_string(),
            realm: "https://auth.example/token".to_string(),
            kind: "oauth",
            message: "POST answered HTTP 500".to_string(),
            refusal: None,
        });
        assert_eq!(failed(vec![token]).code(), tonic::Code::Unknown);
    }
}
