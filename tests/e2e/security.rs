//! The security model end to end, with real users made for the test (`useradd`), real daemons,
//! and the CLI run as those users (`setpriv`): who a caller is on the Unix socket, on loopback
//! TCP and over mTLS; that a worker runs as its caller with no privileges; that nobody sees or
//! stops another user's workers; what root and admins may do; and what the daemons refuse at
//! start. Needs root (skips otherwise).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use berth_tests::cluster::SchedulerNode;
use berth_tests::users::{cli_in, output_past_etxtbsy, TestGroup, TestUser};
use berth_tests::{
    await_all, bin, command_request, free_port, ids_of, is_root, launch, output_of, pb, scaled,
    worker_nofile_hard, Daemon, DaemonOptions,
};
use serde_json::Value;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (users, cgroups, network namespaces)");
            return;
        }
    };
}

/// What a worker prints about itself: its ids, capabilities, no_new_privs, limits, umask and
/// oom_score_adj, from the kernel's view of it.
const SELF_REPORT: &str =
    "grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' \
     /proc/self/status; echo NOFILE $(ulimit -Sn) $(ulimit -Hn); echo UMASK $(umask); \
     echo OOM $(cat /proc/self/oom_score_adj); echo NICE $(nice); echo HOME=$HOME USER=$USER";

/// A daemon that `group`'s members may reach on its Unix socket, with `extra` config.
async fn daemon_for(group: &TestGroup, extra: &str) -> Daemon {
    Daemon::start_with(DaemonOptions {
        tcp: true,
        config: format!(
            "socket_group = \"{}\"\nworker_user = \"nobody\"\n{extra}",
            group.name
        ),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// `berth --json ARGS` as `user` against `addr`; the parsed stdout (or stderr's error document)
/// and whether it succeeded.
fn berth_as(user: &TestUser, cli: &Path, addr: &str, args: &[&str]) -> (bool, Value, Output) {
    let run = || {
        user.command(cli)
            // The user's workers start here (clients send their directory as the workdir).
            .current_dir("/tmp")
            .arg("--addr")
            .arg(addr)
            .arg("--json")
            .args(args)
            .env_remove("BERTH_ADDR")
            .output()
            .unwrap()
    };
    let out = output_past_etxtbsy(run);
    let text = if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    };
    let v = serde_json::from_slice(text).unwrap_or(Value::Null);
    (out.status.success(), v, out)
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// The worker ids of a CLI worker list.
fn ids(v: &Value) -> Vec<String> {
    v["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `key:` in a /proc/self/status report (whitespace collapsed).
fn field(report: &str, key: &str) -> String {
    report
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no {key} in:\n{report}"))
}

fn line_after<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in:\n{report}"))
        .trim()
}

/// Checks that `report` (a worker's SELF_REPORT) is that of `uid`/`gid` with nothing more.
fn assert_unprivileged(report: &str, uid: u32, gid: u32) {
    assert_eq!(
        field(report, "Uid"),
        format!("{uid} {uid} {uid} {uid}"),
        "{report}"
    );
    assert_eq!(
        field(report, "Gid"),
        format!("{gid} {gid} {gid} {gid}"),
        "{report}"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(report, cap), "0000000000000000", "{cap}: {report}");
    }
    assert_eq!(field(report, "NoNewPrivs"), "1", "{report}");
    // The daemon runs at -900 with 2^20 files (as systemd starts it, and as the harness does):
    // the worker has its own.
    assert_eq!(
        line_after(report, "NOFILE"),
        format!("1024 {}", worker_nofile_hard()),
        "{report}"
    );
    assert_eq!(line_after(report, "UMASK"), "0022", "{report}");
    assert_eq!(line_after(report, "OOM"), "0", "{report}");
    // The harness runs the daemon at -5, as the unit does.
    assert_eq!(line_after(report, "NICE"), "0", "{report}");
}

/// Launches SELF_REPORT as `user` and returns (worker id, its report).
async fn self_report_as(d: &Daemon, user: &TestUser, cli: &Path, addr: &str) -> (String, String) {
    let (ok, v, out) = berth_as(user, cli, addr, &["launch", "--", "sh", "-c", SELF_REPORT]);
    assert!(ok, "launch as {}: {out:?}\n{}", user.name, d.log());
    let id = ids(&v).remove(0);
    assert_eq!(v["workers"][0]["owner"], user.name.as_str(), "{v}");
    assert_eq!(v["workers"][0]["user"], user.name.as_str(), "{v}");
    let c = d.client().await.unwrap();
    let w = await_all(&c, std::slice::from_ref(&id)).await.unwrap();
    assert_eq!(w[0].status, pb::WorkerStatus::Succeeded as i32, "{w:?}");
    let report = output_of(&c, &id, pb::Stream::Stdout).await.unwrap();
    (id, String::from_utf8_lossy(&report).into_owned())
}

#[tokio::test]
async fn a_worker_runs_as_its_caller_without_privileges_over_the_socket_and_loopback_tcp() {
    require_root!();
    let group = TestGroup::create().unwrap();
    let alice = TestUser::create(&[&group]).unwrap();
    let d = daemon_for(&group, "").await;
    let cli = cli_in(&d.dir).unwrap();

    let (_, report) = self_report_as(&d, &alice, &cli, &d.addr()).await;
    assert_unprivileged(&report, alice.uid, alice.gid);
    assert!(
        report.contains(&format!("HOME=/nonexistent USER={}", alice.name)),
        "{report}"
    );
    // Supplementary groups come from the user's entry: its own group and the socket group.
    let groups = field(&report, "Groups");
    assert!(
        groups.split(' ').any(|g| g == group.gid.to_string()),
        "{groups}"
    );

    // Over loopback TCP the caller is the owner of the peer socket, found in the kernel.
    let tcp = d.tcp.clone().unwrap();
    let (_, report) = self_report_as(&d, &alice, &cli, &tcp).await;
    assert_unprivileged(&report, alice.uid, alice.gid);
}

#[tokio::test]
async fn nobody_sees_or_stops_another_users_workers_and_root_sees_all() {
    require_root!();
    let group = TestGroup::create().unwrap();
    let alice = TestUser::create(&[&group]).unwrap();
    let bob = TestUser::create(&[&group]).unwrap();
    let d = daemon_for(&group, "").await;
    let cli = cli_in(&d.dir).unwrap();
    let addr = d.addr();

    // A long lease: a slow tier must not end the session while bob tries his commands.
    let (ok, v, out) = berth_as(&alice, &cli, &addr, &["session", "open", "--ttl", "600"]);
    assert!(ok, "{out:?}");
    let session = v["id"].as_str().unwrap().to_owned();
    let (ok, v, out) = berth_as(
        &alice,
        &cli,
        &addr,
        &["launch", "--session", &session, "--", "sleep", "300"],
    );
    assert!(ok, "{out:?}");
    let id = ids(&v).remove(0);

    // Bob lists nothing of alice's, and naming her worker or session is PERMISSION_DENIED.
    let (ok, v, _) = berth_as(&bob, &cli, &addr, &["list"]);
    assert!(ok);
    assert!(ids(&v).is_empty(), "bob sees {v}");
    for args in [
        vec!["list", &id],
        vec!["list", "--session", &session],
        vec!["logs", &id],
        vec!["await", &id, "--timeout", "1"],
        vec!["stop", &id],
        vec!["stop", "--session", &session],
        vec!["session", "keepalive", &session],
        vec!["session", "close", &session],
    ] {
        let (ok, v, out) = berth_as(&bob, &cli, &addr, &args);
        assert!(!ok, "bob {args:?} succeeded: {out:?}");
        assert_eq!(error_code(&v), "PERMISSION_DENIED", "bob {args:?}: {out:?}");
    }
    // `stop --all` stops bob's own: none, and alice's worker runs on.
    let (ok, v, out) = berth_as(&bob, &cli, &addr, &["stop", "--all"]);
    assert!(ok, "{out:?}");
    assert!(ids(&v).is_empty(), "{v}");

    // Alice sees hers; root sees it with its owner.
    let (ok, v, _) = berth_as(&alice, &cli, &addr, &["list"]);
    assert!(ok);
    assert_eq!(ids(&v), vec![id.clone()]);
    assert_eq!(v["workers"][0]["status"], "WORKER_STATUS_RUNNING", "{v}");
    let c = d.client().await.unwrap();
    let all = c
        .workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    let w = all
        .iter()
        .find(|w| w.id == id)
        .expect("root sees alice's worker");
    assert_eq!(
        (w.owner.as_str(), w.user.as_str()),
        (alice.name.as_str(), alice.name.as_str())
    );
    assert_eq!(w.status, pb::WorkerStatus::Running as i32);

    // Alice's `stop --all` stops it.
    let (ok, v, out) = berth_as(&alice, &cli, &addr, &["stop", "--all", "--grace", "0"]);
    assert!(ok, "{out:?}");
    assert_eq!(ids(&v), vec![id]);
}

#[tokio::test]
async fn root_launches_run_as_worker_user_and_root_workers_need_the_config() {
    require_root!();
    let group = TestGroup::create().unwrap();
    let d = daemon_for(&group, "").await;
    let c = d.client().await.unwrap();
    let ws = launch(&c, command_request(1, &["sh", "-c", SELF_REPORT])).await;
    assert_eq!(
        (ws[0].owner.as_str(), ws[0].user.as_str()),
        ("root", "nobody")
    );
    let done = await_all(&c, &[ws[0].id.clone()]).await.unwrap();
    assert_eq!(done[0].status, pb::WorkerStatus::Succeeded as i32);
    let report = output_of(&c, &ws[0].id, pb::Stream::Stdout).await.unwrap();
    assert_unprivileged(&String::from_utf8_lossy(&report), 65534, 65534);

    // run_as_root is refused where the host does not allow root workers...
    let mut req = command_request(1, &["true"]);
    req.run_as_root = true;
    let e = c.workers().launch_workers(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("allow_root_workers"), "{e:?}");
    drop(d);

    // ...and where it does, a root worker keeps only the listed capabilities.
    let d = daemon_for(
        &group,
        "allow_root_workers = true\nroot_worker_capabilities = [\"CAP_NET_BIND_SERVICE\"]\n",
    )
    .await;
    let c = d.client().await.unwrap();
    let mut req = command_request(1, &["sh", "-c", SELF_REPORT]);
    req.run_as_root = true;
    let ws = launch(&c, req).await;
    assert_eq!(ws[0].user, "root");
    await_all(&c, &[ws[0].id.clone()]).await.unwrap();
    let report =
        String::from_utf8_lossy(&output_of(&c, &ws[0].id, pb::Stream::Stdout).await.unwrap())
            .into_owned();
    assert_eq!(field(&report, "Uid"), "0 0 0 0", "{report}");
    for cap in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(field(&report, cap), "0000000000000400", "{cap}: {report}");
    }
    assert_eq!(field(&report, "NoNewPrivs"), "1", "{report}");

    // A user who is not an admin may not ask for root workers even here.
    let alice = TestUser::create(&[&group]).unwrap();
    let cli = cli_in(&d.dir).unwrap();
    let (ok, v, out) = berth_as(
        &alice,
        &cli,
        &d.addr(),
        &["launch", "--run-as-root", "--", "true"],
    );
    assert!(!ok, "{out:?}");
    assert_eq!(error_code(&v), "PERMISSION_DENIED", "{out:?}");
}

#[tokio::test]
async fn admins_see_and_stop_everything() {
    require_root!();
    let group = TestGroup::create().unwrap();
    let admins = TestGroup::create().unwrap();
    let alice = TestUser::create(&[&group]).unwrap();
    let carol = TestUser::create(&[&group, &admins]).unwrap();
    let d = daemon_for(&group, &format!("admin_group = \"{}\"\n", admins.name)).await;
    let cli = cli_in(&d.dir).unwrap();
    let addr = d.addr();
    let (ok, v, out) = berth_as(&alice, &cli, &addr, &["launch", "--", "sleep", "300"]);
    assert!(ok, "{out:?}");
    let id = ids(&v).remove(0);
    let (ok, v, _) = berth_as(&carol, &cli, &addr, &["list"]);
    assert!(ok);
    assert_eq!(ids(&v), vec![id.clone()]);
    let (ok, v, out) = berth_as(&carol, &cli, &addr, &["stop", &id, "--grace", "0"]);
    assert!(ok, "{out:?}");
    assert_eq!(v["workers"][0]["status"], "WORKER_STATUS_STOPPED", "{v}");
}

#[tokio::test]
async fn what_a_worker_cannot_enter_is_refused_at_admission() {
    require_root!();
    let group = TestGroup::create().unwrap();
    let alice = TestUser::create(&[&group]).unwrap();
    let d = daemon_for(&group, "").await;
    let cli = cli_in(&d.dir).unwrap();
    // Root's private directory, with a script in it.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        private.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(private.path().join("train.py"), "print(1)\n").unwrap();
    let p = private.path().to_str().unwrap();
    for args in [
        vec!["launch", "--workdir", p, "--", "true"],
        vec!["launch", "--script", &format!("{p}/train.py")],
    ] {
        let (ok, v, out) = berth_as(&alice, &cli, &d.addr(), &args);
        assert!(!ok, "{args:?}: {out:?}");
        assert_eq!(error_code(&v), "FAILED_PRECONDITION", "{args:?}: {out:?}");
    }
    // Root's launch runs as `nobody`, who cannot enter it either.
    let c = d.client().await.unwrap();
    let mut req = command_request(1, &["true"]);
    req.workdir = p.to_owned();
    let e = c.workers().launch_workers(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // Nothing was admitted.
    let all = c
        .workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(all.is_empty(), "{all:?}");
}

#[tokio::test]
async fn the_socket_and_the_state_dir_are_private() {
    require_root!();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let group = TestGroup::create().unwrap();
    let d = daemon_for(&group, "").await;
    let m = std::fs::metadata(d.addr().trim_start_matches("unix:")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), group.gid);
    let m = std::fs::metadata(d.state_dir()).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    assert_eq!(m.uid(), 0);
    // A worker's spec record holds its environment: root's alone, inside the private dir too.
    let c = d.client().await.unwrap();
    let mut req = command_request(1, &["true"]);
    req.env.insert("TOKEN".into(), "secret".into());
    let w = launch(&c, req).await;
    let spec = d
        .state_dir()
        .join("workers")
        .join(&w[0].id)
        .join("spec.json");
    let m = std::fs::metadata(&spec).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", spec.display());
    await_all(&c, &ids_of(&w)).await.unwrap();
    // A user outside the socket's group cannot connect at all.
    let outsider = TestUser::create(&[]).unwrap();
    let cli = cli_in(&d.dir).unwrap();
    let (ok, _, out) = berth_as(&outsider, &cli, &d.addr(), &["list"]);
    assert!(!ok, "{out:?}");
    drop(d);

    // Without the group, the socket is root's alone.
    let d = Daemon::start_with(DaemonOptions {
        config: "socket_group = \"no-such-group-berth\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let m = std::fs::metadata(d.addr().trim_start_matches("unix:")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert!(
        d.log().contains("socket_group does not exist"),
        "{}",
        d.log()
    );
}

#[tokio::test]
async fn a_plaintext_listener_beyond_loopback_is_refused_at_start() {
    require_root!();
    let port = free_port();
    for flag in ["--listen", "--metrics-listen"] {
        let started = Daemon::start_with(DaemonOptions {
            args: vec![flag.into(), format!("0.0.0.0:{port}")],
            ..Default::default()
        })
        .await;
        match started {
            Err(e) => {
                let e = format!("{e:#}");
                assert!(
                    e.contains("plaintext listener beyond loopback"),
                    "{flag}: {e}"
                );
            }
            // Whatever the harness saw, nothing may listen in plaintext on that port.
            Ok(d) => assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "{flag} 0.0.0.0:{port} serves plaintext:\n{}",
                d.log()
            ),
        }
    }
    // With insecure_plaintext it starts, and says so loudly.
    let d = Daemon::start_with(DaemonOptions {
        config: "insecure_plaintext = true\n".into(),
        args: vec![
            "--listen".into(),
            format!("0.0.0.0:{port}"),
            "--listen".into(),
            "unix:".to_owned(),
        ],
        ..Default::default()
    })
    .await;
    // (The harness reaches daemons on their Unix socket; an empty path cannot be served, so
    // this start fails for that reason, after the plaintext check passed.)
    if let Err(e) = d {
        assert!(
            !format!("{e:#}").contains("plaintext listener beyond loopback"),
            "{e:#}"
        );
    }
}

/// A CA and the certificates of a test cluster, as PEM files in a directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "berth test CA");
        let ca =
            rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate named `cn` (server and client usage, valid for localhost and 127.0.0.1);
    /// returns (cert, key) paths.
    fn issue(&self, cn: &str) -> (PathBuf, PathBuf) {
        let mut p =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{cn}.pem")),
            self.dir.path().join(format!("{cn}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn tls_toml(&self, cn: &str) -> String {
        let (c, k) = self.issue(cn);
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            c.display(),
            k.display(),
            self.ca().display()
        )
    }
}

#[tokio::test]
async fn mtls_requires_a_certificate_and_maps_its_name_to_a_user() {
    require_root!();
    let group = TestGroup::create().unwrap();
    let alice = TestUser::create(&[&group]).unwrap();
    let pki = Pki::new();
    let (cert, key) = pki.issue("alice-laptop");
    // [users] and [tls] are tables: they come last in the config.
    let d = daemon_for(
        &group,
        &format!(
            "{}[users]\n\"alice-laptop\" = \"{}\"\n",
            pki.tls_toml("localhost"),
            alice.name
        ),
    )
    .await;
    let addr = d.tcp.clone().unwrap();
    let cli = bin("berth");
    let run = |extra: &[&str], args: &[&str]| {
        std::process::Command::new(&cli)
            .current_dir("/tmp")
            .arg("--addr")
            .arg(&addr)
            .arg("--json")
            .args(extra)
            .args(args)
            .env_remove("BERTH_ADDR")
            .output()
            .unwrap()
    };
    let ca = pki.ca();
    let ca = ca.to_str().unwrap();
    // Plaintext to a TLS listener, and TLS without a client certificate: refused.
    assert!(!run(&[], &["list"]).status.success());
    let out = run(&["--tls-ca", ca], &["list"]);
    assert!(!out.status.success(), "{out:?}");
    // With a certificate the CA signed: accepted, and the caller is the mapped user.
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let out = run(
        &["--tls-ca", ca, "--tls-cert", c, "--tls-key", k],
        &["launch", "--", "sh", "-c", SELF_REPORT],
    );
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["workers"][0]["owner"], alice.name.as_str(), "{v}");
    assert_eq!(v["workers"][0]["user"], alice.name.as_str(), "{v}");
    let id = ids(&v).remove(0);
    let client = d.client().await.unwrap();
    await_all(&client, std::slice::from_ref(&id)).await.unwrap();
    let report = output_of(&client, &id, pb::Stream::Stdout).await.unwrap();
    assert_unprivileged(&String::from_utf8_lossy(&report), alice.uid, alice.gid);

    // A certificate from another CA is refused.
    let other = Pki::new();
    let (oc, ok) = other.issue("alice-laptop");
    let out = run(
        &[
            "--tls-ca",
            ca,
            "--tls-cert",
            oc.to_str().unwrap(),
            "--tls-key",
            ok.to_str().unwrap(),
        ],
        &["list"],
    );
    assert!(!out.status.success(), "{out:?}");
}

#[tokio::test]
async fn a_host_cannot_join_under_another_hosts_name() {
    require_root!();
    let pki = Pki::new();
    let (cert, key) = pki.issue("scheduler");
    let tls = berth_client::TlsFiles {
        ca: Some(pki.ca()),
        cert: Some(cert),
        key: Some(key),
    };
    let sched = SchedulerNode::start_with(&pki.tls_toml("localhost"), tls)
        .await
        .unwrap();
    // A host with the certificate of `h1` beats for `h1`, then claims `h2`.
    let (hc, hk) = pki.issue("h1");
    let host_tls = berth_client::TlsFiles {
        ca: Some(pki.ca()),
        cert: Some(hc),
        key: Some(hk),
    };
    let c = berth_client::Client::connect_with(&sched.addr, &host_tls)
        .await
        .unwrap();
    let mut m = pb::membership_client::MembershipClient::new(c.channel());
    let beat = |name: &str| pb::HeartbeatRequest {
        info: Some(pb::HostInfo {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            ..Default::default()
        }),
        sequence: 1,
        ..Default::default()
    };
    m.heartbeat(beat("h1")).await.expect("h1 joins as itself");
    let e = m.heartbeat(beat("h2")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("h1"), "{e:?}");
    let hosts = sched.hosts().await.unwrap();
    assert!(
        hosts
            .iter()
            .all(|h| h.info.as_ref().is_some_and(|i| i.name == "h1")),
        "{hosts:?}"
    );
}

#[tokio::test]
async fn through_the_scheduler_a_worker_runs_as_its_caller() {
    require_root!();
    let group = TestGroup::create().unwrap();
    let alice = TestUser::create(&[&group]).unwrap();
    let bob = TestUser::create(&[&group]).unwrap();
    let sched = SchedulerNode::start().await.unwrap();
    let host = berth_tests::cluster::start_host(&sched, 2.0, 2.0)
        .await
        .unwrap();
    sched
        .wait_hosts(&[host.name.as_str()], pb::HostState::Ready)
        .await
        .unwrap();
    let cli = cli_in(&host.dir).unwrap();
    // Alice calls the scheduler over loopback TCP; it forwards her to the host.
    let (ok, v, out) = berth_as(
        &alice,
        &cli,
        &sched.addr,
        &["launch", "--", "sh", "-c", SELF_REPORT],
    );
    assert!(ok, "{out:?}\n{}", sched.log());
    assert_eq!(v["workers"][0]["owner"], alice.name.as_str(), "{v}");
    assert_eq!(v["workers"][0]["user"], alice.name.as_str(), "{v}");
    let id = ids(&v).remove(0);
    let c = host.client().await.unwrap();
    await_all(&c, std::slice::from_ref(&id)).await.unwrap();
    let report = output_of(&c, &id, pb::Stream::Stdout).await.unwrap();
    assert_unprivileged(&String::from_utf8_lossy(&report), alice.uid, alice.gid);
    // Bob, through the scheduler, sees none of it.
    tokio::time::sleep(scaled(Duration::from_millis(300))).await;
    let (ok, v, _) = berth_as(&bob, &cli, &sched.addr, &["list"]);
    assert!(ok);
    assert!(ids(&v).is_empty(), "{v}");
    let (ok, v, out) = berth_as(&bob, &cli, &sched.addr, &["logs", &id]);
    assert!(!ok, "{out:?}");
    assert_eq!(error_code(&v), "PERMISSION_DENIED", "{out:?}");
}

/// The `openssl` commands of README's "Security model", run as written: the certificates they
/// make serve a daemon and let a user in as the account `[users]` maps their name to.
#[tokio::test]
async fn the_readme_certificates_work() {
    require_root!();
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        berth_tests::cannot_run("openssl is not installed");
        return;
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("# A CA, once")
        .expect("README's openssl commands");
    let script = &readme[start..start + readme[start..].find("```").unwrap()];
    let pki = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .args(["-eu", "-c", script])
        .current_dir(pki.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let f = |n: &str| pki.path().join(n).to_str().unwrap().to_owned();

    let group = TestGroup::create().unwrap();
    let alice = TestUser::create(&[&group]).unwrap();
    let d = daemon_for(
        &group,
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n[users]\nalice = \"{}\"\n",
            f("gpu-07.pem"),
            f("gpu-07.key"),
            f("ca.pem"),
            alice.name
        ),
    )
    .await;
    let out = std::process::Command::new(bin("berth"))
        .current_dir("/tmp")
        .args(["--addr", d.tcp.as_deref().unwrap(), "--json"])
        .args(["--tls-ca", &f("ca.pem"), "--tls-cert", &f("alice.pem")])
        .args([
            "--tls-key",
            &f("alice.key"),
            "launch",
            "--wait",
            "--",
            "id",
            "-u",
        ])
        .env_remove("BERTH_ADDR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["workers"][0]["owner"], alice.name.as_str(), "{v}");
    let id = ids(&v).remove(0);
    let c = d.client().await.unwrap();
    let uid = output_of(&c, &id, pb::Stream::Stdout).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&uid).trim(), alice.uid.to_string());
}
