//! End-to-end tests of worker networks: a namespace and an address per bridge-mode worker,
//! routed through the host; host and none modes; no namespace, veth, route or lease outliving
//! its worker; re-adoption of networks after a daemon restart.
//!
//! Every daemon has its own bridge and subnet (the harness claims a slot), so these tests run in
//! parallel with each other and with every other suite. Traffic goes only between the test, its
//! daemon's workers and the host; egress is checked with route queries, never with packets.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::{
    await_all, command_request, free_port, output_of, pb, require_root, scaled, veth_of,
    worker_veths, Client, Daemon, DaemonOptions,
};
use berth_tests::{await_running, host_info, ids_of, launch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn py(code: &str) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        n: 1,
        cpu: 0.1,
        memory_gb: 0.125,
        code: code.to_owned(),
        ..Default::default()
    }
}

async fn stdout_of(c: &Client, id: &str) -> String {
    String::from_utf8_lossy(&output_of(c, id, pb::Stream::Stdout).await.unwrap()).into_owned()
}

async fn stderr_of(c: &Client, id: &str) -> String {
    String::from_utf8_lossy(&output_of(c, id, pb::Stream::Stderr).await.unwrap()).into_owned()
}

/// Stdout of a worker so far (no follow).
async fn output_now(c: &Client, id: &str) -> String {
    String::from_utf8_lossy(&berth_tests::stdout_now(c, id).await).into_owned()
}

/// Waits until a worker's stdout starts with `prefix`; returns it.
async fn wait_stdout(c: &Client, id: &str, prefix: &str) -> String {
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    loop {
        let out = output_now(c, id).await;
        // A whole line: the shim may have written part of it so far.
        if out.starts_with(prefix) && out.ends_with('\n') {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "worker {id} never printed {prefix:?}: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop_all(c: &Client, ids: &[String]) {
    c.workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: ids.to_vec(),
            grace_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn in_subnet(ip: &str, subnet: &str) -> bool {
    let (net, len) = subnet.split_once('/').unwrap();
    let net: Ipv4Addr = net.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return false;
    };
    let mask = u32::MAX << (32 - len);
    u32::from(ip) & mask == u32::from(net)
}

/// A daemon that also serves `/metrics` on a free loopback port.
async fn daemon_with_metrics() -> (Daemon, u16) {
    daemon_with_metrics_and("").await
}

/// [`daemon_with_metrics`] with `config` added to its configuration.
async fn daemon_with_metrics_and(config: &str) -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::start_with(DaemonOptions {
        args: vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
        config: config.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    (d, port)
}

/// One value of the daemon's metrics.
fn metric(port: u16, line_prefix: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn leases(port: u16) -> Option<f64> {
    metric(port, "berth_allocated{resource=\"ips\"}")
}

/// Host routes to addresses of `subnet` other than the subnet's own.
fn worker_routes(subnet: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let dst = l.split_whitespace().next().unwrap_or("");
            !dst.contains('/') && in_subnet(dst, subnet)
        })
        .map(str::to_owned)
        .collect()
}

/// Polls `f` until it holds or `limit` (scaled) passes.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + scaled(limit);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The workbench example: a master listening on the host, two workers running `worker.py` that
/// connect to `CDSW_MASTER_IP`, send a greeting and print the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workbench_master_and_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let master = tokio::spawn(async move {
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (mut s, peer) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            let greeting = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(format!("welcome {}", peer.ip()).as_bytes())
                .await
                .unwrap();
            peers.push((peer.ip(), greeting));
        }
        peers
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("worker.py"),
        "import os, socket\n\
         master = os.environ['CDSW_MASTER_IP']\n\
         s = socket.create_connection((master, int(os.environ['MASTER_PORT'])), timeout=10)\n\
         s.sendall(('hello from %s at %s' % (os.environ['BERTH_WORKER_ID'], os.environ['BERTH_WORKER_IP'])).encode())\n\
         print(s.recv(256).decode())\n",
    )
    .unwrap();
    let mut req = py("");
    req.code.clear();
    req.n = 2;
    req.script = "worker.py".into();
    req.workdir = dir.path().to_string_lossy().into_owned();
    req.env.insert("MASTER_PORT".into(), port.to_string());
    let ws = launch(&c, req).await;
    let done = await_all(&c, &ids_of(&ws)).await.unwrap();
    let peers = tokio::time::timeout(scaled(Duration::from_secs(30)), master)
        .await
        .expect("master got both workers")
        .unwrap();
    let mut ips = HashSet::new();
    for w in &done {
        assert_eq!(
            w.status(),
            pb::WorkerStatus::Succeeded,
            "{w:?}\n{}",
            stderr_of(&c, &w.id).await
        );
        assert!(in_subnet(&w.ip_address, &d.net.subnet), "{w:?}");
        assert!(
            ips.insert(w.ip_address.clone()),
            "two workers share {}",
            w.ip_address
        );
        let out = stdout_of(&c, &w.id).await;
        assert_eq!(out.trim(), format!("welcome {}", w.ip_address));
        let greeting = format!("hello from {} at {}", w.id, w.ip_address);
        assert!(
            peers
                .iter()
                .any(|(ip, g)| ip.to_string() == w.ip_address && *g == greeting),
            "{peers:?}"
        );
    }
}

/// Workers see the gateway as their master (the caller is on a Unix socket), bind the same
/// port at once, and reach each other; the host reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_port_peers_and_host_reach_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    // Three servers on port 8080 at once, each answering with its own address, twice.
    // The servers stay a moment after their last answer, so that the client's connections
    // close while their peers still exist (an orphaned FIN to a vanished peer keeps a
    // namespace alive until TCP gives up, minutes later).
    let server = "import os, socket, time\n\
        s = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(8)\n\
        print('bound', os.environ['BERTH_MASTER_IP'], os.environ['CDSW_MASTER_IP'], flush=True)\n\
        for _ in range(2):\n\
        \x20   c, a = s.accept(); c.sendall(('%s saw %s' % (os.environ['BERTH_WORKER_IP'], a[0])).encode()); c.close()\n\
        time.sleep(1)\n";
    let mut req = py(server);
    req.n = 3;
    let servers = launch(&c, req).await;
    let running = await_running(&c, &ids_of(&servers)).await;
    assert_eq!(running.len(), 3);
    let ips: HashSet<String> = running.iter().map(|w| w.ip_address.clone()).collect();
    assert_eq!(ips.len(), 3, "{running:?}");
    // Host ends carry no IPv6 (each would add a route to the host's IPv6 table, which the
    // kernel walks on every link change: launches would slow down with the workers alive).
    let ends: Vec<String> = worker_veths()
        .into_iter()
        .filter(|(_, w)| ids_of(&servers).contains(w))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(ends.len(), 3, "{ends:?}");
    // HostInfo counts their addresses against the subnet's.
    let info = host_info(&c).await;
    let (cap, alloc) = (info.capacity.unwrap(), info.allocated.unwrap());
    let prefix: u32 = d.net.subnet.rsplit_once('/').unwrap().1.parse().unwrap();
    // Less the network, gateway and broadcast addresses.
    let total = (1u32 << (32 - prefix)) - 3;
    assert_eq!((cap.addresses, alloc.addresses), (total, 3), "{info:?}");
    for n in &ends {
        if let Ok(v) = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{n}/disable_ipv6"))
        {
            assert_eq!(v.trim(), "1", "IPv6 on host end {n}");
        }
    }
    // Each prints once bound; all three got the port.
    for w in &running {
        let out = wait_stdout(&c, &w.id, "bound").await;
        assert_eq!(
            out.trim(),
            format!("bound {0} {0}", d.net.gateway()),
            "master ip of a bridge worker is the gateway"
        );
    }
    // The host reaches every worker (from the gateway address).
    for w in &running {
        let addr = format!("{}:8080", w.ip_address);
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, format!("{} saw {}", w.ip_address, d.net.gateway()));
    }
    // One worker reaches each of the others by IP.
    let targets: Vec<String> = running.iter().map(|w| w.ip_address.clone()).collect();
    let client_code = format!(
        "import socket\n\
         for ip in {targets:?}:\n\
         \x20   s = socket.create_connection((ip, 8080), timeout=10); print(s.recv(128).decode()); s.close()\n"
    );
    let cl = launch(&c, py(&client_code)).await.remove(0);
    let done = await_all(&c, std::slice::from_ref(&cl.id)).await.unwrap();
    assert_eq!(
        done[0].status(),
        pb::WorkerStatus::Succeeded,
        "{}",
        stderr_of(&c, &cl.id).await
    );
    let out = stdout_of(&c, &cl.id).await;
    for ip in &targets {
        assert!(
            out.contains(&format!("{ip} saw {}", done[0].ip_address)),
            "{out}"
        );
    }
    let ended = await_all(&c, &ids_of(&servers)).await.unwrap();
    assert!(ended
        .iter()
        .all(|w| w.status() == pb::WorkerStatus::Succeeded));
}

/// HOST workers share the host's namespace (no address of their own, loopback master); NONE
/// workers have loopback only and reach nothing. Neither gets a veth or a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_none_modes() {
    require_root!();
    let (d, mport) = daemon_with_metrics().await;
    let c = d.client().await.unwrap();
    let probe = format!(
        "import os, socket\n\
         links = sorted(n for _, n in socket.if_nameindex())\n\
         try:\n\
         \x20   socket.create_connection(('{gw}', 9), timeout=2); reach = 'reached'\n\
         except OSError as e:\n\
         \x20   reach = type(e).__name__\n\
         print(os.environ['BERTH_MASTER_IP'], os.environ.get('BERTH_WORKER_IP', '-'), '{bridge}' in links, ','.join(links) if len(links) < 4 else 'many', reach)\n",
        gw = d.net.gateway(),
        bridge = d.net.bridge,
    );
    let mut host = py(&probe);
    host.network = pb::NetworkMode::Host as i32;
    let mut none = py(&probe);
    none.network = pb::NetworkMode::None as i32;
    let h = launch(&c, host).await.remove(0);
    let n = launch(&c, none).await.remove(0);
    let done = await_all(&c, &[h.id.clone(), n.id.clone()]).await.unwrap();
    for w in &done {
        assert_eq!(
            w.status(),
            pb::WorkerStatus::Succeeded,
            "{}",
            stderr_of(&c, &w.id).await
        );
        assert_eq!(w.ip_address, "", "{w:?}");
    }
    assert_eq!(done[0].network(), pb::NetworkMode::Host);
    assert_eq!(done[1].network(), pb::NetworkMode::None);
    let host_out = stdout_of(&c, &h.id).await;
    let f: Vec<&str> = host_out.split_whitespace().collect();
    // Loopback master, no worker address, the host's links (the bridge among them); the gateway
    // answers (connection refused on port 9 is an answer).
    assert_eq!(f[..3], ["127.0.0.1", "-", "True"], "{host_out}");
    assert_ne!(f[4], "OSError", "{host_out}");
    assert!(
        f[4] == "reached" || f[4] == "ConnectionRefusedError",
        "{host_out}"
    );
    let none_out = stdout_of(&c, &n.id).await;
    let f: Vec<&str> = none_out.split_whitespace().collect();
    assert_eq!(f[..4], ["127.0.0.1", "-", "False", "lo"], "{none_out}");
    assert!(
        f[4] != "reached" && f[4] != "ConnectionRefusedError",
        "an isolated worker reached the gateway: {none_out}"
    );
    assert!(worker_veths().iter().all(|(_, w)| *w != h.id && *w != n.id));
    assert_eq!(leases(mport), Some(0.0));
    assert!(eventually(Duration::from_secs(10), || d.netns_files().is_empty()).await);
}

/// Egress is off unless configured: the host routes nothing from a worker beyond the subnet
/// (checked with a route query, without sending anything), while the host and peers stay
/// reachable. Addresses run out with a RESOURCE_EXHAUSTED that names them, and a refused launch
/// leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_off_and_addresses_run_out() {
    require_root!();
    // More worker slots, and more in one launch, than the subnet has addresses.
    let (d, mport) = daemon_with_metrics_and(
        "[resources]\nmax_workers = 10000\n[limits]\nmax_workers_per_launch = 10000\n",
    )
    .await;
    let c = d.client().await.unwrap();
    let w = launch(&c, py("import time; time.sleep(60)"))
        .await
        .remove(0);
    let w = await_running(&c, std::slice::from_ref(&w.id))
        .await
        .remove(0);
    let host_end = veth_of(&w.id).expect("the worker's veth");
    assert!(
        host_end.starts_with("bq") || host_end == format!("bv{}", w.id),
        "{host_end}"
    );
    // One queue each way: asked for at creation, so the kernel never cuts a per-CPU set down
    // (which waits for an RCU grace period under the rtnl lock, on every launch).
    // (`ip link add` here would get one per possible CPU.)
    let link = Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", &host_end])
        .output()
        .unwrap();
    let link: serde_json::Value = serde_json::from_slice(&link.stdout).unwrap();
    assert_eq!(
        (&link[0]["num_tx_queues"], &link[0]["num_rx_queues"]),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "{link}"
    );
    let route_get = |dst: &str| {
        let out = Command::new("ip")
            .args([
                "-4",
                "route",
                "get",
                dst,
                "from",
                &w.ip_address,
                "iif",
                &host_end,
            ])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let outside = route_get("203.0.113.9");
    assert!(
        outside.contains("unreachable") || outside.contains("Network is unreachable"),
        "traffic beyond the subnet would be routed: {outside}"
    );
    let gw = route_get(&d.net.gateway());
    assert!(gw.contains("local"), "{gw}");
    // Every address of the /19 but the gateway: 8189. Asking for more is refused whole.
    let mut req = command_request(9000, &["/bin/true"]);
    req.cpu = 0.0001;
    req.memory_gb = 0.0001;
    let e = c.workers().launch_workers(req).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().starts_with("ips: 9000 requested"),
        "{}",
        e.message()
    );
    assert_eq!(leases(mport), Some(1.0));
    stop_all(&c, std::slice::from_ref(&w.id)).await;
    assert!(eventually(Duration::from_secs(10), || leases(mport) == Some(0.0)).await);
}

/// A few hundred workers (bridge and none, some failing to exec after their network was made)
/// leave no namespace, veth, route or lease behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_outlives_its_worker() {
    require_root!();
    let (d, mport) = daemon_with_metrics().await;
    let c = d.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Executable, passes admission, but exec fails (no interpreter line): a spawn that fails
    // after its namespace was made.
    let bad = dir.path().join("not-a-program");
    std::fs::write(&bad, b"\x01\x02 not an executable\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut ids = Vec::new();
    let mut failing = Vec::new();
    for (i, mode) in [
        pb::NetworkMode::Bridge,
        pb::NetworkMode::None,
        pb::NetworkMode::Bridge,
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = command_request(100, &["/bin/true"]);
        req.cpu = 0.001;
        req.memory_gb = 0.0025;
        req.network = mode as i32;
        let ws = launch(&c, req).await;
        ids.extend(ids_of(&ws));
        if i == 0 {
            let mut req = command_request(5, &[bad.to_str().unwrap()]);
            req.cpu = 0.001;
            req.memory_gb = 0.0025;
            let ws = launch(&c, req).await;
            failing.extend(ids_of(&ws));
        }
    }
    let done = await_all(&c, &ids).await.unwrap();
    assert!(
        done.iter()
            .all(|w| w.status() == pb::WorkerStatus::Succeeded),
        "{:?}",
        done.iter()
            .find(|w| w.status() != pb::WorkerStatus::Succeeded)
    );
    let bridge_ips: Vec<String> = done
        .iter()
        .filter(|w| w.network() == pb::NetworkMode::Bridge)
        .map(|w| w.ip_address.clone())
        .collect();
    assert_eq!(bridge_ips.len(), 200);
    assert!(bridge_ips.iter().all(|ip| in_subnet(ip, &d.net.subnet)));
    let failed = await_all(&c, &failing).await.unwrap();
    for w in &failed {
        assert_eq!(w.status(), pb::WorkerStatus::Failed, "{w:?}");
        assert!(w.reason.starts_with("spawn failed"), "{w:?}");
    }
    let all: HashSet<String> = ids.iter().chain(&failing).cloned().collect();
    assert!(
        eventually(Duration::from_secs(30), || d.netns_files().is_empty()).await,
        "namespaces left: {:?}",
        d.netns_files()
    );
    assert!(
        eventually(Duration::from_secs(60), || {
            worker_veths().iter().all(|(_, w)| !all.contains(w))
        })
        .await,
        "veths left"
    );
    assert!(
        eventually(Duration::from_secs(30), || worker_routes(&d.net.subnet)
            .is_empty())
        .await,
        "routes left: {:?}",
        worker_routes(&d.net.subnet)
    );
    assert_eq!(leases(mport), Some(0.0));
    assert_eq!(host_info(&c).await.allocated.unwrap().addresses, 0);
}

/// After a crash of the daemon, the next one re-adopts the networks of live workers (their
/// addresses stay theirs and keep answering) and removes namespaces that belong to no live
/// worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_readopts_networks_and_removes_stale_ones() {
    require_root!();
    let port = free_port();
    let mut d = Daemon::start_with(DaemonOptions {
        args: vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    })
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    let server = "import os, socket\n\
        s = socket.socket(); s.bind(('0.0.0.0', 7070)); s.listen(8)\n\
        print('bound', flush=True)\n\
        while True:\n\
        \x20   c, a = s.accept(); c.sendall(os.environ['BERTH_WORKER_IP'].encode()); c.close()\n";
    let mut req = py(server);
    req.n = 2;
    let ws = launch(&c, req).await;
    let live = await_running(&c, &ids_of(&ws)).await;
    for w in &live {
        wait_stdout(&c, &w.id, "bound").await;
    }
    let before: BTreeMap<String, String> = live
        .iter()
        .map(|w| (w.id.clone(), w.ip_address.clone()))
        .collect();
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    // What a crashed daemon could leave: a namespace of no worker, and a half-made one.
    let nsdir = d.state_dir().join("netns");
    let stale = nsdir.join("stale0000001");
    std::fs::write(&stale, b"").unwrap();
    let st = Command::new("unshare")
        .arg(format!("--net={}", stale.display()))
        .arg("true")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(nsdir.join("halfmade0001"), b"").unwrap();
    d.restart(&["--metrics-listen".into(), format!("127.0.0.1:{port}")])
        .await
        .unwrap();
    let c = d.client().await.unwrap();
    let mut files: Vec<String> = d.netns_files();
    files.sort();
    let mut want: Vec<String> = before.keys().cloned().collect();
    want.sort();
    assert_eq!(files, want, "stale namespaces kept or live ones removed");
    // The live workers keep their addresses and answer on them.
    for (id, ip) in &before {
        let w = &c
            .workers()
            .list_workers(pb::ListWorkersRequest {
                ids: vec![id.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .workers[0];
        assert_eq!(w.status(), pb::WorkerStatus::Running);
        assert_eq!(&w.ip_address, ip);
        let mut s = match tokio::net::TcpStream::connect(format!("{ip}:7070")).await {
            Ok(s) => s,
            Err(e) => panic!(
                "{ip}: {e}\n{w:?}\nstdout {}\n{}",
                output_now(&c, id).await,
                d.log()
            ),
        };
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert_eq!(&got, ip);
    }
    // Their leases are restored: new workers never get their addresses.
    assert_eq!(leases(port), Some(2.0));
    let mut req = command_request(20, &["/bin/true"]);
    req.cpu = 0.001;
    req.memory_gb = 0.0025;
    let fresh = launch(&c, req).await;
    for w in &fresh {
        assert!(
            !before.values().any(|ip| *ip == w.ip_address),
            "address {} given twice",
            w.ip_address
        );
        let _ = IpAddr::V4(w.ip_address.parse().unwrap());
    }
    await_all(&c, &ids_of(&fresh)).await.unwrap();
    stop_all(&c, &before.keys().cloned().collect::<Vec<_>>()).await;
    assert!(eventually(Duration::from_secs(10), || d.netns_files().is_empty()).await);
    assert!(eventually(Duration::from_secs(10), || leases(port) == Some(0.0)).await);
}

/// README: the namespace files live on a tmpfs of the daemon's own, which a daemon stopped with
/// worker networks left keeps (with their files), and which is unmounted when the daemon stops
/// with none left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_netns_tmpfs_goes_when_the_daemon_stops_with_no_worker_network_left() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let nsdir = d.state_dir().join("netns");
    if on_tmpfs(&d.state_dir()) {
        // README: the daemon mounts a tmpfs of its own only where the state dir is not on one
        // (the v2 tier's guest keeps its state dirs on /tmp, a tmpfs).
        assert!(!d.netns_mounted(), "a tmpfs mounted on a tmpfs");
        eprintln!("the state dir is on a tmpfs already: berthd mounts none of its own here");
        return;
    }
    assert!(d.netns_mounted(), "no tmpfs on {}", nsdir.display());
    let c = d.client().await.unwrap();
    let ws = launch(&c, command_request(1, &["sleep", "600"])).await;
    await_running(&c, &ids_of(&ws)).await;
    drop(c);
    let st = d.stop_daemon(libc::SIGTERM).expect("daemon running");
    assert!(st.success(), "berthd exited with {st}:\n{}", d.log());
    assert!(
        d.netns_mounted(),
        "unmounted under a live worker's namespace"
    );
    assert_eq!(d.netns_files(), ids_of(&ws));

    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    stop_all(&c, &ids_of(&ws)).await;
    assert!(eventually(Duration::from_secs(10), || d.netns_files().is_empty()).await);
    drop(c);
    let st = d.stop_daemon(libc::SIGTERM).expect("daemon running");
    assert!(st.success(), "berthd exited with {st}:\n{}", d.log());
    assert!(
        !d.netns_mounted(),
        "berthd left its tmpfs on {}",
        nsdir.display()
    );
}

/// README: `BERTH_MASTER_IP` = `CDSW_MASTER_IP` is the caller's address over TCP, and the
/// gateway for a caller on loopback (a master listening on the host is reached there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_ip_is_the_tcp_callers_address_and_the_gateway_for_loopback() {
    require_root!();
    let port = free_port();
    let d = Daemon::start_with(DaemonOptions {
        tcp: true,
        listen: vec![format!("0.0.0.0:{port}")],
        // Callers beyond loopback without a certificate (anonymous, run as worker_user).
        config: "insecure_plaintext = true\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // An address of this host that is neither loopback nor the gateway, on the daemon's own
    // bridge (it goes with the bridge): a connection to it comes from it.
    let caller_ip = format!("203.0.113.{}", 1 + d.net.slot % 250);
    let st = Command::new("ip")
        .args([
            "addr",
            "add",
            &format!("{caller_ip}/32"),
            "dev",
            &d.net.bridge,
        ])
        .status()
        .unwrap();
    assert!(st.success(), "ip addr add {caller_ip}");
    let master_seen_by = |c: Client| async move {
        let mut req = command_request(
            1,
            &["/bin/sh", "-c", "echo $BERTH_MASTER_IP $CDSW_MASTER_IP"],
        );
        req.workdir = "/".into();
        let w = launch(&c, req).await.remove(0);
        let done = await_all(&c, std::slice::from_ref(&w.id)).await.unwrap();
        assert_eq!(done[0].status(), pb::WorkerStatus::Succeeded, "{done:?}");
        stdout_of(&c, &w.id).await
    };
    let remote = Client::connect(&format!("{caller_ip}:{port}"))
        .await
        .unwrap();
    assert_eq!(
        master_seen_by(remote).await,
        format!("{caller_ip} {caller_ip}\n")
    );
    let lo = Client::connect(d.tcp.as_deref().unwrap()).await.unwrap();
    let gw = d.net.gateway();
    assert_eq!(master_seen_by(lo).await, format!("{gw} {gw}\n"));
}

/// `egress = true`: the daemon masquerades its subnet with one nft table of its own
/// (`ip berth_<bridge>`), sets `net.ipv4.ip_forward`, and drops the rules that keep worker
/// traffic in: a worker's packets to the outside are routed as the host's are. Checked with the
/// ruleset and route queries, never with packets. The table is removed after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_on_masquerades_the_subnet() {
    require_root!();
    if !berth_tests::have("nft") {
        return;
    }
    if !Command::new("nft")
        .args(["list", "tables"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        berth_tests::cannot_run("nft cannot reach this kernel's nf_tables");
        return;
    }
    const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
    /// Removes the daemon's nft table (by design it leaves it). `ip_forward` stays as the daemon
    /// set it: putting it back would pull it from under another test process's egress daemon.
    struct DropTable(String);
    impl Drop for DropTable {
        fn drop(&mut self) {
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", &self.0])
                .status();
        }
    }
    let d = Daemon::start_with(DaemonOptions {
        config: "egress = true\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = format!("berth_{}", d.net.bridge);
    let _drop_table = DropTable(table.clone());
    let out = Command::new("nft")
        .args(["list", "table", "ip", &table])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "no table {table}: {out:?}\n{}",
        d.log()
    );
    let subnet = &d.net.subnet;
    assert!(
        rules.contains(&format!(
            "ip saddr {subnet} ip daddr != {subnet} masquerade"
        )),
        "{rules}"
    );
    assert_eq!(std::fs::read_to_string(FORWARD).unwrap().trim(), "1");
    let c = d.client().await.unwrap();
    let w = launch(&c, command_request(1, &["sleep", "600"])).await;
    let w = await_running(&c, &ids_of(&w)).await.remove(0);
    let host_end = veth_of(&w.id).expect("the worker's veth");
    let route = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["-4", "route", "get", "203.0.113.9"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // The daemon's rule that refuses traffic leaving the subnet is gone. A refusing rule of
    // someone else's (another subnet's, left by a killed run) that covers this worker's address
    // would fail the route query below: it is then not made.
    let out = Command::new("ip")
        .args(["-4", "rule", "show"])
        .output()
        .unwrap();
    let mut foreign = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("unreachable"))
    {
        let from = line.split_whitespace().skip_while(|w| *w != "from").nth(1);
        match from {
            Some(f) if f == subnet.as_str() => panic!("egress on, yet the daemon refuses: {line}"),
            Some(f) if f.contains('/') && in_subnet(&w.ip_address, f) => {
                foreign.push(line.to_owned())
            }
            _ => {}
        }
    }
    let (host_routed, host_route) = route(&[]);
    let (_, worker_route) = route(&["from", &w.ip_address, "iif", &host_end]);
    if !foreign.is_empty() {
        eprintln!("route query not made: rules of another subnet cover the worker: {foreign:?}");
    } else if host_routed {
        assert!(
            !worker_route.contains("unreachable"),
            "the host routes 203.0.113.9 ({host_route}) but not a worker's traffic: \
             {worker_route}"
        );
    }
    stop_all(&c, std::slice::from_ref(&w.id)).await;
}

/// Whether `path` lies on a tmpfs.
fn on_tmpfs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) on a valid NUL-terminated path into a zeroed struct it fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type == 0x0102_1994
}
