//! `berth.v1.Host`: what a host daemon tells about itself, to clients and in every heartbeat
//! to a scheduler.

use berth_proto::v1 as pb;
use berth_server::convert::ts;
use tonic::{Request, Response, Status};

use crate::supervisor::Host;

/// `berth.v1.Host` served by a host daemon.
#[derive(Debug, Clone)]
pub struct HostService {
    pub host: Host,
    /// Where clients reach this daemon (first TCP listen address).
    pub address: String,
}

#[tonic::async_trait]
impl pb::host_server::Host for HostService {
    async fn get_host_info(
        &self,
        _r: Request<pb::GetHostInfoRequest>,
    ) -> Result<Response<pb::HostInfo>, Status> {
        Ok(Response::new(host_info(&self.host, &self.address)))
    }
}

/// What a host daemon tells about itself: `GetHostInfo`, and every heartbeat to a scheduler.
pub fn host_info(host: &Host, address: &str) -> pb::HostInfo {
    let v = host.view();
    let gib = berth_core::launch::GIB;
    pb::HostInfo {
        name: v.name,
        version: berth_server::VERSION.to_owned(),
        labels: v.labels.into_iter().collect(),
        capacity: Some(pb::Resources {
            cpu: v.capacity.cpu,
            memory_gb: v.capacity.memory_bytes as f64 / gib,
            gpus: v.gpu_capacity,
            workers: v.capacity.workers,
            addresses: v.ip_capacity,
        }),
        allocated: Some(pb::Resources {
            cpu: v.allocated.cpu,
            memory_gb: v.allocated.memory_bytes as f64 / gib,
            gpus: v.gpu_allocated,
            workers: v.allocated.workers,
            addresses: u32::try_from(v.ip_leases).unwrap_or(u32::MAX),
        }),
        gpus: v
            .gpus
            .iter()
            .map(|g| pb::Gpu {
                uuid: g.device.uuid.clone(),
                index: g.device.index,
                name: g.device.name.clone(),
                memory_total_bytes: g.device.memory_total_bytes,
                memory_used_bytes: g.sample.as_ref().map_or(0, |s| s.memory_used_bytes),
                utilization_percent: g.sample.as_ref().map_or(0, |s| s.utilization_percent),
                pci_bus_id: g.device.pci_bus_id.clone(),
                mig_enabled: g.device.mig_enabled,
                worker_id: g.holder.clone().unwrap_or_default(),
                minor_number: g.device.minor_number,
            })
            .collect(),
        subnet: v.subnet,
        cgroup_version: v.cgroup_version.number(),
        address: address.to_owned(),
        kernels: v
            .kernels
            .iter()
            .map(|k| pb::Kernel {
                name: k.name.clone(),
                path: k
                    .invocation
                    .as_ref()
                    .map(|i| i.interpreter.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                available: k.invocation.is_some(),
            })
            .collect(),
        gpu_backend: v.gpu_backend.into(),
        started_at: Some(ts(v.started_at)),
    }
}
