//! `berth-gpu-check`: the small client that `tests/gpu/h100-check.sh` drives on a machine with
//! real NVIDIA GPUs. Each subcommand makes one call and prints plain `key=value` lines a shell
//! script can grep. Exit status: 0 done, 1 the call failed, 3 RESOURCE_EXHAUSTED, 2 bad usage.
//!
//! ```text
//! berth-gpu-check --addr unix:/tmp/x.sock info
//! berth-gpu-check --addr … launch [--gpus K] [--n N] [--cpu C] [--memory GB] [--env K=V]… -- CMD…
//! berth-gpu-check --addr … running ID…         wait until RUNNING (30 s)
//! berth-gpu-check --addr … wait ID [SECONDS]   wait until ended; exit 0 when it succeeded
//! berth-gpu-check --addr … worker ID           status and live usage of one worker
//! berth-gpu-check --addr … logs ID             stdout, then stderr
//! berth-gpu-check --addr … stop ID…|--all
//! berth-gpu-check nvml                         inventory and one sample straight from NVML
//! ```

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use berth_client::{pb, Client};

fn usage() -> ExitCode {
    eprintln!(
        "usage: berth-gpu-check [--addr ADDR] info | launch [--gpus K] [--n N] [--cpu C] \
         [--memory GB] [--env K=V]... -- CMD... | running ID... | wait ID [SECONDS] | \
         worker ID | logs ID | stop ID...|--all | nvml"
    );
    ExitCode::from(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut addr = std::env::var("BERTH_ADDR").unwrap_or_else(|_| "127.0.0.1:7300".into());
    if args.first().map(String::as_str) == Some("--addr") {
        if args.len() < 2 {
            return usage();
        }
        addr = args[1].clone();
        args.drain(..2);
    }
    let Some(cmd) = args.first().cloned() else {
        return usage();
    };
    let rest = args[1..].to_vec();
    if cmd == "nvml" {
        return report(nvml());
    }
    let client = match Client::connect(&addr).await {
        Ok(c) => c,
        Err(e) => {
            println!("error=connect message={e:?}");
            return ExitCode::from(1);
        }
    };
    let res = match cmd.as_str() {
        "info" => info(&client).await,
        "launch" => launch(&client, &rest).await,
        "running" => running(&client, &rest).await,
        "wait" => wait(&client, &rest).await,
        "worker" => worker(&client, &rest).await,
        "logs" => logs(&client, &rest).await,
        "stop" => stop(&client, &rest).await,
        _ => return usage(),
    };
    report(res)
}

/// Prints a failure the way the script reads it and maps it to the exit status.
fn report(res: Result<bool>) -> ExitCode {
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            if let Some(s) = e.downcast_ref::<tonic::Status>() {
                println!("error={:?} message={:?}", s.code(), s.message());
                if s.code() == tonic::Code::ResourceExhausted {
                    return ExitCode::from(3);
                }
            } else {
                println!("error=failed message={:?}", format!("{e:#}"));
            }
            ExitCode::from(1)
        }
    }
}

async fn info(c: &Client) -> Result<bool> {
    let h = c
        .host()
        .get_host_info(pb::GetHostInfoRequest {})
        .await?
        .into_inner();
    let cap = h.capacity.unwrap_or_default();
    let alloc = h.allocated.unwrap_or_default();
    println!(
        "host={} backend={} gpus={} allocated={} cgroup_version={} cpu={} memory_gb={:.1}",
        h.name, h.gpu_backend, cap.gpus, alloc.gpus, h.cgroup_version, cap.cpu, cap.memory_gb
    );
    for g in &h.gpus {
        println!(
            "gpu index={} uuid={} minor={} name={:?} pci={} mig={} memory_used={} \
             memory_total={} utilization={} holder={}",
            g.index,
            g.uuid,
            g.minor_number,
            g.name,
            g.pci_bus_id,
            g.mig_enabled,
            g.memory_used_bytes,
            g.memory_total_bytes,
            g.utilization_percent,
            if g.worker_id.is_empty() {
                "-"
            } else {
                &g.worker_id
            }
        );
    }
    Ok(true)
}

async fn launch(c: &Client, args: &[String]) -> Result<bool> {
    let mut req = pb::LaunchWorkersRequest {
        n: 1,
        cpu: 1.0,
        memory_gb: 4.0,
        ..Default::default()
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let val = |i: usize| -> Result<&String> {
            args.get(i + 1)
                .with_context(|| format!("{a} needs a value"))
        };
        match a {
            "--" => {
                req.command = args[i + 1..].to_vec();
                break;
            }
            "--gpus" => req.nvidia_gpu = val(i)?.parse()?,
            "--n" => req.n = val(i)?.parse()?,
            "--cpu" => req.cpu = val(i)?.parse()?,
            "--memory" => req.memory_gb = val(i)?.parse()?,
            "--env" => {
                let (k, v) = val(i)?.split_once('=').context("--env takes K=V")?;
                req.env.insert(k.to_owned(), v.to_owned());
            }
            other => bail!("unknown launch flag {other}"),
        }
        i += 2;
    }
    if req.command.is_empty() {
        bail!("launch needs -- CMD...");
    }
    let ws = c.workers().launch_workers(req).await?.into_inner().workers;
    for w in ws {
        println!(
            "launched={} gpus={} status={:?}",
            w.id,
            if w.gpu_uuids.is_empty() {
                "-".to_owned()
            } else {
                w.gpu_uuids.join(",")
            },
            pb::WorkerStatus::try_from(w.status).unwrap_or_default()
        );
    }
    Ok(true)
}

fn print_worker(w: &pb::Worker) {
    println!(
        "worker={} status={:?} exit_code={} signal={} reason={:?} gpus={} gpu_memory_used={} \
         cpu_seconds={:.2}",
        w.id,
        pb::WorkerStatus::try_from(w.status).unwrap_or_default(),
        w.exit_code.map_or("-".into(), |c| c.to_string()),
        w.signal.map_or("-".into(), |c| c.to_string()),
        w.reason,
        if w.gpu_uuids.is_empty() {
            "-".to_owned()
        } else {
            w.gpu_uuids.join(",")
        },
        w.gpu_memory_used_bytes,
        w.cpu_seconds
    );
}

async fn running(c: &Client, ids: &[String]) -> Result<bool> {
    let r = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: ids.to_vec(),
            wait_for_completion: Some(false),
            timeout_seconds: Some(30),
            ..Default::default()
        })
        .await?
        .into_inner();
    for w in r.workers.iter().chain(&r.failures) {
        print_worker(w);
    }
    Ok(r.failures.is_empty())
}

async fn wait(c: &Client, args: &[String]) -> Result<bool> {
    let id = args.first().context("wait ID [SECONDS]")?;
    let secs: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(120);
    let r = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: vec![id.clone()],
            timeout_seconds: Some(secs),
            ..Default::default()
        })
        .await?
        .into_inner();
    for w in r.workers.iter().chain(&r.failures) {
        print_worker(w);
    }
    Ok(r.failures.is_empty())
}

async fn worker(c: &Client, args: &[String]) -> Result<bool> {
    let ws = c
        .workers()
        .list_workers(pb::ListWorkersRequest {
            ids: args.to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workers;
    for w in &ws {
        print_worker(w);
    }
    Ok(true)
}

async fn logs(c: &Client, args: &[String]) -> Result<bool> {
    let id = args.first().context("logs ID")?;
    for (stream, name) in [
        (pb::Stream::Stdout, "stdout"),
        (pb::Stream::Stderr, "stderr"),
    ] {
        let mut s = c
            .workers()
            .stream_output(pb::StreamOutputRequest {
                ids: vec![id.clone()],
                from_start: true,
                follow: false,
                streams: vec![stream as i32],
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .context("output stream stalled")??
        {
            out.extend_from_slice(&chunk.data);
        }
        for line in String::from_utf8_lossy(&out).lines() {
            println!("{name}| {line}");
        }
    }
    Ok(true)
}

async fn stop(c: &Client, args: &[String]) -> Result<bool> {
    let all = args.iter().any(|a| a == "--all");
    let ws = c
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: if all { Vec::new() } else { args.to_vec() },
            all,
            grace_seconds: Some(2),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workers;
    for w in &ws {
        print_worker(w);
    }
    Ok(true)
}

/// Inventory and one sample straight from NVML, through berth's own backend (no daemon).
fn nvml() -> Result<bool> {
    use berth_sys::gpu::{Gpus, NvmlGpus};
    let g = NvmlGpus::open()?;
    println!("driver={} gpus={}", g.driver_version(), g.devices().len());
    let samples = g.sample();
    for (i, d) in g.devices().iter().enumerate() {
        let s = samples.get(i).cloned().unwrap_or_default();
        println!(
            "gpu index={} uuid={} minor={} name={:?} pci={} mig={} memory_used={} \
             memory_total={} utilization={} processes={} error={:?}",
            d.index,
            d.uuid,
            d.minor_number,
            d.name,
            d.pci_bus_id,
            d.mig_enabled,
            s.memory_used_bytes,
            d.memory_total_bytes,
            s.utilization_percent,
            s.processes.len(),
            s.error
        );
        for j in 0..g.devices().len() {
            if j != i {
                println!("topology {i}-{j} distance={}", g.distance(i, j));
            }
        }
    }
    Ok(true)
}
