//! What scripts read (`--json`): the response messages as JSON, with the proto field names,
//! enums by their proto names (`WORKER_STATUS_RUNNING`), timestamps in RFC 3339, unset
//! optional fields as `null`, and 64-bit integers as numbers. `client/JSON.md` is the contract
//! (the R client parses these documents, a Python test compares them with the Python client's
//! dicts); a change here is a change there.
//!
//! Each document is a view that borrows from the response and derives `Serialize`. A view
//! takes its message apart field by field, without `..`, so a field added to the proto does
//! not build until it is given its place here. The fields are declared in the sorted order of
//! their names, the order in which `berth --json` has always written the keys (JSON.md gives
//! the order no meaning; the tests below hold it all the same).

use std::collections::{BTreeMap, HashMap};

use prost_types::Timestamp;
use serde::{Serialize, Serializer};

use crate::pb;

/// A timestamp in RFC 3339 as prost writes it (UTC, `Z`, the fraction of a second as sent),
/// `null` when unset.
fn rfc3339<S: Serializer>(t: &Option<&Timestamp>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(t),
        None => s.serialize_none(),
    }
}

/// A map with its keys in order, so the output is stable.
fn sorted(m: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A `Worker`.
#[derive(Debug, Serialize)]
pub struct Worker<'a> {
    command: &'a [String],
    cpu: f64,
    cpu_seconds: f64,
    #[serde(serialize_with = "rfc3339")]
    created_at: Option<&'a Timestamp>,
    exit_code: Option<i32>,
    #[serde(serialize_with = "rfc3339")]
    finished_at: Option<&'a Timestamp>,
    gpu_memory_used_bytes: u64,
    gpu_uuids: &'a [String],
    host: &'a str,
    id: &'a str,
    ip_address: &'a str,
    kernel: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
    memory_gb: f64,
    memory_peak_bytes: u64,
    network: &'static str,
    nvidia_gpu: u32,
    output_dropped_bytes: u64,
    owner: &'a str,
    pid: u32,
    pooled: bool,
    reason: &'a str,
    request_id: &'a str,
    restarts: u32,
    session_id: &'a str,
    signal: Option<i32>,
    #[serde(serialize_with = "rfc3339")]
    started_at: Option<&'a Timestamp>,
    status: &'static str,
    user: &'a str,
    workdir: &'a str,
}

impl<'a> From<&'a pb::Worker> for Worker<'a> {
    fn from(w: &'a pb::Worker) -> Self {
        let pb::Worker {
            id,
            session_id,
            host,
            ip_address,
            status: _,
            cpu,
            memory_gb,
            nvidia_gpu,
            gpu_uuids,
            kernel,
            command,
            pid,
            exit_code,
            signal,
            reason,
            restarts,
            labels,
            created_at,
            started_at,
            finished_at,
            cpu_seconds,
            memory_peak_bytes,
            workdir,
            network: _,
            gpu_memory_used_bytes,
            owner,
            user,
            pooled,
            output_dropped_bytes,
            request_id,
        } = w;
        Self {
            command,
            cpu: *cpu,
            cpu_seconds: *cpu_seconds,
            created_at: created_at.as_ref(),
            exit_code: *exit_code,
            finished_at: finished_at.as_ref(),
            gpu_memory_used_bytes: *gpu_memory_used_bytes,
            gpu_uuids,
            host,
            id,
            ip_address,
            kernel,
            labels: sorted(labels),
            memory_gb: *memory_gb,
            memory_peak_bytes: *memory_peak_bytes,
            network: w.network().as_str_name(),
            nvidia_gpu: *nvidia_gpu,
            output_dropped_bytes: *output_dropped_bytes,
            owner,
            pid: *pid,
            pooled: *pooled,
            reason,
            request_id,
            restarts: *restarts,
            session_id,
            signal: *signal,
            started_at: started_at.as_ref(),
            status: w.status().as_str_name(),
            user,
            workdir,
        }
    }
}

fn workers(ws: &[pb::Worker]) -> Vec<Worker<'_>> {
    ws.iter().map(Worker::from).collect()
}

/// `LaunchWorkersResponse`, `ListWorkersResponse` and `StopWorkersResponse` alike.
#[derive(Debug, Serialize)]
pub struct WorkerList<'a> {
    workers: Vec<Worker<'a>>,
}

pub fn worker_list(ws: &[pb::Worker]) -> WorkerList<'_> {
    WorkerList {
        workers: workers(ws),
    }
}

/// `AwaitWorkersResponse`.
#[derive(Debug, Serialize)]
pub struct AwaitResponse<'a> {
    failures: Vec<Worker<'a>>,
    workers: Vec<Worker<'a>>,
}

pub fn await_response(r: &pb::AwaitWorkersResponse) -> AwaitResponse<'_> {
    let pb::AwaitWorkersResponse {
        workers: ok,
        failures,
    } = r;
    AwaitResponse {
        failures: workers(failures),
        workers: workers(ok),
    }
}

/// `CloseSessionResponse`: the workers that the close stopped.
#[derive(Debug, Serialize)]
pub struct CloseResponse<'a> {
    stopped: Vec<Worker<'a>>,
}

pub fn close_response(r: &pb::CloseSessionResponse) -> CloseResponse<'_> {
    let pb::CloseSessionResponse { stopped } = r;
    CloseResponse {
        stopped: workers(stopped),
    }
}

/// A `Session`, and the pid of the holder that `session open --hold-while` started (`null`
/// for none).
#[derive(Debug, Serialize)]
pub struct Session<'a> {
    #[serde(serialize_with = "rfc3339")]
    created_at: Option<&'a Timestamp>,
    #[serde(serialize_with = "rfc3339")]
    expires_at: Option<&'a Timestamp>,
    holder_pid: Option<u32>,
    id: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
    owner: &'a str,
    ttl_seconds: u32,
}

pub fn session(s: &pb::Session, holder_pid: Option<u32>) -> Session<'_> {
    let pb::Session {
        id,
        ttl_seconds,
        expires_at,
        created_at,
        labels,
        owner,
    } = s;
    Session {
        created_at: created_at.as_ref(),
        expires_at: expires_at.as_ref(),
        holder_pid,
        id,
        labels: sorted(labels),
        owner,
        ttl_seconds: *ttl_seconds,
    }
}

/// The document that `--json` writes on stderr when a verb fails, as its one line: `code` is
/// the gRPC code's canonical name, `message` the server's message (or what failed here).
pub fn error(code: &str, message: &str) -> String {
    #[derive(Serialize)]
    struct Error<'a> {
        error: Body<'a>,
    }
    #[derive(Serialize)]
    struct Body<'a> {
        code: &'a str,
        message: &'a str,
    }
    serde_json::to_string(&Error {
        error: Body { code, message },
    })
    .expect("a document of strings serializes")
}

/// `Resources`.
#[derive(Debug, Serialize)]
pub struct Resources {
    addresses: u32,
    cpu: f64,
    gpus: u32,
    memory_gb: f64,
    workers: u32,
}

impl From<&pb::Resources> for Resources {
    fn from(r: &pb::Resources) -> Self {
        let pb::Resources {
            cpu,
            memory_gb,
            gpus,
            workers,
            addresses,
        } = *r;
        Self {
            addresses,
            cpu,
            gpus,
            memory_gb,
            workers,
        }
    }
}

/// A `Gpu` of a host.
#[derive(Debug, Serialize)]
pub struct Gpu<'a> {
    index: u32,
    memory_total_bytes: u64,
    memory_used_bytes: u64,
    mig_enabled: bool,
    minor_number: u32,
    name: &'a str,
    pci_bus_id: &'a str,
    utilization_percent: u32,
    uuid: &'a str,
    worker_id: &'a str,
}

impl<'a> From<&'a pb::Gpu> for Gpu<'a> {
    fn from(g: &'a pb::Gpu) -> Self {
        let pb::Gpu {
            uuid,
            index,
            name,
            memory_total_bytes,
            memory_used_bytes,
            utilization_percent,
            pci_bus_id,
            mig_enabled,
            worker_id,
            minor_number,
        } = g;
        Self {
            index: *index,
            memory_total_bytes: *memory_total_bytes,
            memory_used_bytes: *memory_used_bytes,
            mig_enabled: *mig_enabled,
            minor_number: *minor_number,
            name,
            pci_bus_id,
            utilization_percent: *utilization_percent,
            uuid,
            worker_id,
        }
    }
}

/// A `Kernel` of a host.
#[derive(Debug, Serialize)]
pub struct Kernel<'a> {
    available: bool,
    name: &'a str,
    path: &'a str,
}

impl<'a> From<&'a pb::Kernel> for Kernel<'a> {
    fn from(k: &'a pb::Kernel) -> Self {
        let pb::Kernel {
            name,
            path,
            available,
        } = k;
        Self {
            available: *available,
            name,
            path,
        }
    }
}

/// `HostInfo`.
#[derive(Debug, Serialize)]
pub struct HostInfo<'a> {
    address: &'a str,
    allocated: Option<Resources>,
    capacity: Option<Resources>,
    cgroup_version: u32,
    gpu_backend: &'a str,
    gpus: Vec<Gpu<'a>>,
    kernels: Vec<Kernel<'a>>,
    labels: BTreeMap<&'a str, &'a str>,
    name: &'a str,
    #[serde(serialize_with = "rfc3339")]
    started_at: Option<&'a Timestamp>,
    subnet: &'a str,
    version: &'a str,
}

impl<'a> From<&'a pb::HostInfo> for HostInfo<'a> {
    fn from(h: &'a pb::HostInfo) -> Self {
        let pb::HostInfo {
            name,
            version,
            labels,
            capacity,
            allocated,
            gpus,
            subnet,
            cgroup_version,
            address,
            kernels,
            gpu_backend,
            started_at,
        } = h;
        Self {
            address,
            allocated: allocated.as_ref().map(Resources::from),
            capacity: capacity.as_ref().map(Resources::from),
            cgroup_version: *cgroup_version,
            gpu_backend,
            gpus: gpus.iter().map(Gpu::from).collect(),
            kernels: kernels.iter().map(Kernel::from).collect(),
            labels: sorted(labels),
            name,
            started_at: started_at.as_ref(),
            subnet,
            version,
        }
    }
}

pub fn host_info(h: &pb::HostInfo) -> HostInfo<'_> {
    HostInfo::from(h)
}

/// A `ClusterHost`: a host as a scheduler knows it.
#[derive(Debug, Serialize)]
pub struct ClusterHost<'a> {
    info: Option<HostInfo<'a>>,
    #[serde(serialize_with = "rfc3339")]
    last_seen: Option<&'a Timestamp>,
    state: &'static str,
}

impl<'a> From<&'a pb::ClusterHost> for ClusterHost<'a> {
    fn from(c: &'a pb::ClusterHost) -> Self {
        let pb::ClusterHost {
            info,
            state: _,
            last_seen,
        } = c;
        Self {
            info: info.as_ref().map(HostInfo::from),
            last_seen: last_seen.as_ref(),
            state: c.state().as_str_name(),
        }
    }
}

pub fn cluster_host(h: &pb::ClusterHost) -> ClusterHost<'_> {
    ClusterHost::from(h)
}

/// `ListHostsResponse`.
#[derive(Debug, Serialize)]
pub struct Hosts<'a> {
    hosts: Vec<ClusterHost<'a>>,
}

pub fn hosts(r: &pb::ListHostsResponse) -> Hosts<'_> {
    let pb::ListHostsResponse { hosts } = r;
    Hosts {
        hosts: hosts.iter().map(ClusterHost::from).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    /// Every field set; text that JSON escapes; a 64-bit number past 2^53.
    fn full_worker() -> pb::Worker {
        pb::Worker {
            id: "w1".into(),
            session_id: "s1".into(),
            host: "node1".into(),
            ip_address: "10.88.0.2".into(),
            status: pb::WorkerStatus::Failed as i32,
            cpu: 0.1,
            memory_gb: 1.5,
            nvidia_gpu: 2,
            gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
            kernel: "python3".into(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"hi\"\n\u{e9}\u{1}".into(),
            ],
            pid: 4242,
            exit_code: Some(1),
            signal: Some(9),
            reason: "exited with code 1".into(),
            restarts: 3,
            labels: [
                ("zone".to_owned(), "a".to_owned()),
                ("b".into(), "".into()),
                ("A".into(), "x".into()),
            ]
            .into(),
            created_at: ts(1_700_000_000, 98_187_267),
            started_at: ts(1_700_000_001, 500_000_000),
            finished_at: ts(1_700_000_002, 0),
            cpu_seconds: 12.25,
            memory_peak_bytes: u64::MAX,
            workdir: "/tmp/w".into(),
            network: pb::NetworkMode::Bridge as i32,
            gpu_memory_used_bytes: 1 << 40,
            owner: "alice".into(),
            user: "nobody".into(),
            pooled: true,
            output_dropped_bytes: 4096,
            request_id: "job-1~2.0000abcd".into(),
        }
    }

    const FULL_WORKER: &str = r#"{
  "command": [
    "/bin/sh",
    "-c",
    "echo \"hi\"\né\u0001"
  ],
  "cpu": 0.1,
  "cpu_seconds": 12.25,
  "created_at": "2023-11-14T22:13:20.098187267Z",
  "exit_code": 1,
  "finished_at": "2023-11-14T22:13:22Z",
  "gpu_memory_used_bytes": 1099511627776,
  "gpu_uuids": [
    "GPU-a",
    "GPU-b"
  ],
  "host": "node1",
  "id": "w1",
  "ip_address": "10.88.0.2",
  "kernel": "python3",
  "labels": {
    "A": "x",
    "b": "",
    "zone": "a"
  },
  "memory_gb": 1.5,
  "memory_peak_bytes": 18446744073709551615,
  "network": "NETWORK_MODE_BRIDGE",
  "nvidia_gpu": 2,
  "output_dropped_bytes": 4096,
  "owner": "alice",
  "pid": 4242,
  "pooled": true,
  "reason": "exited with code 1",
  "request_id": "job-1~2.0000abcd",
  "restarts": 3,
  "session_id": "s1",
  "signal": 9,
  "started_at": "2023-11-14T22:13:21.500Z",
  "status": "WORKER_STATUS_FAILED",
  "user": "nobody",
  "workdir": "/tmp/w"
}"#;

    /// A worker with nothing set: zeros and empty strings are themselves, unset is `null`.
    const EMPTY_WORKER: &str = r#"{"command":[],"cpu":0.0,"cpu_seconds":0.0,"created_at":null,"exit_code":null,"finished_at":null,"gpu_memory_used_bytes":0,"gpu_uuids":[],"host":"","id":"","ip_address":"","kernel":"","labels":{},"memory_gb":0.0,"memory_peak_bytes":0,"network":"NETWORK_MODE_BRIDGE","nvidia_gpu":0,"output_dropped_bytes":0,"owner":"","pid":0,"pooled":false,"reason":"","request_id":"","restarts":0,"session_id":"","signal":null,"started_at":null,"status":"WORKER_STATUS_UNSPECIFIED","user":"","workdir":""}"#;

    fn full_host() -> pb::HostInfo {
        pb::HostInfo {
            name: "node1".into(),
            version: "0.1.0".into(),
            labels: [
                ("zone".to_owned(), "a".to_owned()),
                ("rack".into(), "7".into()),
            ]
            .into(),
            capacity: Some(pb::Resources {
                cpu: 16.0,
                memory_gb: 62.5,
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
                uuid: "GPU-a".into(),
                index: 1,
                name: "A100".into(),
                memory_total_bytes: 80 << 30,
                memory_used_bytes: 1 << 30,
                utilization_percent: 42,
                pci_bus_id: "0000:01:00.0".into(),
                mig_enabled: true,
                worker_id: "w1".into(),
                minor_number: 3,
            }],
            subnet: "10.88.0.0/16".into(),
            cgroup_version: 2,
            address: "10.0.0.1:7300".into(),
            kernels: vec![pb::Kernel {
                name: "python3".into(),
                path: "/usr/bin/python3".into(),
                available: true,
            }],
            gpu_backend: "nvml".into(),
            started_at: ts(1_600_000_000, 1),
        }
    }

    const FULL_HOST: &str = r#"{
  "address": "10.0.0.1:7300",
  "allocated": {
    "addresses": 1,
    "cpu": 0.5,
    "gpus": 1,
    "memory_gb": 0.125,
    "workers": 1
  },
  "capacity": {
    "addresses": 65533,
    "cpu": 16.0,
    "gpus": 2,
    "memory_gb": 62.5,
    "workers": 100
  },
  "cgroup_version": 2,
  "gpu_backend": "nvml",
  "gpus": [
    {
      "index": 1,
      "memory_total_bytes": 85899345920,
      "memory_used_bytes": 1073741824,
      "mig_enabled": true,
      "minor_number": 3,
      "name": "A100",
      "pci_bus_id": "0000:01:00.0",
      "utilization_percent": 42,
      "uuid": "GPU-a",
      "worker_id": "w1"
    }
  ],
  "kernels": [
    {
      "available": true,
      "name": "python3",
      "path": "/usr/bin/python3"
    }
  ],
  "labels": {
    "rack": "7",
    "zone": "a"
  },
  "name": "node1",
  "started_at": "2020-09-13T12:26:40.000000001Z",
  "subnet": "10.88.0.0/16",
  "version": "0.1.0"
}"#;

    const EMPTY_HOST: &str = r#"{"address":"","allocated":null,"capacity":null,"cgroup_version":0,"gpu_backend":"","gpus":[],"kernels":[],"labels":{},"name":"","started_at":null,"subnet":"","version":""}"#;

    /// The one-line form of a document written pretty.
    fn compact(pretty: &str) -> String {
        serde_json::to_string(&serde_json::from_str::<Value>(pretty).unwrap()).unwrap()
    }

    /// The text of `doc`, checked to have its keys sorted (as a `Value`, which sorts them,
    /// writes it).
    fn text<T: Serialize>(doc: &T) -> String {
        let text = serde_json::to_string(doc).unwrap();
        let sorted = serde_json::to_string(&serde_json::to_value(doc).unwrap()).unwrap();
        assert_eq!(text, sorted, "keys out of order");
        text
    }

    #[test]
    fn workers() {
        let full = full_worker();
        // As `berth --json` prints it: pretty.
        let got = serde_json::to_string_pretty(&Worker::from(&full)).unwrap();
        assert_eq!(got, FULL_WORKER);
        assert_eq!(text(&Worker::from(&pb::Worker::default())), EMPTY_WORKER);
        assert_eq!(
            text(&worker_list(&[full.clone(), pb::Worker::default()])),
            format!(r#"{{"workers":[{},{EMPTY_WORKER}]}}"#, compact(FULL_WORKER))
        );
        assert_eq!(text(&worker_list(&[])), r#"{"workers":[]}"#);
        // A value the proto does not know is the enum's default, as prost reads it.
        let odd = pb::Worker {
            status: 99,
            cpu: f64::NAN,
            ..Default::default()
        };
        let v = serde_json::to_value(Worker::from(&odd)).unwrap();
        assert_eq!(v["status"], "WORKER_STATUS_UNSPECIFIED");
        assert_eq!(v["cpu"], Value::Null);
    }

    #[test]
    fn await_and_close() {
        let full = full_worker();
        let w2 = pb::Worker {
            id: "w2".into(),
            ..Default::default()
        };
        let empty_w2 = EMPTY_WORKER.replace(r#""id":"""#, r#""id":"w2""#);
        assert_eq!(
            text(&await_response(&pb::AwaitWorkersResponse {
                workers: vec![full],
                failures: vec![w2.clone()],
            })),
            format!(
                r#"{{"failures":[{empty_w2}],"workers":[{}]}}"#,
                compact(FULL_WORKER)
            )
        );
        assert_eq!(
            text(&await_response(&pb::AwaitWorkersResponse::default())),
            r#"{"failures":[],"workers":[]}"#
        );
        assert_eq!(
            text(&close_response(&pb::CloseSessionResponse {
                stopped: vec![w2]
            })),
            format!(r#"{{"stopped":[{empty_w2}]}}"#)
        );
    }

    #[test]
    fn sessions() {
        let s = pb::Session {
            id: "s1".into(),
            ttl_seconds: 30,
            expires_at: ts(1_700_000_030, 5),
            created_at: ts(1_700_000_000, 0),
            labels: [
                ("berth.client".to_owned(), "r".to_owned()),
                ("a".into(), "b".into()),
            ]
            .into(),
            owner: "alice".into(),
        };
        assert_eq!(
            text(&session(&s, Some(42))),
            r#"{"created_at":"2023-11-14T22:13:20Z","expires_at":"2023-11-14T22:13:50.000000005Z","holder_pid":42,"id":"s1","labels":{"a":"b","berth.client":"r"},"owner":"alice","ttl_seconds":30}"#
        );
        assert_eq!(
            text(&session(&pb::Session::default(), None)),
            r#"{"created_at":null,"expires_at":null,"holder_pid":null,"id":"","labels":{},"owner":"","ttl_seconds":0}"#
        );
    }

    #[test]
    fn hosts_and_host_info() {
        let got = serde_json::to_string_pretty(&host_info(&full_host())).unwrap();
        assert_eq!(got, FULL_HOST);
        assert_eq!(text(&host_info(&pb::HostInfo::default())), EMPTY_HOST);
        assert_eq!(
            text(&cluster_host(&pb::ClusterHost {
                info: Some(full_host()),
                state: pb::HostState::Draining as i32,
                last_seen: ts(1_700_000_000, 0),
            })),
            format!(
                r#"{{"info":{},"last_seen":"2023-11-14T22:13:20Z","state":"HOST_STATE_DRAINING"}}"#,
                compact(FULL_HOST)
            )
        );
        assert_eq!(
            text(&hosts(&pb::ListHostsResponse {
                hosts: vec![
                    pb::ClusterHost {
                        info: Some(pb::HostInfo::default()),
                        state: pb::HostState::Ready as i32,
                        last_seen: None,
                    },
                    pb::ClusterHost::default(),
                ],
            })),
            format!(
                r#"{{"hosts":[{{"info":{EMPTY_HOST},"last_seen":null,"state":"HOST_STATE_READY"}},{}]}}"#,
                r#"{"info":null,"last_seen":null,"state":"HOST_STATE_UNSPECIFIED"}"#
            )
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            error("NOT_FOUND", "session \"s1\"\n"),
            r#"{"error":{"code":"NOT_FOUND","message":"session \"s1\"\n"}}"#
        );
    }
}
