//! Who is calling. Every request has a known caller, proven by the connection it came on:
//!
//! - on a Unix socket, the peer's uid from `SO_PEERCRED` (tonic's `UdsConnectInfo`);
//! - on a TCP connection from a loopback peer, the uid that owns the peer's socket, looked up
//!   once per connection in the kernel by the exact 4-tuple (sock_diag, as `ss -e` and identd
//!   find it; see [`IdentifiedTcp`]), so `grpcurl -plaintext 127.0.0.1:7300 …` is known as the
//!   user who ran it;
//! - elsewhere, the name in a verified TLS client certificate (CN, else the first DNS or URI
//!   SAN).
//!
//! A trusted peer (a scheduler listed in `trusted_schedulers`) may speak for the caller it
//! serves, in the [`CALLER_HEADER`] metadata; anyone else who sends it is refused. The
//! [`Policy`] turns what was proven into a [`Caller`]: the owner name that records carry and
//! that ownership compares, whether the caller is an admin (root, or a member of
//! `admin_group`), and the local account its workers run as.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use berth_core::error::{Error, Result};
use berth_sys::users::{self, Account};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TlsConnectInfo, UdsConnectInfo};
use tonic::Request;

/// Metadata in which a trusted scheduler names the caller it forwards a request for:
/// `user:NAME` (a local user name) or `cert:NAME` (a certificate name, mapped by `[users]`).
pub const CALLER_HEADER: &str = "x-berth-caller";

/// What a connection proved about its peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A local uid: a Unix socket peer, or the owner of a loopback TCP peer's socket.
    Uid(u32),
    /// A local user by name, as forwarded by a trusted scheduler.
    User(String),
    /// The subject of a verified client certificate.
    Cert(String),
    /// A peer without proven identity (plaintext beyond loopback, `insecure_plaintext = true`).
    Anonymous,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Uid(u) => write!(f, "uid:{u}"),
            Principal::User(n) => write!(f, "user:{n}"),
            Principal::Cert(n) => write!(f, "cert:{n}"),
            Principal::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// TLS material of a daemon: its certificate and key (served, and presented to the daemons it
/// calls), the CA that signs client certificates (`client_ca`: set, a client certificate is
/// required), and the CA that signs the servers it calls (`ca`; empty: `client_ca`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub ca: PathBuf,
}

impl TlsConfig {
    /// Whether TCP listeners serve TLS.
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }

    /// What this daemon presents when it calls another daemon, each file only where it is set:
    /// the CA of the server's certificate ([`Self::server_ca`]), its own certificate and key.
    pub fn client_files(&self) -> [Option<PathBuf>; 3] {
        let some = |p: &std::path::Path| (!p.as_os_str().is_empty()).then(|| p.to_path_buf());
        [some(self.server_ca()), some(&self.cert), some(&self.key)]
    }

    /// The CA that signs the servers this daemon calls.
    pub fn server_ca(&self) -> &std::path::Path {
        if self.ca.as_os_str().is_empty() {
            &self.client_ca
        } else {
            &self.ca
        }
    }
}

/// A `[tls]` table that can work: a certificate with its key, and a `client_ca` only beside
/// them.
pub fn check_tls_config(t: &TlsConfig) -> Result<(), crate::config::ConfigError> {
    let set = |p: &std::path::Path| !p.as_os_str().is_empty();
    let bad = |message: &str| {
        Err(crate::config::ConfigError::Invalid {
            key: "tls",
            message: message.into(),
        })
    };
    if set(&t.cert) != set(&t.key) {
        return bad("cert and key go together: set both or neither");
    }
    if set(&t.client_ca) && !set(&t.cert) {
        return bad(
            "client_ca needs cert and key (a TLS listener to require client certificates on)",
        );
    }
    Ok(())
}

/// Who may do what, as both daemons' configurations say (API.md, "Who may do what").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessConfig {
    /// Members act on every worker and session, as root does.
    pub admin_group: String,
    /// Whom the workers of root, of unmapped certificate names and of anonymous callers run as.
    pub worker_user: String,
    /// Plaintext beyond loopback allowed; identities there are taken as given.
    pub insecure_plaintext: bool,
    /// Certificate name → local user name.
    pub users: BTreeMap<String, String>,
    /// Peers whose forwarded caller is accepted: certificate names, or `uid:N`.
    pub trusted_schedulers: Vec<String>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            admin_group: "berth-admin".into(),
            worker_user: "nobody".into(),
            insecure_plaintext: false,
            users: BTreeMap::new(),
            trusted_schedulers: vec!["uid:0".into()],
        }
    }
}

/// The caller of one request, as the backends decide who may do what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The peer's address on a TCP connection (none on a Unix socket): what the workers of a
    /// launch see as `BERTH_MASTER_IP` unless the request names one.
    pub addr: Option<IpAddr>,
    /// Who the caller is (forwarded by a trusted scheduler, or proven by the connection).
    pub principal: Principal,
    /// The name that records carry as `owner` and that ownership compares.
    pub owner: String,
    /// Root, or a member of `admin_group`: sees and stops everything.
    pub admin: bool,
    /// The caller's local account, when it has one (an unmapped certificate name, an anonymous
    /// peer or a uid without a passwd entry has none).
    pub account: Option<Account>,
}

impl Caller {
    /// A caller with every right and the daemon's own identity: for code paths that act for the
    /// daemon itself (and unit tests of the backends).
    pub fn daemon() -> Self {
        Self {
            addr: None,
            principal: Principal::Uid(0),
            owner: "root".into(),
            admin: true,
            account: None,
        }
    }

    /// Whether this caller may see and act on what `owner` owns.
    pub fn may_touch(&self, owner: &str) -> bool {
        self.admin || self.owner == owner
    }

    /// Refuses, naming `what`, unless this caller may act on what `owner` owns.
    pub fn check_owns(&self, owner: &str, what: &str) -> Result<()> {
        if self.may_touch(owner) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "{what} belongs to another user"
            )))
        }
    }

    /// Whether this caller is root (by uid, or a forwarded root).
    pub fn is_root(&self) -> bool {
        self.account.as_ref().is_some_and(|a| a.uid == 0)
    }

    /// The value of [`CALLER_HEADER`] that forwards this caller to a host: the local user name
    /// where the caller has an account (a host resolves it in its own passwd), else what the
    /// connection proved.
    pub fn forward(&self) -> String {
        match (&self.account, &self.principal) {
            (Some(a), _) => format!("user:{}", a.name),
            (None, Principal::Cert(n)) => format!("cert:{n}"),
            (None, Principal::User(n)) => format!("user:{n}"),
            (None, Principal::Uid(u)) => format!("uid:{u}"),
            (None, Principal::Anonymous) => "anonymous".into(),
        }
    }
}

/// What the listeners tell about a TCP connection: its addresses, and the uid that owns the
/// peer's socket where the peer is on this host's loopback.
#[derive(Debug, Clone)]
pub struct TcpPeer {
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// Looked up once, when the connection was accepted; `None`: not a loopback peer, or no
    /// socket found.
    pub uid: Option<u32>,
}

/// An accepted TCP connection with what is known of its peer (see [`TcpPeer`]).
#[derive(Debug)]
pub struct IdentifiedTcp {
    stream: TcpStream,
    peer: TcpPeer,
}

impl IdentifiedTcp {
    /// Looks up the owner of a loopback peer's socket (a netlink round trip, off the async
    /// threads). A connection whose lookup fails is kept, unidentified: its calls are refused.
    pub async fn accept(stream: TcpStream) -> Self {
        let local = stream.local_addr().ok();
        let remote = stream.peer_addr().ok();
        let uid = match (local, remote) {
            (Some(l), Some(r)) if berth_sys::peer::is_loopback(r.ip()) => {
                tokio::task::spawn_blocking(move || berth_sys::peer::tcp_peer_uid(l, r))
                    .await
                    .ok()
                    .and_then(|r| {
                        r.inspect_err(|e| tracing::warn!(peer = %remote.map(|a| a.to_string()).unwrap_or_default(), error = %e, "owner of a loopback peer not found"))
                            .ok()
                    })
                    .flatten()
            }
            _ => None,
        };
        Self {
            stream,
            peer: TcpPeer { local, remote, uid },
        }
    }
}

impl Connected for IdentifiedTcp {
    type ConnectInfo = TcpPeer;

    fn connect_info(&self) -> TcpPeer {
        self.peer.clone()
    }
}

impl AsyncRead for IdentifiedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for IdentifiedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// What the connection of a request proves: its peer and the peer's address.
fn connection_of<T>(request: &Request<T>, insecure: bool) -> Result<(Principal, Option<IpAddr>)> {
    let ext = request.extensions();
    if let Some(uds) = ext.get::<UdsConnectInfo>() {
        return match uds.peer_cred.as_ref() {
            Some(c) => Ok((Principal::Uid(c.uid()), None)),
            None => Err(Error::Unauthenticated(
                "the Unix socket peer's credentials are unknown".into(),
            )),
        };
    }
    let (tcp, certs) = if let Some(t) = ext.get::<TlsConnectInfo<TcpPeer>>() {
        (Some(t.get_ref().clone()), t.peer_certs())
    } else {
        (ext.get::<TcpPeer>().cloned(), None)
    };
    let Some(tcp) = tcp else {
        // An in-process channel (tests): nothing proves anything.
        return Err(Error::Unauthenticated(
            "the connection's peer is unknown".into(),
        ));
    };
    let addr = tcp.remote.map(|a| a.ip());
    if let Some(cert) = certs.as_ref().and_then(|c| c.first()) {
        let name = certificate_name(cert.as_ref()).ok_or_else(|| {
            Error::Unauthenticated("the client certificate names no subject".into())
        })?;
        return Ok((Principal::Cert(name), addr));
    }
    if let Some(uid) = tcp.uid {
        return Ok((Principal::Uid(uid), addr));
    }
    if addr.is_some_and(berth_sys::peer::is_loopback) {
        return Err(Error::Unauthenticated(
            "the owner of this loopback connection cannot be found".into(),
        ));
    }
    if insecure {
        return Ok((Principal::Anonymous, addr));
    }
    Err(Error::Unauthenticated(
        "a caller beyond loopback must present a client certificate".into(),
    ))
}

/// The caller's name in a DER certificate: the subject's CN, else its first DNS or URI SAN.
pub fn certificate_name(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        if !cn.is_empty() {
            return Some(cn.to_owned());
        }
    }
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some((*d).to_owned()),
        GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// How long a looked-up account or group is used before it is looked up again.
const CACHE_TTL: Duration = Duration::from_secs(30);

type Cached<T> = Mutex<HashMap<String, (Instant, T)>>;

/// Decides who a request's caller is (see the module docs). Shared by every listener of a
/// daemon; account lookups are cached for [`CACHE_TTL`].
#[derive(Debug)]
pub struct Policy {
    cfg: AccessConfig,
    accounts: Cached<Option<Account>>,
    groups: Cached<Option<u32>>,
}

impl Policy {
    pub fn new(cfg: AccessConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            accounts: Mutex::default(),
            groups: Mutex::default(),
        })
    }

    pub fn config(&self) -> &AccessConfig {
        &self.cfg
    }

    /// The caller of `request`.
    pub async fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        let (peer, addr) = connection_of(request, self.cfg.insecure_plaintext)?;
        let forwarded = request
            .metadata()
            .get(CALLER_HEADER)
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let principal = match forwarded {
            None => {
                // A trusted scheduler acting for itself (its watches, lease renewals, roll-backs)
                // acts for the whole cluster, as an admin does.
                let trusted = !matches!(peer, Principal::Anonymous) && self.trusts(&peer).await;
                let mut c = self.resolve(peer, addr).await?;
                c.admin |= trusted;
                return Ok(c);
            }
            Some(f) => {
                if !self.trusts(&peer).await {
                    return Err(Error::PermissionDenied(format!(
                        "{CALLER_HEADER}: {peer} is not a trusted scheduler and cannot speak \
                         for another caller"
                    )));
                }
                parse_forwarded(&f)?
            }
        };
        self.resolve(principal, addr).await
    }

    /// Whether `peer` may forward callers (`trusted_schedulers`; anyone where
    /// `insecure_plaintext` leaves identities unproven).
    async fn trusts(&self, peer: &Principal) -> bool {
        let listed = |s: &str| self.cfg.trusted_schedulers.iter().any(|t| t == s);
        match peer {
            Principal::Uid(u) => listed(&format!("uid:{u}")),
            Principal::Cert(n) => listed(n),
            Principal::User(n) => match self.account_by_name(n).await {
                Some(a) => listed(&format!("uid:{}", a.uid)),
                None => false,
            },
            Principal::Anonymous => self.cfg.insecure_plaintext,
        }
    }

    /// The caller a principal is.
    pub async fn resolve(&self, principal: Principal, addr: Option<IpAddr>) -> Result<Caller> {
        let (owner, account) = match &principal {
            Principal::Uid(u) => match self.account_by_uid(*u).await {
                Some(a) => (a.name.clone(), Some(a)),
                None => (format!("uid:{u}"), None),
            },
            Principal::User(n) => (n.clone(), self.account_by_name(n).await),
            Principal::Cert(n) => match self.cfg.users.get(n) {
                Some(user) => (user.clone(), self.account_by_name(user).await),
                None => (format!("cert:{n}"), None),
            },
            Principal::Anonymous => (self.cfg.worker_user.clone(), None),
        };
        let admin = match &account {
            Some(a) if a.uid == 0 => true,
            Some(a) => match self.group(&self.cfg.admin_group).await {
                Some(gid) => a.groups.contains(&gid),
                None => false,
            },
            None => false,
        };
        Ok(Caller {
            addr,
            principal,
            owner,
            admin,
            account,
        })
    }

    /// The account workers of callers without one of their own (and of root) run as.
    pub async fn worker_account(&self) -> Result<Account> {
        let name = self.cfg.worker_user.clone();
        self.account_by_name(&name).await.ok_or_else(|| {
            Error::FailedPrecondition(format!("worker_user {name:?}: no such user on this host"))
        })
    }

    /// The local account `name`, looked up off the async threads (cached).
    pub async fn account_by_name(&self, name: &str) -> Option<Account> {
        let key = format!("n:{name}");
        let name = name.to_owned();
        self.cached(&self.accounts, key, move || {
            users::by_name(&name).ok().flatten()
        })
        .await
    }

    async fn account_by_uid(&self, uid: u32) -> Option<Account> {
        self.cached(&self.accounts, format!("u:{uid}"), move || {
            users::by_uid(uid).ok().flatten()
        })
        .await
    }

    async fn group(&self, name: &str) -> Option<u32> {
        let n = name.to_owned();
        self.cached(&self.groups, name.to_owned(), move || {
            users::group_gid(&n).ok().flatten()
        })
        .await
    }

    async fn cached<T, F>(&self, cache: &Cached<T>, key: String, look: F) -> T
    where
        T: Clone + Default + Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        {
            let c = cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, v)) = c.get(&key) {
                if at.elapsed() < CACHE_TTL {
                    return v.clone();
                }
            }
        }
        // NSS may read files or ask a directory service: a blocking call.
        let v = match tokio::task::spawn_blocking(look).await {
            Ok(v) => v,
            Err(e) => {
                // A lookup that panicked (in NSS) answers "unknown", uncached.
                tracing::error!(error = %e, "account lookup failed");
                return T::default();
            }
        };
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() > 4096 {
            c.clear();
        }
        c.insert(key, (Instant::now(), v.clone()));
        v
    }
}

/// A forwarded caller: `user:NAME`, `cert:NAME`, `uid:N` or `anonymous`.
fn parse_forwarded(v: &str) -> Result<Principal> {
    let bad = || {
        Error::Unauthenticated(format!(
            "{CALLER_HEADER}: {v:?} is not user:NAME, cert:NAME, uid:N or anonymous"
        ))
    };
    match v.split_once(':') {
        Some(("user", n)) if !n.is_empty() => Ok(Principal::User(n.to_owned())),
        Some(("cert", n)) if !n.is_empty() => Ok(Principal::Cert(n.to_owned())),
        Some(("uid", n)) => n.parse().map(Principal::Uid).map_err(|_| bad()),
        None if v == "anonymous" => Ok(Principal::Anonymous),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_callers_parse() {
        assert_eq!(
            parse_forwarded("user:alice").unwrap(),
            Principal::User("alice".into())
        );
        assert_eq!(
            parse_forwarded("cert:host-a").unwrap(),
            Principal::Cert("host-a".into())
        );
        assert_eq!(parse_forwarded("uid:7").unwrap(), Principal::Uid(7));
        assert_eq!(parse_forwarded("anonymous").unwrap(), Principal::Anonymous);
        for bad in ["", "user:", "alice", "uid:x", "root:1"] {
            assert!(
                matches!(parse_forwarded(bad), Err(Error::Unauthenticated(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn owners_and_admins() {
        let c = Caller {
            addr: None,
            principal: Principal::Uid(1000),
            owner: "alice".into(),
            admin: false,
            account: None,
        };
        assert!(c.may_touch("alice"));
        assert!(!c.may_touch("bob"));
        assert!(matches!(
            c.check_owns("bob", "worker w1"),
            Err(Error::PermissionDenied(m)) if m.contains("worker w1")
        ));
        assert!(Caller::daemon().may_touch("bob"));
    }
}
