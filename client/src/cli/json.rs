//! What scripts read (`--json`): the response messages as JSON, with the proto field names,
//! enums by their proto names (`WORKER_STATUS_RUNNING`), timestamps in RFC 3339, unset
//! optional fields as `null`, and 64-bit integers as numbers. `client/JSON.md` is the contract
//! (the R client parses these documents); a change here is a change there.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::pb;

fn timestamp(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// A map with its keys in order, so the output is stable.
fn map(m: &HashMap<String, String>) -> Value {
    json!(m.iter().collect::<BTreeMap<_, _>>())
}

pub fn worker(w: &pb::Worker) -> Value {
    json!({
        "id": w.id,
        "session_id": w.session_id,
        "host": w.host,
        "ip_address": w.ip_address,
        "status": w.status().as_str_name(),
        "cpu": w.cpu,
        "memory_gb": w.memory_gb,
        "nvidia_gpu": w.nvidia_gpu,
        "gpu_uuids": w.gpu_uuids,
        "kernel": w.kernel,
        "command": w.command,
        "pid": w.pid,
        "exit_code": w.exit_code,
        "signal": w.signal,
        "reason": w.reason,
        "restarts": w.restarts,
        "labels": map(&w.labels),
        "created_at": timestamp(w.created_at.as_ref()),
        "started_at": timestamp(w.started_at.as_ref()),
        "finished_at": timestamp(w.finished_at.as_ref()),
        "cpu_seconds": w.cpu_seconds,
        "memory_peak_bytes": w.memory_peak_bytes,
        "workdir": w.workdir,
        "network": w.network().as_str_name(),
        "gpu_memory_used_bytes": w.gpu_memory_used_bytes,
    })
}

fn workers(ws: &[pb::Worker]) -> Value {
    Value::Array(ws.iter().map(worker).collect())
}

/// `LaunchWorkersResponse`, `ListWorkersResponse` and `StopWorkersResponse` alike.
pub fn worker_list(ws: &[pb::Worker]) -> Value {
    json!({ "workers": workers(ws) })
}

pub fn await_response(r: &pb::AwaitWorkersResponse) -> Value {
    json!({ "workers": workers(&r.workers), "failures": workers(&r.failures) })
}

/// `CloseSessionResponse`: the workers that the close stopped.
pub fn close_response(r: &pb::CloseSessionResponse) -> Value {
    json!({ "stopped": workers(&r.stopped) })
}

/// A `Session`, and the pid of the holder that `session open --hold-while` started (`null`
/// for none).
pub fn session(s: &pb::Session, holder_pid: Option<u32>) -> Value {
    json!({
        "id": s.id,
        "ttl_seconds": s.ttl_seconds,
        "expires_at": timestamp(s.expires_at.as_ref()),
        "created_at": timestamp(s.created_at.as_ref()),
        "labels": map(&s.labels),
        "holder_pid": holder_pid,
    })
}

/// The document that `--json` writes on stderr when a verb fails: `code` is the gRPC code's
/// canonical name, `message` the server's message (or what failed here).
pub fn error(code: &str, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message } })
}

fn resources(r: Option<&pb::Resources>) -> Value {
    r.map_or(Value::Null, |r| {
        json!({
            "cpu": r.cpu,
            "memory_gb": r.memory_gb,
            "gpus": r.gpus,
            "workers": r.workers,
            "addresses": r.addresses,
        })
    })
}

fn gpu(g: &pb::Gpu) -> Value {
    json!({
        "uuid": g.uuid,
        "index": g.index,
        "name": g.name,
        "memory_total_bytes": g.memory_total_bytes,
        "memory_used_bytes": g.memory_used_bytes,
        "utilization_percent": g.utilization_percent,
        "pci_bus_id": g.pci_bus_id,
        "mig_enabled": g.mig_enabled,
        "worker_id": g.worker_id,
        "minor_number": g.minor_number,
    })
}

fn kernel(k: &pb::Kernel) -> Value {
    json!({ "name": k.name, "path": k.path, "available": k.available })
}

pub fn host_info(h: &pb::HostInfo) -> Value {
    json!({
        "name": h.name,
        "version": h.version,
        "labels": map(&h.labels),
        "capacity": resources(h.capacity.as_ref()),
        "allocated": resources(h.allocated.as_ref()),
        "gpus": h.gpus.iter().map(gpu).collect::<Vec<_>>(),
        "subnet": h.subnet,
        "cgroup_version": h.cgroup_version,
        "address": h.address,
        "kernels": h.kernels.iter().map(kernel).collect::<Vec<_>>(),
        "gpu_backend": h.gpu_backend,
        "started_at": timestamp(h.started_at.as_ref()),
    })
}

pub fn cluster_host(h: &pb::ClusterHost) -> Value {
    json!({
        "info": h.info.as_ref().map_or(Value::Null, host_info),
        "state": h.state().as_str_name(),
        "last_seen": timestamp(h.last_seen.as_ref()),
    })
}

pub fn hosts(r: &pb::ListHostsResponse) -> Value {
    json!({ "hosts": r.hosts.iter().map(cluster_host).collect::<Vec<_>>() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_fields() {
        let w = pb::Worker {
            id: "abc".into(),
            status: pb::WorkerStatus::Failed as i32,
            cpu: 0.5,
            memory_gb: 0.25,
            command: vec!["/bin/false".into()],
            exit_code: Some(1),
            reason: "exited with code 1".into(),
            labels: [("b".to_owned(), "2".to_owned()), ("a".into(), "1".into())].into(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            memory_peak_bytes: u64::MAX,
            network: pb::NetworkMode::None as i32,
            ..Default::default()
        };
        let v = worker(&w);
        assert_eq!(v["id"], "abc");
        assert_eq!(v["status"], "WORKER_STATUS_FAILED");
        assert_eq!(v["cpu"], 0.5);
        assert_eq!(v["command"], json!(["/bin/false"]));
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["signal"], Value::Null);
        assert_eq!(v["labels"], json!({"a": "1", "b": "2"}));
        assert_eq!(v["created_at"], "2023-11-14T22:13:20.500Z");
        assert_eq!(v["started_at"], Value::Null);
        assert_eq!(v["memory_peak_bytes"], u64::MAX);
        assert_eq!(v["network"], "NETWORK_MODE_NONE");
        // Every field of the message is there.
        assert_eq!(v.as_object().unwrap().len(), 25);
        // And it round-trips through text.
        let text = serde_json::to_string(&worker_list(&[w])).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["workers"][0]["id"], "abc");
    }

    #[test]
    fn await_has_both_lists() {
        let v = await_response(&pb::AwaitWorkersResponse {
            workers: vec![pb::Worker {
                id: "a".into(),
                ..Default::default()
            }],
            failures: vec![],
        });
        assert_eq!(v["workers"][0]["id"], "a");
        assert_eq!(v["failures"], json!([]));
    }

    #[test]
    fn session_fields() {
        let s = pb::Session {
            id: "s1".into(),
            ttl_seconds: 10,
            expires_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            created_at: None,
            labels: [("berth.client".to_owned(), "r".to_owned())].into(),
        };
        let v = session(&s, Some(42));
        assert_eq!(v["id"], "s1");
        assert_eq!(v["ttl_seconds"], 10);
        assert_eq!(v["expires_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["created_at"], Value::Null);
        assert_eq!(v["labels"]["berth.client"], "r");
        assert_eq!(v["holder_pid"], 42);
        assert_eq!(session(&s, None)["holder_pid"], Value::Null);
        let c = close_response(&pb::CloseSessionResponse {
            stopped: vec![pb::Worker {
                id: "w".into(),
                ..Default::default()
            }],
        });
        assert_eq!(c["stopped"][0]["id"], "w");
        assert_eq!(
            error("NOT_FOUND", "session s1"),
            json!({"error": {"code": "NOT_FOUND", "message": "session s1"}})
        );
    }

    #[test]
    fn host_info_fields() {
        let h = pb::HostInfo {
            name: "n".into(),
            cgroup_version: 1,
            capacity: Some(pb::Resources {
                cpu: 4.0,
                memory_gb: 8.0,
                gpus: 1,
                workers: 10,
                addresses: 65533,
            }),
            gpus: vec![pb::Gpu {
                uuid: "GPU-x".into(),
                ..Default::default()
            }],
            kernels: vec![pb::Kernel {
                name: "python3".into(),
                path: "/usr/bin/python3".into(),
                available: true,
            }],
            ..Default::default()
        };
        let v = host_info(&h);
        assert_eq!(v["capacity"]["workers"], 10);
        assert_eq!(v["capacity"]["addresses"], 65533);
        assert_eq!(v["allocated"], Value::Null);
        assert_eq!(v["gpus"][0]["uuid"], "GPU-x");
        assert_eq!(v["kernels"][0]["available"], true);
        assert_eq!(v["cgroup_version"], 1);
        let c = hosts(&pb::ListHostsResponse {
            hosts: vec![pb::ClusterHost {
                info: Some(h),
                state: pb::HostState::Ready as i32,
                last_seen: None,
            }],
        });
        assert_eq!(c["hosts"][0]["state"], "HOST_STATE_READY");
        assert_eq!(c["hosts"][0]["info"]["name"], "n");
    }
}
