//! The `berth` command-line tool as a library: the command line ([`args`]), the requests it
//! makes ([`request`]), what it prints for people ([`view`], [`output`]) and for
//! scripts ([`json`]), and [`run`], which makes the calls. The binary only parses, runs and
//! turns the result into an exit status.

pub mod args;
mod commands;
pub mod holder;
pub mod json;
pub mod lease;
pub mod output;
pub mod request;
pub mod view;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

pub use args::Cli;
pub use commands::{check, run};

use crate::{Client, ClientError, TlsFiles};
use lease::Signal;

/// The server that the CLI talks to and how: each connection the CLI makes (the verb's, the
/// lease of `launch --attach`, the session holder's) is made from this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub addr: String,
    pub tls: TlsFiles,
}

impl Server {
    pub async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect_with(&self.addr, &self.tls).await
    }
}

/// Exit status of a failed call, or of awaited workers that failed.
pub const EXIT_FAILURE: u8 = 1;

/// Exit status of a usage error (what clap refuses).
pub const EXIT_USAGE: u8 = 2;

/// How a verb that ran to the end came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The calls went through, but awaited (or attached) workers failed.
    WorkersFailed,
    /// A signal (Ctrl-C) while following launched workers: they keep running (`--wait`, or
    /// `--attach --session`), or their session was closed (plain `--attach`).
    Interrupted(Signal),
}

impl Outcome {
    pub fn exit_status(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::WorkersFailed => EXIT_FAILURE,
            // 128 + the signal, as shells report a command that a signal ended (Ctrl-C: 130).
            Outcome::Interrupted(s) => 128 + s.number(),
        }
    }
}

/// Why a verb could not run to the end. Printed as `berth: <this>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server could not be reached (gRPC clients call that UNAVAILABLE), or the address or
    /// the TLS material cannot be used (INVALID_ARGUMENT).
    #[error("{}: {}", connect_code(.0), error_chain(.0))]
    Connect(#[source] ClientError),
    /// The server refused or failed a call.
    #[error("{}", describe_call(.method, .status, .hint.as_deref()))]
    Call {
        /// `Service/Method`.
        method: &'static str,
        status: tonic::Status,
        /// What the user may have meant, where the code alone says little.
        hint: Option<String>,
    },
    #[error("cannot use the current directory as --workdir (pass --workdir): {0}")]
    CurrentDir(#[source] std::io::Error),
    /// The signal handlers or the lease thread of `--attach` could not be set up.
    #[error("cannot hold a session while attached: {0}")]
    Attach(#[source] std::io::Error),
    /// `session open --hold-while PID` names no live process.
    #[error("--hold-while {pid}: no such process")]
    NoProcess { pid: u32 },
    /// An output destination of the session holder cannot be opened for writing.
    #[error("cannot write to {}: {source}", .path.display())]
    Destination {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The session holder could not be started (or, in the holder, set up).
    #[error("cannot start the session holder: {0}")]
    Holder(#[source] std::io::Error),
    #[error("write output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    pub fn exit_status(&self) -> u8 {
        EXIT_FAILURE
    }

    /// A reader that went away (`berth logs … | head`): nothing left to say to it.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The gRPC code of a refused call.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CliError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// The code that `--json` reports: the server's for a refused call, UNAVAILABLE when it
    /// cannot be reached, INVALID_ARGUMENT for an argument found wrong here (the TLS files
    /// too), UNKNOWN for a local failure.
    pub fn code_name(&self) -> &'static str {
        match self {
            CliError::Connect(e) => connect_code(e),
            CliError::Call { status, .. } => code_name(status.code()),
            CliError::CurrentDir(_) => "FAILED_PRECONDITION",
            CliError::NoProcess { .. } | CliError::Destination { .. } => "INVALID_ARGUMENT",
            CliError::Attach(_) | CliError::Holder(_) | CliError::Output(_) => "UNKNOWN",
        }
    }

    /// What went wrong, without the code: the server's message for a refused call.
    pub fn message(&self) -> String {
        match self {
            CliError::Connect(e) => error_chain(e),
            CliError::Call {
                method,
                status,
                hint,
            } => call_message(method, status, hint.as_deref()),
            e => error_chain(e),
        }
    }

    /// The error document of `--json`, the one line written on stderr.
    pub fn to_json(&self) -> String {
        json::error(self.code_name(), &self.message())
    }
}

/// Whether a command line asks for `--json` (before any `--`): then even a usage error is told
/// as a JSON document.
pub fn wants_json<I: IntoIterator<Item = OsString>>(args: I) -> bool {
    args.into_iter()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// The error document of a usage error, as one line: INVALID_ARGUMENT with the first line of
/// clap's text.
pub fn usage_error_json(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let message = first.strip_prefix("error: ").unwrap_or(first).trim();
    json::error("INVALID_ARGUMENT", message)
}

/// The canonical name of a gRPC status code, as in the gRPC spec: `INVALID_ARGUMENT`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The code of a connection that could not be made: UNAVAILABLE when the server cannot be
/// reached, INVALID_ARGUMENT when what was given to reach it cannot be used.
fn connect_code(e: &ClientError) -> &'static str {
    if e.is_misconfigured() {
        "INVALID_ARGUMENT"
    } else {
        "UNAVAILABLE"
    }
}

/// `CODE: message`.
fn describe_call(method: &str, status: &tonic::Status, hint: Option<&str>) -> String {
    format!(
        "{}: {}",
        code_name(status.code()),
        call_message(method, status, hint)
    )
}

/// The server's message, and the hint; a status without message names the method instead.
fn call_message(method: &str, status: &tonic::Status, hint: Option<&str>) -> String {
    let mut s = if status.message().is_empty() {
        match status.code() {
            tonic::Code::Unimplemented => format!("{method} is not served here"),
            _ => format!("{method} failed"),
        }
    } else {
        status.message().to_owned()
    };
    if let Some(h) = hint {
        s.push_str(" (");
        s.push_str(h);
        s.push(')');
    }
    s
}

/// An error and its sources, `a: b: c`, leaving out a source that its parent already quotes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Where `berth` writes: its standard output and standard error (buffers in tests).
pub struct Terminal<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
}

impl std::fmt::Debug for Terminal<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Terminal")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_errors_read_code_then_message() {
        let e = CliError::Call {
            method: "berth.v1.Workers/LaunchWorkers",
            status: tonic::Status::invalid_argument("cpu: must be > 0"),
            hint: None,
        };
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: cpu: must be > 0");
        assert_eq!(e.exit_status(), 1);
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
        let e = CliError::Call {
            method: "berth.v1.Cluster/ListHosts",
            status: tonic::Status::unimplemented(""),
            hint: Some("needs a scheduler".into()),
        };
        assert_eq!(
            e.to_string(),
            "UNIMPLEMENTED: berth.v1.Cluster/ListHosts is not served here (needs a scheduler)"
        );
        let e = CliError::Call {
            method: "M",
            status: tonic::Status::internal(""),
            hint: None,
        };
        assert_eq!(e.to_string(), "INTERNAL: M failed");
    }

    #[test]
    fn json_errors_carry_code_and_message() {
        let e = CliError::Call {
            method: "berth.v1.Workers/LaunchWorkers",
            status: tonic::Status::resource_exhausted("cpu: 64 asked, 2 free"),
            hint: None,
        };
        assert_eq!(
            e.to_json(),
            r#"{"error":{"code":"RESOURCE_EXHAUSTED","message":"cpu: 64 asked, 2 free"}}"#
        );
        let message = |e: &CliError| {
            let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
            v["error"]["message"].as_str().unwrap().to_owned()
        };
        let e = CliError::Call {
            method: "M",
            status: tonic::Status::unimplemented(""),
            hint: Some("needs a scheduler".into()),
        };
        assert_eq!(message(&e), "M is not served here (needs a scheduler)");
        let e = CliError::NoProcess { pid: 7 };
        assert_eq!(e.code_name(), "INVALID_ARGUMENT");
        assert_eq!(message(&e), "--hold-while 7: no such process");
        assert_eq!(
            CliError::from(std::io::Error::other("x")).code_name(),
            "UNKNOWN"
        );
    }

    #[test]
    fn json_is_asked_for_before_the_command() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(wants_json(args(&["berth", "--json", "list"])));
        assert!(wants_json(args(&["berth", "list", "--json"])));
        assert!(!wants_json(args(&["berth", "list"])));
        assert!(
            !wants_json(args(&["--json"])),
            "the program name is no flag"
        );
        assert!(!wants_json(args(&[
            "berth", "launch", "--", "prog", "--json"
        ])));
    }

    #[test]
    fn usage_errors_as_json() {
        use clap::Parser;
        let e = Cli::try_parse_from(["berth", "--json", "launch", "--count", "x"]).unwrap_err();
        let v: serde_json::Value = serde_json::from_str(&usage_error_json(&e)).unwrap();
        assert_eq!(v["error"]["code"], "INVALID_ARGUMENT");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.starts_with("invalid value 'x'"), "{m}");
        assert!(!m.contains('\n'), "{m}");
    }

    #[test]
    fn outcomes_exit_with_their_status() {
        assert_eq!(Outcome::Success.exit_status(), 0);
        assert_eq!(Outcome::WorkersFailed.exit_status(), 1);
        assert_eq!(Outcome::Interrupted(Signal::Interrupt).exit_status(), 130);
        assert_eq!(Outcome::Interrupted(Signal::Terminate).exit_status(), 143);
        assert_eq!(Outcome::Interrupted(Signal::Hangup).exit_status(), 129);
    }

    #[test]
    fn code_names() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        // Every code maps to its own name.
        let names: std::collections::BTreeSet<&str> =
            (0..=16).map(|i| code_name(tonic::Code::from(i))).collect();
        assert_eq!(names.len(), 17);
    }

    #[test]
    fn chains_sources_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Quoting(#[source] std::io::Error);
        let e = Quoting(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }

    /// A verb with `--tls-ca`, `--tls-cert`, `--tls-key` against a server that requires a client
    /// certificate: the flags reach the connection, and the server sees alice's certificate.
    #[tokio::test]
    async fn verbs_connect_with_the_tls_flags() {
        use crate::pki::Pki;
        use clap::Parser;

        /// A host that names its caller: alice by her certificate.
        struct NamesCaller(Vec<u8>);
        #[tonic::async_trait]
        impl crate::pb::host_server::Host for NamesCaller {
            async fn get_host_info(
                &self,
                r: tonic::Request<crate::pb::GetHostInfoRequest>,
            ) -> Result<tonic::Response<crate::pb::HostInfo>, tonic::Status> {
                let who = match r.peer_certs() {
                    Some(c) if c.first().map(|d| d.as_ref()) == Some(&self.0[..]) => "alice",
                    Some(_) => "someone else",
                    None => "nobody",
                };
                Ok(tonic::Response::new(crate::pb::HostInfo {
                    name: who.into(),
                    ..Default::default()
                }))
            }
        }

        async fn berth(args: &[&str]) -> Result<String, CliError> {
            let cli =
                Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied())).unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let mut term = Terminal {
                out: &mut out,
                err: &mut err,
            };
            run(cli, &mut term).await?;
            Ok(String::from_utf8(out).unwrap())
        }

        let pki = Pki::new();
        let (incoming, port) = crate::pki::listen().await;
        tokio::spawn(
            pki.server()
                .add_service(crate::pb::host_server::HostServer::new(NamesCaller(
                    pki.client_der.clone(),
                )))
                .serve_with_incoming(incoming),
        );
        let addr = format!("127.0.0.1:{port}");
        let (ca, cert, key) = (
            pki.ca.to_str().unwrap(),
            pki.client_cert.to_str().unwrap(),
            pki.client_key.to_str().unwrap(),
        );
        let tls = ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key];

        let out = berth(&[&["--addr", &addr, "--json"][..], &tls, &["info"]].concat())
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["name"], "alice", "{out}");
        // Global flags: after the verb too.
        let out = berth(&[&["info", "--addr", &addr][..], &tls].concat())
            .await
            .unwrap();
        assert!(out.starts_with("name         alice\n"), "{out}");

        // Without a certificate the server refuses the caller.
        let e = berth(&["--addr", &addr, "--tls-ca", ca, "info"])
            .await
            .unwrap_err();
        assert!(
            matches!(e.code_name(), "UNAVAILABLE" | "UNKNOWN"),
            "{e}: {}",
            e.code_name()
        );
        // Without TLS the server is not reached.
        assert!(berth(&["--addr", &addr, "info"]).await.is_err());
        // A certificate without its key: named, and no connection tried.
        let e = berth(&["--addr", &addr, "--tls-ca", ca, "--tls-cert", cert, "info"])
            .await
            .unwrap_err();
        assert_eq!(e.code_name(), "INVALID_ARGUMENT", "{e}");
        assert_eq!(
            e.message(),
            "--tls-cert (BERTH_TLS_CERT) is given without --tls-key (BERTH_TLS_KEY): a client \
             certificate goes with its key"
        );
        assert!(
            e.to_string().starts_with("INVALID_ARGUMENT: --tls-cert"),
            "{e}"
        );
    }

    #[test]
    fn broken_pipe_is_quiet() {
        let e = CliError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(e.is_broken_pipe());
        assert!(!CliError::from(std::io::Error::other("disk full")).is_broken_pipe());
    }
}
