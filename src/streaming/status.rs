//! How a remote command ends, written on the error stream: a
//! `metav1.Status` JSON object for `v4.channel.k8s.io` and later (it carries
//! the exit code), the bare message for older protocols (nothing on
//! success). Field names and texts as kubelet's `remotecommand` package.

use serde::Serialize;

/// How an exec or attach ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The command ran and exited non-zero.
    ExitCode {
        code: i32,
        message: String,
    },
    /// The command could not be run, or the attach failed.
    Internal(String),
}

#[derive(Serialize)]
struct Status<'a> {
    metadata: Empty,
    status: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Details {
    causes: Vec<Cause>,
}

#[derive(Serialize)]
struct Cause {
    reason: &'static str,
    message: String,
}

impl Outcome {
    /// The v4+ error-stream payload.
    pub fn to_json(&self) -> Vec<u8> {
        let status = match self {
            Outcome::Success => Status {
                metadata: Empty {},
                status: "Success",
                message: "",
                reason: "",
                details: None,
                code: None,
            },
            Outcome::ExitCode { code, message } => Status {
                metadata: Empty {},
                status: "Failure",
                message,
                reason: "NonZeroExitCode",
                details: Some(Details {
                    causes: vec![Cause {
                        reason: "ExitCode",
                        message: code.to_string(),
                    }],
                }),
                code: None,
            },
            Outcome::Internal(message) => Status {
                metadata: Empty {},
                status: "Failure",
                message,
                reason: "InternalError",
                details: None,
                code: Some(500),
            },
        };
        serde_json::to_vec(&status).expect("a status always serializes")
    }

    /// The pre-v4 error-stream payload: the message, nothing on success.
    pub fn to_text(&self) -> Vec<u8> {
        match self {
            Outcome::Success => Vec::new(),
            Outcome::ExitCode { message, .. } | Outcome::Internal(message) => {
                message.as_bytes().to_vec()
            }
        }
    }

    /// An exec that ran `cmd` and exited with `code`.
    pub fn exited(cmd: &[String], code: i32) -> Outcome {
        if code == 0 {
            return Outcome::Success;
        }
        Outcome::ExitCode {
            code,
            message: format!(
                "command terminated with non-zero exit code: error executing command {cmd:?}, exit code {code}"
            ),
        }
    }

    pub fn exec_failed(error: impl std::fmt::Display) -> Outcome {
        Outcome::Internal(format!(
            "Internal error occurred: error executing command in container: {error}"
        ))
    }

    pub fn attach_failed(error: impl std::fmt::Display) -> Outcome {
        Outcome::Internal(format!(
            "Internal error occurred: error attaching to container: {error}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_is_a_bare_status() {
        assert_eq!(
            String::from_utf8(Outcome::Success.to_json()).expect("utf-8"),
            r#"{"metadata":{},"status":"Success"}"#
        );
        assert!(Outcome::Success.to_text().is_empty());
    }

    #[test]
    fn a_non_zero_exit_carries_the_code_as_client_go_reads_it() {
        let outcome = Outcome::exited(&["sh".into(), "-c".into(), "exit 3".into()], 3);
        let json: serde_json::Value = serde_json::from_slice(&outcome.to_json()).expect("json");
        assert_eq!(json["status"], "Failure");
        assert_eq!(json["reason"], "NonZeroExitCode");
        assert_eq!(json["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(json["details"]["causes"][0]["message"], "3");
        assert!(
            json["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("command terminated with non-zero exit code"))
        );
        assert_eq!(Outcome::exited(&[], 0), Outcome::Success);
    }

    #[test]
    fn internal_errors_are_code_500() {
        let outcome = Outcome::exec_failed("exec \"/bin/nope\": no such file or directory");
        let json: serde_json::Value = serde_json::from_slice(&outcome.to_json()).expect("json");
        assert_eq!(json["reason"], "InternalError");
        assert_eq!(json["code"], 500);
        assert!(
            String::from_utf8_lossy(&outcome.to_text()).contains("/bin/nope"),
            "v1 text carries the message"
        );
    }
}
