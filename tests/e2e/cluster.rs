//! Cluster networking with each host a real berthd in its own network namespace, on a test
//! "LAN" (a bridge in the root namespace, one veth and one address per host, no default route),
//! joined to a real berth-scheduler listening on the LAN: routes between the hosts' worker
//! subnets, the workbench's master on one host reached by workers on two others, a worker's
//! real address seen across hosts, masquerade to the outside, refusal of an overlapping subnet,
//! and a removed host's routes going with it. Nothing is left at the end.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_tests::cluster::{Lan, SchedulerNode};
use berth_tests::{
    await_all, bin, launch, pb, python_request, require_root, scaled, stdout_now, Client, Daemon,
    DaemonOptions,
};

/// `ip -4 route show proto 190` (berthd's cluster routes) in namespace `ns`: destination → next
/// hop.
fn routes_in(ns: &str) -> BTreeMap<String, String> {
    let out = if ns.is_empty() {
        Command::new("ip")
            .args(["-4", "route", "show", "proto", "190"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    } else {
        Lan::run_in(ns, &["ip", "-4", "route", "show", "proto", "190"]).unwrap_or_default()
    };
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let dest = w.next()?.to_owned();
            let via = w.skip_while(|x| *x != "via").nth(1)?.to_owned();
            Some((dest, via))
        })
        .collect()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A host of the test cluster: a berthd in namespace `bt<slot>-<n>` at LAN address `n`.
async fn host(
    lan: &mut Lan,
    sched_lan: &str,
    n: u32,
    at: &str,
    egress: bool,
    subnet: Option<String>,
) -> (Daemon, String) {
    let ns = lan.add_namespace(n).unwrap();
    let d = Daemon::start_with(DaemonOptions {
        netns: Some(Lan::path(&ns)),
        listen: vec![format!("{}:7300", lan.address(n))],
        subnet,
        config: format!(
            "scheduler = \"{sched_lan}\"\ninsecure_plaintext = true\negress = {egress}\n\
             [resources]\ncpu = 2.0\nmemory_gb = 2.0\n[labels]\nrole = \"{role}\"\nat = \"{at}\"\n",
            role = if at == "a" { "master" } else { "worker" }
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    (d, ns)
}

fn on(at: &str, code: &str) -> pb::LaunchWorkersRequest {
    let mut r = python_request(1, code);
    r.workdir = "/".into();
    r.constraints.insert("at".into(), at.into());
    r
}

/// A worker's stdout so far, through the scheduler.
async fn stdout_of(client: &Client, w: &pb::Worker) -> String {
    String::from_utf8_lossy(&stdout_now(client, &w.id).await).into_owned()
}

/// Awaits a worker's end through the scheduler. (The hosts here cannot prove who the scheduler
/// is, `insecure_plaintext`: they once took its own follow for `worker_user`'s, which sees none
/// of the test's workers, and a worker stayed STARTING in its view for the whole await.)
async fn await_end(client: &Client, w: &pb::Worker) -> pb::Worker {
    await_all(client, std::slice::from_ref(&w.id))
        .await
        .unwrap()
        .remove(0)
}

async fn one_worker_done(client: &Client, req: pb::LaunchWorkersRequest) -> (pb::Worker, String) {
    let w = launch(client, req).await.remove(0);
    let done = await_end(client, &w).await;
    let out = stdout_of(client, &done).await;
    (done, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_in_their_own_namespaces_route_to_each_other() {
    require_root!();
    for tool in ["nsenter", "nft"] {
        if !berth_tests::have(tool) {
            return;
        }
    }
    let mut lan = Lan::new().unwrap();
    let slot_prefix = lan.net.bridge.clone();
    {
        let sched_lan = format!("{}:{}", lan.address(1), berth_tests::free_port());
        let sched = SchedulerNode::start_listening(
            std::slice::from_ref(&sched_lan),
            "insecure_plaintext = true\n",
            Default::default(),
        )
        .await
        .unwrap();
        // A and B masquerade what leaves the cluster; C keeps its workers in (egress off).
        let (a, ns_a) = host(&mut lan, &sched_lan, 2, "a", true, None).await;
        let (b, ns_b) = host(&mut lan, &sched_lan, 3, "b", true, None).await;
        let (mut c, ns_c) = host(&mut lan, &sched_lan, 4, "c", false, None).await;
        let names = [a.name.as_str(), b.name.as_str(), c.name.as_str()];
        sched
            .wait_hosts(&names, pb::HostState::Ready)
            .await
            .unwrap();
        let (lan_a, lan_b, lan_c) = (lan.address(2), lan.address(3), lan.address(4));

        // Every host routes to the other two hosts' subnets via their LAN addresses.
        let all: Vec<(String, String, String)> = [(&a, &lan_a), (&b, &lan_b), (&c, &lan_c)]
            .into_iter()
            .map(|(d, ip)| (d.name.clone(), d.net.subnet.clone(), ip.clone()))
            .collect();
        let want = |me: &Daemon| -> BTreeMap<String, String> {
            all.iter()
                .filter(|(n, _, _)| *n != me.name)
                .map(|(_, s, ip)| (s.clone(), ip.clone()))
                .collect()
        };
        for (d, ns) in [(&a, &ns_a), (&b, &ns_b), (&c, &ns_c)] {
            let w = want(d);
            until(&format!("routes on {ns}: {w:?}"), || routes_in(ns) == w).await;
        }

        // A host whose subnet overlaps B's is refused: the beat names the subnet, the scheduler's
        // log the host, and it is never listed (so never placed on).
        let (d, _ns_d) = host(
            &mut lan,
            &sched_lan,
            5,
            "d",
            true,
            Some(b.net.subnet.clone()),
        )
        .await;
        until("the overlapping host refused", || {
            d.log().contains("info.subnet") && sched.log().contains(&format!("host={}", d.name))
        })
        .await;
        let listed: Vec<String> = sched
            .hosts()
            .await
            .unwrap()
            .into_iter()
            .filter_map(|h| h.info.map(|i| i.name))
            .collect();
        assert!(!listed.contains(&d.name), "{listed:?}");
        assert!(
            d.log()
                .contains(&format!("overlaps {} of host {}", b.net.subnet, b.name)),
            "{}",
            d.log()
        );
        drop(d);

        let client = sched.client().await.unwrap();

        // The workbench example: the master (the launching process) on A, its two workers placed
        // spread on B and C; they reach it at CDSW_MASTER_IP and it sees their real addresses.
        let worker = "import os, socket\n\
            s = socket.create_connection((os.environ['CDSW_MASTER_IP'], int(os.environ['MASTER_PORT'])), timeout=20)\n\
            s.sendall(('hello from %s at %s' % (os.environ['BERTH_WORKER_ID'], os.environ['BERTH_WORKER_IP'])).encode())\n\
            print(s.recv(256).decode())\n";
        let master = "import os, socket, subprocess, sys\n\
            l = socket.socket(); l.bind(('0.0.0.0', 0)); l.listen(8); l.settimeout(60)\n\
            port = l.getsockname()[1]\n\
            r = subprocess.run([os.environ['BERTH'], '--addr', os.environ['SCHED'], 'launch', '-n', '2', '--cpu', '0.25', '--memory', '0.25', '--placement', 'spread', '--constraint', 'role=worker', '--label', 'case=master', '--env', 'MASTER_PORT=%d' % port, '--workdir', '/', '--code', os.environ['WORKER']], capture_output=True, text=True)\n\
            print('launch', r.returncode, r.stderr.replace('\\n', ' '), flush=True)\n\
            if r.returncode != 0: sys.exit(1)\n\
            for _ in range(2):\n\
            \x20   c, a = l.accept(); c.settimeout(20)\n\
            \x20   g = c.recv(256).decode(); c.sendall(('welcome %s' % a[0]).encode()); c.close()\n\
            \x20   print('peer', a[0], g, flush=True)\n";
        // Both READY now (spread places over READY hosts only).
        sched
            .wait_hosts(&names, pb::HostState::Ready)
            .await
            .unwrap();
        let m = Command::new("nsenter")
            .arg(format!("--net={}", Lan::path(&ns_a).display()))
            .args(["/usr/bin/python3", "-c", master])
            .env("BERTH", bin("berth"))
            .env("SCHED", &sched_lan)
            .env("WORKER", worker)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = tokio::task::spawn_blocking(move || m.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "master: {said}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ws: Vec<pb::Worker> = berth_tests::list_all(&client)
            .await
            .into_iter()
            .filter(|w| w.labels.get("case").map(String::as_str) == Some("master"))
            .collect();
        assert_eq!(ws.len(), 2, "{ws:?}");
        let mut done = Vec::new();
        for w in &ws {
            done.push(await_end(&client, w).await);
        }
        let mut hosts: Vec<&str> = done.iter().map(|w| w.host.as_str()).collect();
        hosts.sort();
        let mut bc = vec![b.name.as_str(), c.name.as_str()];
        bc.sort();
        assert_eq!(
            hosts,
            bc,
            "spread over B and C\nscheduler:\n{}\nC:\n{}",
            sched.log(),
            c.log()
        );
        for w in &done {
            assert_eq!(w.status(), pb::WorkerStatus::Succeeded, "{w:?}");
            let own = if w.host == b.name { &b } else { &c };
            assert!(in_subnet(&w.ip_address, &own.net.subnet), "{w:?}");
            let printed = stdout_of(&client, w).await;
            assert_eq!(printed.trim(), format!("welcome {}", w.ip_address));
            let line = format!(
                "peer {} hello from {} at {}",
                w.ip_address, w.id, w.ip_address
            );
            assert!(said.contains(&line), "{said}\nlacks {line}");
        }

        // A worker on B reaches a worker on C by its address, and C's sees B's real address.
        let server = "import socket, os\n\
            s = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen(1); s.settimeout(60)\n\
            print('bound', flush=True)\n\
            c, a = s.accept(); c.sendall(os.environ['BERTH_WORKER_IP'].encode()); c.close()\n\
            print('saw', a[0], flush=True)\n";
        let srv = launch(&client, on("c", server)).await.remove(0);
        let srv_ip = srv.ip_address.clone();
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        while !stdout_of(&client, &srv).await.contains("bound") {
            assert!(Instant::now() < deadline, "the server on C never bound");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (cl, got) = one_worker_done(
            &client,
            on(
                "b",
                &format!(
                    "import socket\ns = socket.create_connection(('{srv_ip}', 8080), timeout=20)\n\
                     print(s.recv(64).decode())\n"
                ),
            ),
        )
        .await;
        let tail = |l: String| l.lines().rev().take(40).collect::<Vec<_>>().join("\n");
        assert_eq!(
            cl.status(),
            pb::WorkerStatus::Succeeded,
            "{cl:?}\nB:\n{}\nscheduler:\n{}",
            tail(b.log()),
            tail(sched.log())
        );
        assert_eq!(got.trim(), srv_ip);
        let srv_done = await_end(&client, &srv).await;
        assert_eq!(srv_done.status(), pb::WorkerStatus::Succeeded);
        let seen = stdout_of(&client, &srv).await;
        assert!(
            seen.contains(&format!("saw {}", cl.ip_address)),
            "C's worker saw {seen:?}, not B's worker's real address {}",
            cl.ip_address
        );

        // The "internet": a namespace on the LAN with no route to any worker subnet. B's worker
        // reaches it through masquerade (it sees B's LAN address); C's (egress off) does not.
        let ns_x = lan.add_namespace(250).unwrap();
        let outside = "import socket\n\
            s = socket.socket(); s.bind(('0.0.0.0', 9090)); s.listen(1); s.settimeout(60)\n\
            c, a = s.accept(); c.sendall(a[0].encode()); c.close()\n";
        let mut x = Command::new("nsenter")
            .arg(format!("--net={}", Lan::path(&ns_x).display()))
            .args(["/usr/bin/python3", "-c", outside])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lan_x = lan.address(250);
        let dial = format!(
            "import socket, time\n\
             for i in range(100):\n\
             \x20   try:\n\
             \x20       s = socket.create_connection(('{lan_x}', 9090), timeout=5); print(s.recv(64).decode()); break\n\
             \x20   except ConnectionRefusedError:\n\
             \x20       time.sleep(0.1)\n\
             \x20   except OSError as e:\n\
             \x20       print(type(e).__name__, e); break\n"
        );
        let (w, got) = one_worker_done(&client, on("b", &dial)).await;
        assert_eq!(w.status(), pb::WorkerStatus::Succeeded, "{w:?}");
        assert_eq!(
            got.trim(),
            lan_b,
            "the outside sees B's address (masqueraded)"
        );
        let (_, got) = one_worker_done(&client, on("c", &dial)).await;
        assert!(
            got.contains("OSError") || got.contains("unreachable"),
            "egress off on C, yet: {got}"
        );
        let _ = x.kill();
        let _ = x.wait();

        // C stops: DOWN, its route stays on A and B (its workers could come back); RemoveHost
        // takes it away.
        c.stop_daemon(libc::SIGTERM);
        sched
            .wait_hosts(&[c.name.as_str()], pb::HostState::Down)
            .await
            .unwrap();
        // A few beats for a wrong removal to show.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        for (d, ns) in [(&a, &ns_a), (&b, &ns_b)] {
            assert_eq!(routes_in(ns), want(d), "a DOWN host's route stays on {ns}");
        }
        client
            .cluster()
            .remove_host(pb::RemoveHostRequest {
                name: c.name.clone(),
            })
            .await
            .unwrap();
        for (d, ns) in [(&a, &ns_a), (&b, &ns_b)] {
            let deadline = Instant::now() + scaled(Duration::from_secs(20));
            loop {
                let r = routes_in(ns);
                if !r.contains_key(&c.net.subnet) && r.len() == 1 {
                    break;
                }
                if Instant::now() >= deadline {
                    let log = d.log();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    panic!(
                        "C's route not gone from {ns} after RemoveHost: {r:?}\nthe scheduler's \
                         hosts: {:?}\nits berthd's last lines:\n{}",
                        sched.hosts().await,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(lan);
    // Nothing left: namespaces, the LAN's links, cluster routes or rules of the root namespace.
    let left_ns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{slot_prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left_ns.is_empty(), "{left_ns:?}");
    // The kernel frees a deleted namespace, and the veths in it, asynchronously.
    let links = || -> Vec<String> {
        std::fs::read_dir("/sys/class/net")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n == &slot_prefix || n.starts_with(&format!("{slot_prefix}h")))
            .collect()
    };
    until("the LAN's links gone", || links().is_empty()).await;
    assert!(routes_in("").is_empty(), "{:?}", routes_in(""));
    let rules = Command::new("ip")
        .args(["-d", "-4", "rule", "show"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("proto 190"), "{rules}");
}

fn in_subnet(ip: &str, subnet: &str) -> bool {
    let (Some((net, len)), Ok(ip)) = (subnet.split_once('/'), ip.parse::<std::net::Ipv4Addr>())
    else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = u32::MAX << (32 - len);
    u32::from(ip) & mask == u32::from(net)
}
