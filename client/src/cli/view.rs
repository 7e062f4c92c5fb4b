//! What people read: workers, hosts and host details as tables, with short numbers and ages.
//! Pure functions of the response and of `now`.

use std::time::{Duration, SystemTime};

use comfy_table::{presets, CellAlignment, Row, Table};

use crate::pb;

/// `WorkerStatus` as people read it: `running`, `failed`…
pub fn status_name(s: pb::WorkerStatus) -> &'static str {
    match s {
        pb::WorkerStatus::Unspecified => "unknown",
        pb::WorkerStatus::Pending => "pending",
        pb::WorkerStatus::Starting => "starting",
        pb::WorkerStatus::Running => "running",
        pb::WorkerStatus::Succeeded => "succeeded",
        pb::WorkerStatus::Failed => "failed",
        pb::WorkerStatus::Stopped => "stopped",
        pb::WorkerStatus::Lost => "lost",
    }
}

/// `HostState` as people read it.
pub fn host_state_name(s: pb::HostState) -> &'static str {
    match s {
        pb::HostState::Unspecified => "unknown",
        pb::HostState::Ready => "ready",
        pb::HostState::Draining => "draining",
        pb::HostState::Down => "down",
    }
}

/// Whether a worker has ended for good.
pub fn has_ended(s: pb::WorkerStatus) -> bool {
    matches!(
        s,
        pb::WorkerStatus::Succeeded
            | pb::WorkerStatus::Failed
            | pb::WorkerStatus::Stopped
            | pb::WorkerStatus::Lost
    )
}

/// A duration in at most two units: `45s`, `3m7s`, `2h`, `3d4h`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (big, big_unit, small, small_unit) = match s {
        0..60 => return format!("{s}s"),
        60..3_600 => (s / 60, "m", s % 60, "s"),
        3_600..86_400 => (s / 3_600, "h", s % 3_600 / 60, "m"),
        _ => (s / 86_400, "d", s % 86_400 / 3_600, "h"),
    };
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit}{small}{small_unit}")
    }
}

/// Time from `t` to `now` (zero when `t` lies ahead, as with a skewed clock), formatted; `-`
/// when `t` is unset or out of range.
pub fn format_age(t: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .map(|t| format_duration(now.duration_since(t).unwrap_or_default()))
        .unwrap_or_else(|| "-".to_owned())
}

/// A number with at most `decimals` decimals and no trailing zeros: `0.5`, `16`, `0.125`.
pub fn format_number(x: f64, decimals: usize) -> String {
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// CPU cores.
pub fn format_cpu(cpu: f64) -> String {
    format_number(cpu, 3)
}

/// Bytes in the largest binary unit that keeps the number at least 1: `512B`, `128MiB`,
/// `1.5GiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{}{}", format_number(v, 1), UNITS[unit])
}

/// GiB (as in `memory_gb`) formatted like [`format_bytes`].
pub fn format_gib(gb: f64) -> String {
    if !gb.is_finite() || gb <= 0.0 {
        return "0".to_owned();
    }
    format_bytes((gb * (1u64 << 30) as f64).round() as u64)
}

/// How a worker ended, in words: the server's `reason`, else its exit code or signal.
pub fn outcome(w: &pb::Worker) -> String {
    if !w.reason.is_empty() {
        w.reason.clone()
    } else if let Some(c) = w.exit_code {
        format!("exited with code {c}")
    } else if let Some(s) = w.signal {
        format!("killed by signal {s}")
    } else {
        "-".to_owned()
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// A table for people, drawn by comfy-table without any lines: `header` (no header row when
/// empty) over `rows`, columns two spaces apart, those whose header is in `right` right-aligned
/// (numbers read better that way); each line ends in `\n` and carries no trailing blanks.
fn table<R: Into<Row>>(
    header: &[&str],
    right: &[&str],
    rows: impl IntoIterator<Item = R>,
) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    if !header.is_empty() {
        t.set_header(header.to_vec());
    }
    t.add_rows(rows);
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if header.get(i).is_some_and(|h| right.contains(h)) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.lines()
        .map(|line| line.trim_end().to_owned() + "\n")
        .collect()
}

/// Whether a worker runs as another user than the one who launched it (a root worker, or a
/// caller whose certificate name maps to no user of the host and runs as `worker_user`).
fn runs_as_other(w: &pb::Worker) -> bool {
    !w.user.is_empty() && w.user != w.owner
}

/// Workers as a table. OWNER is who launched each; the USER, SESSION, GPU and RESTARTS columns
/// appear only when some worker has one (USER: runs as another user than its owner), so the
/// common table stays narrow.
pub fn workers_table(workers: &[pb::Worker], now: SystemTime) -> String {
    let users = workers.iter().any(runs_as_other);
    let sessions = workers.iter().any(|w| !w.session_id.is_empty());
    let gpus = workers.iter().any(|w| w.nvidia_gpu > 0);
    let restarts = workers.iter().any(|w| w.restarts > 0);
    let mut headers = vec!["ID", "STATUS", "OWNER"];
    if users {
        headers.push("USER");
    }
    if sessions {
        headers.push("SESSION");
    }
    headers.extend(["HOST", "IP", "CPU", "MEM"]);
    if gpus {
        headers.push("GPU");
    }
    headers.extend(["PID", "AGE"]);
    if restarts {
        headers.push("RESTARTS");
    }
    headers.push("EXIT/REASON");
    let rows = workers.iter().map(|w| {
        let mut row = vec![
            w.id.clone(),
            status_name(w.status()).to_owned(),
            or_dash(&w.owner),
        ];
        if users {
            row.push(or_dash(&w.user));
        }
        if sessions {
            row.push(or_dash(&w.session_id));
        }
        row.extend([
            or_dash(&w.host),
            or_dash(&w.ip_address),
            format_cpu(w.cpu),
            format_gib(w.memory_gb),
        ]);
        if gpus {
            row.push(w.nvidia_gpu.to_string());
        }
        row.extend([
            if w.pid == 0 {
                "-".to_owned()
            } else {
                w.pid.to_string()
            },
            format_age(w.created_at.as_ref(), now),
        ]);
        if restarts {
            row.push(w.restarts.to_string());
        }
        row.push(outcome(w));
        row
    });
    table(
        &headers,
        &["CPU", "MEM", "GPU", "PID", "AGE", "RESTARTS"],
        rows,
    )
}

/// The result of an await: the workers that got there, then those that did not.
pub fn await_view(r: &pb::AwaitWorkersResponse, now: SystemTime) -> String {
    let mut out = String::new();
    if !r.workers.is_empty() || r.failures.is_empty() {
        out.push_str(&workers_table(&r.workers, now));
    }
    if !r.failures.is_empty() {
        if !r.workers.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("FAILURES ({})\n", r.failures.len()));
        out.push_str(&workers_table(&r.failures, now));
    }
    out
}

/// `used/total` of one resource.
fn share(used: String, total: String) -> String {
    format!("{used}/{total}")
}

fn labels_line(labels: &std::collections::HashMap<String, String>) -> String {
    let mut kv: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    kv.sort();
    if kv.is_empty() {
        "-".to_owned()
    } else {
        kv.join(" ")
    }
}

/// `berth info`: the host's identity, then resources, kernels and GPUs as tables.
pub fn host_info_view(h: &pb::HostInfo, now: SystemTime) -> String {
    let started = match &h.started_at {
        Some(t) => format!("{t} (up {})", format_age(Some(t), now)),
        None => "-".to_owned(),
    };
    let about = [
        ("name", or_dash(&h.name)),
        ("version", or_dash(&h.version)),
        ("address", or_dash(&h.address)),
        ("cgroup", format!("v{}", h.cgroup_version)),
        ("subnet", or_dash(&h.subnet)),
        ("gpu backend", or_dash(&h.gpu_backend)),
        ("started", started),
        ("labels", labels_line(&h.labels)),
    ];
    let mut out = table(&[], &[], about.map(|(k, v)| [k.to_owned(), v]));

    let cap = h.capacity.unwrap_or_default();
    let alloc = h.allocated.unwrap_or_default();
    let mut res = vec![
        [
            "cpu".to_owned(),
            format_cpu(cap.cpu),
            format_cpu(alloc.cpu),
            format_cpu((cap.cpu - alloc.cpu).max(0.0)),
        ],
        [
            "memory".to_owned(),
            format_gib(cap.memory_gb),
            format_gib(alloc.memory_gb),
            format_gib(cap.memory_gb - alloc.memory_gb),
        ],
    ];
    for (name, c, a) in [
        ("gpus", cap.gpus, alloc.gpus),
        ("workers", cap.workers, alloc.workers),
        ("addresses", cap.addresses, alloc.addresses),
    ] {
        res.push([
            name.to_owned(),
            c.to_string(),
            a.to_string(),
            c.saturating_sub(a).to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(
        &["RESOURCE", "CAPACITY", "ALLOCATED", "FREE"],
        &["CAPACITY", "ALLOCATED", "FREE"],
        res,
    ));

    if !h.kernels.is_empty() {
        let rows = h.kernels.iter().map(|kernel| {
            [
                kernel.name.clone(),
                if kernel.available { "yes" } else { "no" }.to_owned(),
                or_dash(&kernel.path),
            ]
        });
        out.push('\n');
        out.push_str(&table(&["KERNEL", "AVAILABLE", "PATH"], &[], rows));
    }

    if !h.gpus.is_empty() {
        let rows = h.gpus.iter().map(|gpu| {
            [
                gpu.index.to_string(),
                or_dash(&gpu.name),
                or_dash(&gpu.uuid),
                share(
                    format_bytes(gpu.memory_used_bytes),
                    format_bytes(gpu.memory_total_bytes),
                ),
                format!("{}%", gpu.utilization_percent),
                or_dash(&gpu.worker_id),
            ]
        });
        out.push('\n');
        out.push_str(&table(
            &["GPU", "NAME", "UUID", "MEMORY", "UTIL", "WORKER"],
            &["GPU", "MEMORY", "UTIL"],
            rows,
        ));
    }
    out
}

/// `berth hosts`: one line per host of a scheduler, resources as `allocated/capacity`.
pub fn hosts_table(hosts: &[pb::ClusterHost], now: SystemTime) -> String {
    let rows = hosts.iter().map(|h| {
        let info = h.info.clone().unwrap_or_default();
        let cap = info.capacity.unwrap_or_default();
        let alloc = info.allocated.unwrap_or_default();
        [
            or_dash(&info.name),
            host_state_name(h.state()).to_owned(),
            or_dash(&info.address),
            share(format_cpu(alloc.cpu), format_cpu(cap.cpu)),
            share(format_gib(alloc.memory_gb), format_gib(cap.memory_gb)),
            share(alloc.gpus.to_string(), cap.gpus.to_string()),
            share(alloc.workers.to_string(), cap.workers.to_string()),
            match &h.last_seen {
                Some(t) => format!("{} ago", format_age(Some(t), now)),
                None => "-".to_owned(),
            },
        ]
    });
    table(
        &[
            "NAME",
            "STATE",
            "ADDRESS",
            "CPU",
            "MEM",
            "GPUS",
            "WORKERS",
            "LAST SEEN",
        ],
        &["CPU", "MEM", "GPUS", "WORKERS", "LAST SEEN"],
        rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ts(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })
    }

    #[test]
    fn tables() {
        let rows = [["a", "0.5", "first"], ["bbbb", "16", "x"]];
        assert_eq!(
            table(&["ID", "CPU", "NAME"], &["CPU"], rows),
            "ID    CPU  NAME\n\
             a     0.5  first\n\
             bbbb   16  x\n"
        );
        assert_eq!(table(&["A", "B"], &[], Vec::<[&str; 2]>::new()), "A  B\n");
        // No header row; a short last cell leaves no blanks; width is what the terminal shows.
        assert_eq!(
            table(
                &[],
                &[],
                [["h\u{e9}llo", "1"], ["x", "long value"], ["y", ""]]
            ),
            "h\u{e9}llo  1\nx      long value\ny\n"
        );
    }

    #[test]
    fn durations() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (187, "3m7s"),
            (3_599, "59m59s"),
            (3_600, "1h"),
            (7_500, "2h5m"),
            (86_399, "23h59m"),
            (86_400, "1d"),
            (3 * 86_400 + 4 * 3_600 + 59, "3d4h"),
        ];
        for (s, want) in cases {
            assert_eq!(format_duration(Duration::from_secs(s)), want, "{s}");
        }
        assert_eq!(format_duration(Duration::from_millis(1_999)), "1s");
    }

    #[test]
    fn ages() {
        let now = at(1_000);
        assert_eq!(format_age(ts(990).as_ref(), now), "10s");
        assert_eq!(format_age(ts(2_000).as_ref(), now), "0s", "future: skew");
        assert_eq!(format_age(None, now), "-");
    }

    #[test]
    fn numbers_and_sizes() {
        for (x, want) in [(0.1, "0.1"), (1.0, "1"), (16.0, "16"), (0.125, "0.125")] {
            assert_eq!(format_cpu(x), want);
        }
        assert_eq!(format_cpu(0.33333), "0.333");
        assert_eq!(format_number(2.5, 0), "2");
        let sizes = [
            (0, "0B"),
            (1023, "1023B"),
            (1024, "1KiB"),
            (1536, "1.5KiB"),
            (128 << 20, "128MiB"),
            (1 << 30, "1GiB"),
            ((3 << 30) / 2, "1.5GiB"),
            (5 << 40, "5TiB"),
        ];
        for (b, want) in sizes {
            assert_eq!(format_bytes(b), want, "{b}");
        }
        for (g, want) in [
            (1.0, "1GiB"),
            (0.125, "128MiB"),
            (0.25, "256MiB"),
            (62.5, "62.5GiB"),
            (0.0, "0"),
            (-1.0, "0"),
            (f64::NAN, "0"),
        ] {
            assert_eq!(format_gib(g), want, "{g}");
        }
    }

    fn worker(id: &str, status: pb::WorkerStatus) -> pb::Worker {
        pb::Worker {
            id: id.into(),
            owner: "alice".into(),
            user: "alice".into(),
            host: "h1".into(),
            status: status as i32,
            cpu: 0.5,
            memory_gb: 0.125,
            created_at: ts(900),
            ..Default::default()
        }
    }

    #[test]
    fn outcomes() {
        let mut w = worker("a", pb::WorkerStatus::Running);
        assert_eq!(outcome(&w), "-");
        w.signal = Some(9);
        assert_eq!(outcome(&w), "killed by signal 9");
        w.exit_code = Some(3);
        assert_eq!(outcome(&w), "exited with code 3");
        w.reason = "OOMKilled".into();
        assert_eq!(outcome(&w), "OOMKilled");
    }

    #[test]
    fn worker_table() {
        let mut a = worker("abc123", pb::WorkerStatus::Running);
        a.ip_address = "10.88.0.2".into();
        a.pid = 4242;
        let mut b = worker("def", pb::WorkerStatus::Failed);
        b.cpu = 2.0;
        b.memory_gb = 1.5;
        b.exit_code = Some(1);
        b.reason = "exited with code 1".into();
        b.created_at = ts(0);
        b.owner = String::new();
        b.user = String::new();
        let got = workers_table(&[a, b], at(1_000));
        let want = "\
ID      STATUS   OWNER  HOST  IP         CPU     MEM   PID     AGE  EXIT/REASON
abc123  running  alice  h1    10.88.0.2  0.5  128MiB  4242   1m40s  -
def     failed   -      h1    -            2  1.5GiB     -  16m40s  exited with code 1
";
        assert_eq!(got, want);
    }

    #[test]
    fn worker_table_optional_columns() {
        let mut a = worker("a", pb::WorkerStatus::Running);
        a.session_id = "s1".into();
        a.nvidia_gpu = 2;
        a.restarts = 3;
        a.user = "root".into();
        let got = workers_table(&[a], at(900));
        let header = got.lines().next().unwrap();
        assert_eq!(
            header.split_whitespace().collect::<Vec<_>>(),
            [
                "ID",
                "STATUS",
                "OWNER",
                "USER",
                "SESSION",
                "HOST",
                "IP",
                "CPU",
                "MEM",
                "GPU",
                "PID",
                "AGE",
                "RESTARTS",
                "EXIT/REASON"
            ]
        );
        let row: Vec<&str> = got.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(&row[2..5], ["alice", "root", "s1"]);
        assert_eq!(row[9], "2");
        assert_eq!(row[12], "3");
    }

    #[test]
    fn user_column_only_for_workers_that_run_as_another() {
        let header = |ws: &[pb::Worker]| {
            let t = workers_table(ws, at(900));
            t.lines().next().unwrap().to_owned()
        };
        let same = worker("a", pb::WorkerStatus::Running);
        assert!(!header(std::slice::from_ref(&same)).contains("USER"));
        // A server that does not say whom a worker runs as.
        let mut unsaid = same.clone();
        unsaid.user = String::new();
        assert!(!header(&[unsaid]).contains("USER"));
        let mut mapped = same.clone();
        mapped.user = "nobody".into();
        assert!(header(&[same, mapped]).contains("USER"));
    }

    #[test]
    fn empty_table_is_a_header() {
        assert_eq!(workers_table(&[], at(0)).lines().count(), 1);
    }

    #[test]
    fn await_sections() {
        let now = at(1_000);
        let ok = worker("ok", pb::WorkerStatus::Succeeded);
        let bad = worker("bad", pb::WorkerStatus::Failed);
        let both = await_view(
            &pb::AwaitWorkersResponse {
                workers: vec![ok.clone()],
                failures: vec![bad.clone()],
            },
            now,
        );
        let lines: Vec<&str> = both.lines().collect();
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].starts_with("ok "));
        assert_eq!(lines[2], "");
        assert_eq!(lines[3], "FAILURES (1)");
        assert!(lines[4].starts_with("ID"));
        assert!(lines[5].starts_with("bad "));
        let only_failures = await_view(
            &pb::AwaitWorkersResponse {
                workers: vec![],
                failures: vec![bad],
            },
            now,
        );
        assert!(only_failures.starts_with("FAILURES (1)\nID"));
        let only_ok = await_view(
            &pb::AwaitWorkersResponse {
                workers: vec![ok],
                failures: vec![],
            },
            now,
        );
        assert!(!only_ok.contains("FAILURES"));
    }

    #[test]
    fn host_info() {
        let h = pb::HostInfo {
            name: "node1".into(),
            version: "0.1.0".into(),
            labels: [
                ("zone".to_owned(), "a".to_owned()),
                ("rack".into(), "7".into()),
            ]
            .into(),
            capacity: Some(pb::Resources {
                cpu: 16.0,
                memory_gb: 64.0,
                gpus: 2,
                workers: 100,
                addresses: 65533,
            }),
            allocated: Some(pb::Resources {
                cpu: 0.5,
                memory_gb: 0.125,
                gpus: 1,
                workers: 1,
                addresses: 1,
            }),
            gpus: vec![pb::Gpu {
                uuid: "GPU-1".into(),
                index: 0,
                name: "A100".into(),
                memory_total_bytes: 80 << 30,
                memory_used_bytes: 1 << 30,
                utilization_percent: 42,
                worker_id: "abc".into(),
                ..Default::default()
            }],
            subnet: "10.88.0.0/16".into(),
            cgroup_version: 2,
            kernels: vec![
                pb::Kernel {
                    name: "python3".into(),
                    path: "/usr/bin/python3".into(),
                    available: true,
                },
                pb::Kernel {
                    name: "r".into(),
                    path: String::new(),
                    available: false,
                },
            ],
            gpu_backend: "nvml".into(),
            started_at: ts(0),
            ..Default::default()
        };
        let got = host_info_view(&h, at(3_700));
        assert!(
            got.starts_with("name         node1\nversion      0.1.0\n"),
            "{got}"
        );
        assert!(got.contains("cgroup       v2\n"), "{got}");
        assert!(got.contains("labels       rack=7 zone=a\n"), "{got}");
        assert!(got.contains("address      -\n"), "{got}");
        assert!(got.contains("(up 1h1m)"), "{got}");
        assert!(
            got.contains("cpu              16        0.5     15.5\n"),
            "{got}"
        );
        assert!(got.contains("memory        64GiB     128MiB"), "{got}");
        assert!(
            got.contains("workers         100          1       99\n"),
            "{got}"
        );
        assert!(
            got.contains("addresses     65533          1    65532\n"),
            "{got}"
        );
        assert!(
            got.contains("python3  yes        /usr/bin/python3\n"),
            "{got}"
        );
        assert!(got.contains("r        no         -\n"), "{got}");
        assert!(got.contains("A100"), "{got}");
        assert!(got.contains("1GiB/80GiB   42%  abc\n"), "{got}");
    }

    #[test]
    fn hosts() {
        let h = pb::ClusterHost {
            info: Some(pb::HostInfo {
                name: "n1".into(),
                address: "10.0.0.1:7300".into(),
                capacity: Some(pb::Resources {
                    cpu: 8.0,
                    memory_gb: 32.0,
                    gpus: 0,
                    workers: 50,
                    ..Default::default()
                }),
                allocated: Some(pb::Resources {
                    cpu: 1.5,
                    memory_gb: 2.0,
                    gpus: 0,
                    workers: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            state: pb::HostState::Draining as i32,
            last_seen: ts(995),
        };
        let got = hosts_table(&[h], at(1_000));
        assert_eq!(
            got,
            "\
NAME  STATE     ADDRESS          CPU         MEM  GPUS  WORKERS  LAST SEEN
n1    draining  10.0.0.1:7300  1.5/8  2GiB/32GiB   0/0     3/50     5s ago
"
        );
    }
}
