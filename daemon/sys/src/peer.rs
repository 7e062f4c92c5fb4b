//! Who owns the other end of a loopback TCP connection: the kernel's sock_diag interface
//! (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`) looked up for exactly one TCP socket by its
//! 4-tuple, as `ss -e` and identd do. berthd uses it to learn the uid of a caller that reached it
//! over loopback TCP, where no `SO_PEERCRED` exists.
//!
//! What the answer means, and where it stops meaning it:
//! - It is `sk_uid` of the client's socket: the filesystem uid of the process that *created* the
//!   socket, not necessarily of the process using it now (a socket passed over `SCM_RIGHTS`, or
//!   inherited across `setuid`, keeps its creator's uid).
//! - A socket that no process holds any more (closed by its owner, or its owner exited:
//!   orphaned `FIN_WAIT*`, `TIME_WAIT`) has no owner: the kernel reports it with inode 0 and
//!   uid 0, whoever created it (seen on 6.18 for a socket of uid 65534). Such sockets are
//!   answered as `None`, never as root; so a client that closes before the lookup is unknown.
//! - On a miss, the kernel's exact lookup falls back to a *listening* socket bound to the
//!   client's address and port; such an answer does not echo our 4-tuple and is answered as
//!   `None`.
//! - Only sockets of the caller's network namespace are seen, which is all loopback can reach.
//! - Inside a user namespace, uids that do not map into it come back as the overflow uid
//!   (65534).
//!
//! Each call opens its own netlink socket, connected to the kernel (so no other process can
//! inject a reply: the kernel refuses unicasts to a connected netlink socket from anyone but its
//! peer), with a 1 s receive timeout, and checks the sender, sequence number, type and lengths of
//! every message before reading a struct from it.

use std::io::{self, IoSliceMut};
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    connect, recvmsg, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// How long one lookup waits for the kernel's answer before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Failure of a peer lookup, with the connection it concerned (`remote -> local`).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The netlink socket could not be opened, set up, written or read.
    #[error("sock_diag lookup of {remote} -> {local}: {op}: {source}")]
    Netlink {
        op: &'static str,
        local: SocketAddr,
        remote: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The kernel did not answer within the 1 s receive timeout.
    #[error("sock_diag lookup of {remote} -> {local}: no answer from the kernel within 1 s")]
    Timeout {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// The kernel answered the lookup with an error other than "no such socket".
    #[error("sock_diag lookup of {remote} -> {local} refused by the kernel: {source}")]
    Kernel {
        local: SocketAddr,
        remote: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be understood.
    #[error("sock_diag lookup of {remote} -> {local}: malformed reply: {reason}")]
    Malformed {
        local: SocketAddr,
        remote: SocketAddr,
        reason: &'static str,
    },
    /// One address is IPv4 (or v4-mapped) and the other IPv6: no TCP socket has such a 4-tuple,
    /// so the caller passed addresses of two different connections.
    #[error("sock_diag lookup of {remote} -> {local}: addresses of different families")]
    MixedFamilies {
        local: SocketAddr,
        remote: SocketAddr,
    },
}

/// The uid owning the TCP socket at the other end of the server's connection `local` <-> `remote`
/// (local = the server's address, remote = the client's), or `None` when the kernel knows no such
/// socket on this host. Blocking (one netlink round trip); call it off async threads.
///
/// `local` must be the *accepted* connection's local address (`TcpStream::local_addr`), not the
/// listener's, which may be a wildcard. v4-mapped addresses (a server on `[::]` sees
/// `::ffff:127.0.0.1`) are looked up as IPv4 first, then as IPv6, so a client on either an
/// `AF_INET` or a dual-stack `AF_INET6` socket is found. A socket that no process holds any more
/// (its owner closed it) is answered as `None`: see the module documentation for what the uid
/// means. Look the peer up right after `accept`, before trusting anything it sends.
pub fn tcp_peer_uid(local: SocketAddr, remote: SocketAddr) -> Result<Option<u32>, PeerError> {
    let Some(queries) = queries(local, remote) else {
        return Err(PeerError::MixedFamilies { local, remote });
    };
    for query in &queries {
        if let Some(uid) = lookup(query, local, remote)? {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// Whether `ip` is a loopback address, v4-mapped v6 (::ffff:127.x) included.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `SOCK_DIAG_BY_FAMILY` from `<linux/sock_diag.h>`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
/// `INET_DIAG_NOCOOKIE`: match the socket by its 4-tuple alone.
const INET_DIAG_NOCOOKIE: [u32; 2] = [u32::MAX; 2];
/// Every TCP state (`TCPF_ALL`).
const TCPF_ALL: u32 = 0xfff;
const TCP_LISTEN: u8 = 10;
/// `AF_INET`/`AF_INET6` as the `u8` that `inet_diag_req_v2.sdiag_family` holds.
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct NlMsgHdr {
    nlmsg_len: u32,
    nlmsg_type: u16,
    nlmsg_flags: u16,
    nlmsg_seq: u32,
    nlmsg_pid: u32,
}

/// `struct nlmsgerr` (its header copy of the request follows; we do not read it).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct NlMsgErr {
    error: i32,
    msg: NlMsgHdr,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order; an IPv4 address
/// occupies the first 4 bytes of its 16.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InetDiagSockId {
    idiag_sport: u16,
    idiag_dport: u16,
    idiag_src: [u8; 16],
    idiag_dst: [u8; 16],
    idiag_if: u32,
    idiag_cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct InetDiagReqV2 {
    sdiag_family: u8,
    sdiag_protocol: u8,
    idiag_ext: u8,
    pad: u8,
    idiag_states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct InetDiagMsg {
    idiag_family: u8,
    idiag_state: u8,
    idiag_timer: u8,
    idiag_retrans: u8,
    id: InetDiagSockId,
    idiag_expires: u32,
    idiag_rqueue: u32,
    idiag_wqueue: u32,
    idiag_uid: u32,
    idiag_inode: u32,
}

/// One netlink datagram of the request: header and body, without padding between them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Request {
    header: NlMsgHdr,
    body: InetDiagReqV2,
}

// The kernel's sizes; equal sums of the fields also prove none of these structs has padding.
const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const _: () = assert!(size_of::<NlMsgErr>() == 20);
const _: () = assert!(size_of::<InetDiagSockId>() == 48);
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);
const _: () = assert!(size_of::<InetDiagMsg>() == 72);
const _: () = assert!(size_of::<Request>() == 72);

/// Structs made of integers only, with no padding: every byte pattern is a valid value, and
/// every byte of a value is initialised.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integer fields (or arrays of them) whose size
/// equals the sum of their fields' sizes.
unsafe trait Plain: Copy {}
// SAFETY: integer fields only; sizes asserted above to leave no padding.
unsafe impl Plain for NlMsgHdr {}
// SAFETY: as above.
unsafe impl Plain for NlMsgErr {}
// SAFETY: as above.
unsafe impl Plain for InetDiagMsg {}
// SAFETY: as above.
unsafe impl Plain for Request {}

/// Reads a `T` from the start of `bytes`, or `None` when `bytes` is too short.
fn read_plain<T: Plain>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `bytes` holds at least size_of::<T>() readable bytes, `read_unaligned` needs no
    // alignment, and `T: Plain` makes every byte pattern a valid `T`.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The bytes of `value`, as sent to the kernel.
fn plain_bytes<T: Plain>(value: &T) -> &[u8] {
    // SAFETY: `value` is a live reference to size_of::<T>() bytes, all initialised because
    // `T: Plain` has no padding; the slice borrows `value` and cannot outlive it.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// One exact lookup: the client socket's family and its own (source) and peer (destination)
/// endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Query {
    family: u8,
    src: SocketAddr,
    dst: SocketAddr,
}

/// The lookups that can find the client's socket for the server's connection `local <- remote`,
/// in order; `None` for addresses of different families.
fn queries(local: SocketAddr, remote: SocketAddr) -> Option<Vec<Query>> {
    match (v4_of(remote.ip()), v4_of(local.ip())) {
        (Some(src), Some(dst)) => {
            let v4 = |ip: Ipv4Addr, port| SocketAddr::new(IpAddr::V4(ip), port);
            let mapped =
                |ip: Ipv4Addr, port| SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), port);
            Some(vec![
                Query {
                    family: AF_INET,
                    src: v4(src, remote.port()),
                    dst: v4(dst, local.port()),
                },
                Query {
                    family: AF_INET6,
                    src: mapped(src, remote.port()),
                    dst: mapped(dst, local.port()),
                },
            ])
        }
        (None, None) => Some(vec![Query {
            family: AF_INET6,
            src: remote,
            dst: local,
        }]),
        _ => None,
    }
}

/// The IPv4 address `ip` is or maps (`::ffff:a.b.c.d`).
fn v4_of(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a reply's `family` and 16 address bytes stand for, v4-mapped ones as IPv4.
fn reply_ip(family: u8, bytes: [u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()),
        _ => None,
    }
}

fn request(query: &Query, seq: u32) -> Request {
    Request {
        header: NlMsgHdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            // An exact lookup of one socket: no NLM_F_DUMP, and no NLM_F_ACK (the answer is the
            // socket or an error).
            nlmsg_flags: NLM_F_REQUEST,
            nlmsg_seq: seq,
            nlmsg_pid: 0,
        },
        body: InetDiagReqV2 {
            sdiag_family: query.family,
            sdiag_protocol: libc::IPPROTO_TCP as u8,
            idiag_ext: 0,
            pad: 0,
            idiag_states: TCPF_ALL,
            id: InetDiagSockId {
                idiag_sport: query.src.port().to_be(),
                idiag_dport: query.dst.port().to_be(),
                idiag_src: addr_bytes(query.src.ip()),
                idiag_dst: addr_bytes(query.dst.ip()),
                idiag_if: 0,
                idiag_cookie: INET_DIAG_NOCOOKIE,
            },
        },
    }
}

/// What one datagram from the kernel said about lookup `seq`.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// Nothing about our request (another sequence number): read on.
    NotOurs,
    /// The answer: the owner's uid, or `None` for no (owned) socket.
    Answer(Option<u32>),
    /// The kernel's error for our request (a positive errno).
    Errno(i32),
}

/// Reads datagram `buf` for the answer to the lookup `query` sent as `seq`.
fn parse_reply(buf: &[u8], seq: u32, query: &Query) -> Result<Reply, &'static str> {
    let mut rest = buf;
    while !rest.is_empty() {
        let header: NlMsgHdr = read_plain(rest).ok_or("message shorter than its header")?;
        let len = header.nlmsg_len as usize;
        if len < size_of::<NlMsgHdr>() || len > rest.len() {
            return Err("message length outside the datagram");
        }
        let (message, after) = rest.split_at(len);
        // Messages are padded to 4 bytes; the last one of a datagram may not be.
        rest = after.get(len.next_multiple_of(4) - len..).unwrap_or(&[]);
        if header.nlmsg_seq != seq {
            continue;
        }
        let payload = &message[size_of::<NlMsgHdr>()..];
        return match header.nlmsg_type {
            NLMSG_ERROR => {
                let error: NlMsgErr = read_plain(payload).ok_or("short error message")?;
                match error.error {
                    0 => Err("acknowledgement where an answer was due"),
                    e if e == -libc::ENOENT => Ok(Reply::Answer(None)),
                    e if e < 0 => Ok(Reply::Errno(-e)),
                    _ => Err("positive error code"),
                }
            }
            // The end of a dump that found nothing; not sent for an exact lookup, but it
            // means no socket all the same.
            NLMSG_DONE => Ok(Reply::Answer(None)),
            SOCK_DIAG_BY_FAMILY => {
                let msg: InetDiagMsg = read_plain(payload).ok_or("short inet_diag_msg")?;
                Ok(Reply::Answer(owner(&msg, query)))
            }
            _ => Err("unexpected message type"),
        };
    }
    Ok(Reply::NotOurs)
}

/// The uid of the socket `msg` describes, if it is the socket `query` asked for and some
/// process holds it.
fn owner(msg: &InetDiagMsg, query: &Query) -> Option<u32> {
    let id = &msg.id;
    // A miss falls back to a listener on the source address: that one does not echo our tuple.
    let same_tuple = u16::from_be(id.idiag_sport) == query.src.port()
        && u16::from_be(id.idiag_dport) == query.dst.port()
        && reply_ip(msg.idiag_family, id.idiag_src) == Some(query.src.ip().to_canonical())
        && reply_ip(msg.idiag_family, id.idiag_dst) == Some(query.dst.ip().to_canonical());
    // Inode 0: no file holds the socket (orphaned after close, or TIME_WAIT, whose uid reads 0).
    if !same_tuple || msg.idiag_state == TCP_LISTEN || msg.idiag_inode == 0 {
        return None;
    }
    Some(msg.idiag_uid)
}

/// Sends one exact lookup and waits for its answer.
fn lookup(query: &Query, local: SocketAddr, remote: SocketAddr) -> Result<Option<u32>, PeerError> {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    let netlink = |op| {
        move |errno: nix::errno::Errno| PeerError::Netlink {
            op,
            local,
            remote,
            source: errno.into(),
        }
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(netlink("open NETLINK_SOCK_DIAG socket"))?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0),
    )
    .map_err(netlink("set receive timeout"))?;
    // Connected to the kernel (port 0): the kernel then drops unicasts from anyone else.
    connect(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(netlink("connect to the kernel"))?;

    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let req = request(query, seq);
    send(fd.as_raw_fd(), plain_bytes(&req), MsgFlags::empty()).map_err(netlink("send request"))?;

    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut buf = [0u8; 8192];
    loop {
        if Instant::now() >= deadline {
            return Err(PeerError::Timeout { local, remote });
        }
        let (len, flags, sender) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<NetlinkAddr>(fd.as_raw_fd(), &mut iov, None, MsgFlags::empty()) {
                Ok(msg) => (msg.bytes, msg.flags, msg.address.map(|a| a.pid())),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Err(PeerError::Timeout { local, remote }),
                Err(errno) => return Err(netlink("receive reply")(errno)),
            }
        };
        if sender != Some(0) {
            continue; // not from the kernel
        }
        let malformed = |reason| PeerError::Malformed {
            local,
            remote,
            reason,
        };
        if flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(malformed("reply larger than the receive buffer"));
        }
        match parse_reply(&buf[..len], seq, query).map_err(malformed)? {
            Reply::NotOurs => continue,
            Reply::Answer(uid) => return Ok(uid),
            Reply::Errno(errno) => {
                return Err(PeerError::Kernel {
                    local,
                    remote,
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// A listener on `bind`, a client connected to `connect_to` (the listener's port), and the
    /// server's end of that connection.
    fn connection(bind: &str, connect_to: IpAddr) -> Option<(TcpStream, TcpStream, SocketAddr)> {
        let listener = match TcpListener::bind(bind) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipped: cannot listen on {bind}: {e}");
                return None;
            }
        };
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(SocketAddr::new(connect_to, port)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        Some((client, server, peer))
    }

    #[test]
    fn v4_loopback_peer_is_this_process() {
        let (client, server, peer) =
            connection("127.0.0.1:0", "127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let uid = tcp_peer_uid(server.local_addr().unwrap(), peer).unwrap();
        assert_eq!(uid, Some(euid()));
    }

    #[test]
    fn v6_loopback_peer_is_this_process() {
        let Some((_client, server, peer)) = connection("[::1]:0", "::1".parse().unwrap()) else {
            return;
        };
        let uid = tcp_peer_uid(server.local_addr().unwrap(), peer).unwrap();
        assert_eq!(uid, Some(euid()));
    }

    #[test]
    fn v4_mapped_peer_of_an_inet_client_is_found() {
        // A server on [::] sees an AF_INET client at ::ffff:127.0.0.1.
        let Some((_client, server, peer)) = connection("[::]:0", "127.0.0.1".parse().unwrap())
        else {
            return;
        };
        assert_eq!(peer.ip(), "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(is_loopback(peer.ip()));
        let uid = tcp_peer_uid(server.local_addr().unwrap(), peer).unwrap();
        assert_eq!(uid, Some(euid()));
    }

    #[test]
    fn v4_mapped_peer_of_a_dual_stack_client_is_found() {
        // The client's socket is AF_INET6, connected to a v4-mapped address.
        let Some((_client, server, peer)) =
            connection("[::]:0", "::ffff:127.0.0.1".parse().unwrap())
        else {
            return;
        };
        let uid = tcp_peer_uid(server.local_addr().unwrap(), peer).unwrap();
        assert_eq!(uid, Some(euid()));
        // An AF_INET server sees the same client as plain 127.0.0.1.
        let (_client, server, peer) =
            connection("127.0.0.1:0", "::ffff:127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        let uid = tcp_peer_uid(server.local_addr().unwrap(), peer).unwrap();
        assert_eq!(uid, Some(euid()));
    }

    #[test]
    fn tuple_without_socket_is_none() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        assert_eq!(
            tcp_peer_uid(local, "127.0.0.1:1".parse().unwrap()).unwrap(),
            None
        );
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", local.port())
            .parse()
            .unwrap();
        let remote: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        assert_eq!(tcp_peer_uid(mapped, remote).unwrap(), None);
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(tcp_peer_uid("[::1]:2".parse().unwrap(), v6).unwrap(), None);
    }

    #[test]
    fn listener_on_the_client_address_is_not_the_peer() {
        // On a miss the kernel's exact lookup falls back to a listener bound to the "client"
        // address; that socket is not the peer.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let remote = listener.local_addr().unwrap();
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(tcp_peer_uid(local, remote).unwrap(), None);
    }

    #[test]
    fn closed_client_is_none() {
        let (client, server, peer) =
            connection("127.0.0.1:0", "127.0.0.1".parse().unwrap()).unwrap();
        let local = server.local_addr().unwrap();
        drop(client); // FIN_WAIT2, orphaned: no process holds it
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(tcp_peer_uid(local, peer).unwrap(), None);
        drop(server); // the client's socket goes to TIME_WAIT
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(tcp_peer_uid(local, peer).unwrap(), None);
    }

    #[test]
    fn mixed_families_are_an_error() {
        let err = tcp_peer_uid("127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        assert!(
            matches!(err, Err(PeerError::MixedFamilies { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn peer_of_another_user_is_that_user() {
        if euid() != 0 {
            eprintln!("skipped: needs root (a client running as uid 65534)");
            return;
        }
        const NOBODY: u32 = 65534;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
        let (hold_r, hold_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: sockaddr_in is plain data; zero is a valid value.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
        sin.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let (read_fd, write_fd) = (hold_r.as_raw_fd(), hold_w.as_raw_fd());

        // SAFETY: the child runs only async-signal-safe syscalls on data prepared before the
        // fork (no allocation, no locks) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: as above: raw syscalls on prepared data only, then _exit.
            unsafe {
                libc::close(write_fd);
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    libc::_exit(2);
                }
                let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let sa = (&sin as *const libc::sockaddr_in).cast::<libc::sockaddr>();
                let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                if s < 0
                    || libc::connect(s, sa, len) != 0
                    || libc::write(s, b"x".as_ptr().cast(), 1) != 1
                {
                    libc::_exit(3);
                }
                // Hold the connection until the parent closes its end of the pipe.
                let mut byte = 0u8;
                libc::read(read_fd, (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        drop(hold_r);
        // Accept with a deadline, so a child that failed before connecting cannot hang the test.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut server, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no connection from the uid {NOBODY} child: {e}"),
            }
        };
        server.set_nonblocking(false).unwrap();
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).unwrap();
        let local = server.local_addr().unwrap();
        let peer_uid = tcp_peer_uid(local, peer);
        // With the ends swapped, the lookup finds the server's own socket: ours.
        let own_uid = tcp_peer_uid(peer, local);
        drop(hold_w);
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
        assert_eq!(peer_uid.unwrap(), Some(NOBODY));
        assert_eq!(own_uid.unwrap(), Some(euid()));
        // The child has exited: its socket is closed, orphaned in FIN_WAIT2, held by no one.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(tcp_peer_uid(local, peer).unwrap(), None);
    }

    #[test]
    fn loopback_addresses() {
        for (ip, want) in [
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:127.9.9.9", true),
            ("10.0.0.1", false),
            ("0.0.0.0", false),
            ("::", false),
            ("::ffff:10.0.0.1", false),
            ("::127.0.0.1", false), // v4-compatible, not v4-mapped
            ("fe80::1", false),
        ] {
            assert_eq!(is_loopback(ip.parse().unwrap()), want, "{ip}");
        }
    }

    fn message(seq: u32, ty: u16, payload: &[u8]) -> Vec<u8> {
        let header = NlMsgHdr {
            nlmsg_len: (size_of::<NlMsgHdr>() + payload.len()) as u32,
            nlmsg_type: ty,
            nlmsg_flags: 0,
            nlmsg_seq: seq,
            nlmsg_pid: 0,
        };
        let mut bytes = plain_bytes(&header).to_vec();
        bytes.extend_from_slice(payload);
        while !bytes.len().is_multiple_of(4) {
            bytes.push(0);
        }
        bytes
    }

    fn error_payload(errno: i32) -> Vec<u8> {
        let mut bytes = (-errno).to_ne_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        bytes
    }

    fn diag_payload(query: &Query, state: u8, uid: u32, inode: u32) -> Vec<u8> {
        let req = request(query, 0);
        let msg = InetDiagMsg {
            idiag_family: query.family,
            idiag_state: state,
            idiag_timer: 0,
            idiag_retrans: 0,
            id: req.body.id,
            idiag_expires: 0,
            idiag_rqueue: 0,
            idiag_wqueue: 0,
            idiag_uid: uid,
            idiag_inode: inode,
        };
        plain_bytes(&msg).to_vec()
    }

    #[test]
    fn replies_are_checked_before_they_are_read() {
        let query = queries(
            "127.0.0.1:80".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
        )
        .unwrap()[0];
        let other = Query {
            src: "127.0.0.1:5001".parse().unwrap(),
            ..query
        };
        const ESTABLISHED: u8 = 1;
        let ok = diag_payload(&query, ESTABLISHED, 1000, 42);
        let cases: Vec<(&str, Vec<u8>, Result<Reply, &str>)> = vec![
            (
                "answer",
                message(7, SOCK_DIAG_BY_FAMILY, &ok),
                Ok(Reply::Answer(Some(1000))),
            ),
            (
                "other seq",
                message(8, SOCK_DIAG_BY_FAMILY, &ok),
                Ok(Reply::NotOurs),
            ),
            (
                "other seq, then ours",
                [
                    message(8, NLMSG_ERROR, &error_payload(libc::EPERM)),
                    message(7, SOCK_DIAG_BY_FAMILY, &ok),
                ]
                .concat(),
                Ok(Reply::Answer(Some(1000))),
            ),
            (
                "ENOENT",
                message(7, NLMSG_ERROR, &error_payload(libc::ENOENT)),
                Ok(Reply::Answer(None)),
            ),
            (
                "EPERM",
                message(7, NLMSG_ERROR, &error_payload(libc::EPERM)),
                Ok(Reply::Errno(libc::EPERM)),
            ),
            (
                "ack",
                message(7, NLMSG_ERROR, &error_payload(0)),
                Err("acknowledgement where an answer was due"),
            ),
            (
                "done",
                message(7, NLMSG_DONE, &[0; 4]),
                Ok(Reply::Answer(None)),
            ),
            (
                "short msg",
                message(7, SOCK_DIAG_BY_FAMILY, &ok[..40]),
                Err("short inet_diag_msg"),
            ),
            (
                "short error",
                message(7, NLMSG_ERROR, &[0; 2]),
                Err("short error message"),
            ),
            (
                "short header",
                vec![0; 10],
                Err("message shorter than its header"),
            ),
            ("empty", vec![], Ok(Reply::NotOurs)),
            (
                "length past the datagram",
                message(7, SOCK_DIAG_BY_FAMILY, &ok)[..60].to_vec(),
                Err("message length outside the datagram"),
            ),
            (
                "unknown type",
                message(7, 99, &ok),
                Err("unexpected message type"),
            ),
            (
                "another socket",
                message(
                    7,
                    SOCK_DIAG_BY_FAMILY,
                    &diag_payload(&other, ESTABLISHED, 0, 42),
                ),
                Ok(Reply::Answer(None)),
            ),
            (
                "listener",
                message(
                    7,
                    SOCK_DIAG_BY_FAMILY,
                    &diag_payload(&query, TCP_LISTEN, 0, 42),
                ),
                Ok(Reply::Answer(None)),
            ),
            (
                "orphan",
                message(
                    7,
                    SOCK_DIAG_BY_FAMILY,
                    &diag_payload(&query, ESTABLISHED, 0, 0),
                ),
                Ok(Reply::Answer(None)),
            ),
        ];
        for (name, datagram, want) in cases {
            assert_eq!(parse_reply(&datagram, 7, &query), want, "{name}");
        }
    }

    #[test]
    fn mapped_addresses_are_looked_up_as_v4_then_v6() {
        let local: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        let remote: SocketAddr = "[::ffff:127.0.0.2]:5000".parse().unwrap();
        let q = queries(local, remote).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(
            (q[0].family, q[0].src, q[0].dst),
            (
                AF_INET,
                "127.0.0.2:5000".parse().unwrap(),
                "127.0.0.1:80".parse().unwrap()
            )
        );
        assert_eq!((q[1].family, q[1].src, q[1].dst), (AF_INET6, remote, local));
        let v6 = queries("[::1]:80".parse().unwrap(), "[::1]:5000".parse().unwrap()).unwrap();
        assert_eq!(v6.iter().map(|q| q.family).collect::<Vec<_>>(), [AF_INET6]);
        let req = request(&q[0], 9);
        assert_eq!(req.body.id.idiag_sport, 5000u16.to_be());
        assert_eq!(req.body.id.idiag_dport, 80u16.to_be());
        assert_eq!(req.body.id.idiag_src[..4], [127, 0, 0, 2]);
        assert_eq!(req.body.id.idiag_dst[..4], [127, 0, 0, 1]);
        assert_eq!(req.body.id.idiag_cookie, [u32::MAX; 2]);
        assert_eq!(req.header.nlmsg_len, 72);
    }
}
