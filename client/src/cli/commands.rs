//! The verbs: each builds its request, makes the call and prints the response, as a table or as
//! one JSON document.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::CommandFactory;
use serde::Serialize;
use tonic::Streaming;

use super::args::{
    AwaitArgs, Cli, Command, HostsArgs, HostsCommand, LaunchArgs, ListArgs, LogsArgs,
    SessionCloseArgs, SessionCommand, SessionOpenArgs, StopArgs,
};
use super::holder::{self, HolderSpec};
use super::lease::{Lease, Signal, Signals};
use super::output::{OutputDemux, Sink};
use super::{json, request, view, CliError, Outcome, Server, Terminal};
use crate::{pb, Client};

/// Seconds of one AwaitWorkers call while `--wait` or `--attach` waits without bound: short
/// calls survive idle-connection reapers between the CLI and a remote server.
const AWAIT_ROUND_SECS: u32 = 60;

/// Checks what clap cannot express; a refusal is a usage error (exit status 2).
pub fn check(cli: &Cli) -> Result<(), clap::Error> {
    if let Command::Launch(a) = &cli.command {
        if a.attach && cli.json {
            return Err(Cli::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--json cannot be used with --attach: the workers' output goes to stdout",
            ));
        }
    }
    Ok(())
}

/// Runs the verb of `cli` against its server, writing to `term`.
pub async fn run(cli: Cli, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
    let server = cli.server();
    // The holder connects (and connects again) on its own, for as long as it holds.
    if let Command::Session(SessionCommand::Hold(a)) = &cli.command {
        holder::hold(&server, a).await?;
        return Ok(Outcome::Success);
    }
    let client = server.connect().await.map_err(CliError::Connect)?;
    let v = Verb {
        client: &client,
        json: cli.json,
        server: &server,
    };
    match cli.command {
        Command::Launch(a) => v.launch(&a, term).await,
        Command::List(a) => v.list(&a, term).await,
        Command::Await(a) => v.await_workers(&a, term).await,
        Command::Stop(a) => v.stop(&a, term).await,
        Command::Logs(a) => v.logs(&a, term).await,
        Command::Info => v.info(term).await,
        Command::Hosts(HostsArgs { action: None }) => v.hosts(term).await,
        Command::Hosts(HostsArgs {
            action: Some(HostsCommand::Remove(a)),
        }) => v.remove_host(&a.name, term).await,
        Command::Hosts(HostsArgs {
            action: Some(HostsCommand::Drain(a)),
        }) => v.drain(&a.name, true, term).await,
        Command::Hosts(HostsArgs {
            action: Some(HostsCommand::Undrain(a)),
        }) => v.drain(&a.name, false, term).await,
        Command::Drain(a) => v.drain(&a.name, true, term).await,
        Command::Undrain(a) => v.drain(&a.name, false, term).await,
        Command::Session(SessionCommand::Open(a)) => v.session_open(&a, term).await,
        Command::Session(SessionCommand::Keepalive(a)) => {
            let s = v.keep_alive(&a.id).await?;
            v.print_session(term, &s, None)
        }
        Command::Session(SessionCommand::Close(a)) => v.session_close(&a, term).await,
        Command::Session(SessionCommand::Hold(_)) => unreachable!("run above"),
    }
}

fn call<T>(
    method: &'static str,
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, CliError> {
    r.map(tonic::Response::into_inner)
        .map_err(|status| CliError::Call {
            method,
            status,
            hint: None,
        })
}

fn print_json(term: &mut Terminal<'_>, v: &impl Serialize) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *term.out, v).map_err(std::io::Error::from)?;
    writeln!(term.out)?;
    term.out.flush()?;
    Ok(())
}

fn print_text(term: &mut Terminal<'_>, s: &str) -> Result<(), CliError> {
    term.out.write_all(s.as_bytes())?;
    term.out.flush()?;
    Ok(())
}

/// Orders workers as `ids` names them (the launch order), others after.
fn sort_like(workers: &mut [pb::Worker], ids: &[String]) {
    workers.sort_by_key(|w| ids.iter().position(|i| *i == w.id).unwrap_or(usize::MAX));
}

/// What every verb needs: the connection, how to print, and the server for connections of
/// their own (a lease, a holder).
struct Verb<'a> {
    client: &'a Client,
    json: bool,
    server: &'a Server,
}

impl Verb<'_> {
    fn print_workers(&self, term: &mut Terminal<'_>, ws: &[pb::Worker]) -> Result<(), CliError> {
        if self.json {
            print_json(term, &json::worker_list(ws))
        } else {
            print_text(term, &view::workers_table(ws, SystemTime::now()))
        }
    }

    /// Prints an await result; a non-empty `failures` is the outcome `WorkersFailed`, also told
    /// on stderr so that it shows when stdout goes to a file.
    fn print_await(
        &self,
        term: &mut Terminal<'_>,
        r: &pb::AwaitWorkersResponse,
    ) -> Result<Outcome, CliError> {
        if self.json {
            print_json(term, &json::await_response(r))?;
        } else {
            print_text(term, &view::await_view(r, SystemTime::now()))?;
        }
        if r.failures.is_empty() {
            return Ok(Outcome::Success);
        }
        // The document says it all; a script reads the exit status.
        if self.json {
            return Ok(Outcome::WorkersFailed);
        }
        writeln!(
            term.err,
            "berth: {} of {} awaited workers failed or did not get there in time",
            r.failures.len(),
            r.failures.len() + r.workers.len()
        )?;
        Ok(Outcome::WorkersFailed)
    }

    async fn launch(&self, a: &LaunchArgs, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
        // Only a relative or absent --workdir needs the current directory (which can be gone).
        let cwd = match a.workdir.as_deref() {
            Some(d) if d.is_empty() || Path::new(d).is_absolute() => PathBuf::new(),
            _ => std::env::current_dir().map_err(CliError::CurrentDir)?,
        };
        let req = request::launch(a, &cwd);
        if a.attach {
            return self.attach(a, req, term).await;
        }
        let workers = self.launch_workers(req).await?;
        if !a.wait {
            self.print_workers(term, &workers)?;
            return Ok(Outcome::Success);
        }
        let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
        // Ctrl-C leaves the workers running, and says so: they live on the server.
        let waited = {
            let wait = async {
                let r = self.await_ended(&ids).await?;
                self.print_await(term, &r)
            };
            tokio::select! {
                r = wait => Some(r),
                _ = tokio::signal::ctrl_c() => None,
            }
        };
        match waited {
            Some(r) => r,
            None => {
                writeln!(
                    term.err,
                    "\nberth: interrupted; the workers keep running: {}",
                    ids.join(" ")
                )?;
                Ok(Outcome::Interrupted(Signal::Interrupt))
            }
        }
    }

    /// `LaunchWorkers`, always with a `request_id` (one is made when `--request-id` is not
    /// given): when the server goes away during the call and `--addr` lists replicas, the launch
    /// runs again on the next one, which answers with the first launch's workers if it was made.
    async fn launch_workers(
        &self,
        mut req: pb::LaunchWorkersRequest,
    ) -> Result<Vec<pb::Worker>, CliError> {
        const METHOD: &str = "berth.v1.Workers/LaunchWorkers";
        if req.request_id.is_empty() {
            req.request_id = crate::failover::new_request_id();
        }
        match self.client.workers().launch_workers(req.clone()).await {
            Err(s) if crate::failover::is_unreachable(&s) && self.server.addr.contains(',') => {
                let replicas = crate::Failover::new(&self.server.addr, self.server.tls.clone())
                    .map_err(CliError::Connect)?;
                replicas.launch(req).await.map_err(|status| CliError::Call {
                    method: METHOD,
                    status,
                    hint: None,
                })
            }
            r => Ok(call(METHOD, r)?.workers),
        }
    }

    /// `launch --attach`: launches into a session held for as long as this runs (the one of
    /// `--session`, or one of its own), streams the workers' output until they have ended, then
    /// a line on stderr per failed worker. A session of its own is closed on the way out, by a
    /// signal too: its workers end with this command.
    async fn attach(
        &self,
        a: &LaunchArgs,
        mut req: pb::LaunchWorkersRequest,
        term: &mut Terminal<'_>,
    ) -> Result<Outcome, CliError> {
        // Caught before the session exists, so that no signal can end berth with it left open.
        let mut signals = Signals::catch().map_err(CliError::Attach)?;
        let (session, own) = match &a.session {
            // Renewed once now: an unknown or ended session fails here, before any launch.
            Some(id) => (self.keep_alive(id).await?, false),
            None => (self.open_session(a.session_ttl).await?, true),
        };
        let id = session.id.clone();
        let ttl = Duration::from_secs(u64::from(session.ttl_seconds.max(1)));
        let lease = match Lease::keep(self.server, &id, ttl) {
            Ok(l) => l,
            Err(e) => {
                if own {
                    let _ = self.close_session(&id).await;
                }
                return Err(CliError::Attach(e));
            }
        };
        req.session_id = id.clone();
        let workers = match self.launch_workers(req).await {
            Ok(w) => w,
            Err(e) => {
                drop(lease);
                if own {
                    let _ = self.close_session(&id).await;
                }
                return Err(e);
            }
        };
        let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
        let followed = tokio::select! {
            r = self.stream_until_ended(&ids, term) => Ok(r),
            sig = signals.recv() => Err(sig),
        };
        let lapsed = lease.ended();
        drop(lease);
        let sig = match followed {
            // The workers have ended, or the output could not be written (its reader went
            // away): either way the session of its own goes now, with whatever still runs. The
            // outcome is the one of the following; these notes are by the way.
            Ok(r) => {
                if let Some(status) = lapsed {
                    let _ = writeln!(
                        term.err,
                        "berth: session {id} ended while attached: {}",
                        status.message()
                    );
                } else if own {
                    if let Err(e) = self.close_session(&id).await {
                        if e.code() != Some(tonic::Code::NotFound) {
                            let _ = writeln!(term.err, "berth: session {id} not closed: {e}");
                        }
                    }
                }
                return r;
            }
            Err(sig) => sig,
        };
        // The terminal may be gone (SIGHUP): what is said here is said where it can be.
        if own {
            // A second signal does not wait for the workers to stop: once the server has the
            // request, it stops them all the same, and else the lease lapses.
            let closed = tokio::select! {
                r = self.close_session(&id) => r,
                again = signals.recv() => {
                    let _ = writeln!(
                        term.err,
                        "\nberth: {}: session {id} closing; not waiting for its workers to stop",
                        again.name()
                    );
                    return Ok(Outcome::Interrupted(sig));
                }
            };
            match closed {
                Ok(()) => {
                    let _ = writeln!(
                        term.err,
                        "\nberth: {}: closed session {id}; its workers are stopped: {}",
                        sig.name(),
                        ids.join(" ")
                    );
                }
                Err(e) => {
                    let _ = writeln!(
                        term.err,
                        "\nberth: {}: session {id} not closed ({e}); its workers stop when its \
                         lease lapses, within {} s",
                        sig.name(),
                        ttl.as_secs()
                    );
                }
            }
        } else {
            let _ = writeln!(
                term.err,
                "\nberth: {}: session {id} stays open; its workers keep running while it is kept \
                 alive: {}",
                sig.name(),
                ids.join(" ")
            );
        }
        Ok(Outcome::Interrupted(sig))
    }

    async fn open_session(&self, ttl_seconds: u32) -> Result<pb::Session, CliError> {
        self.open_labelled_session(
            ttl_seconds,
            [("berth.cli".to_owned(), "attach".to_owned())].into(),
        )
        .await
    }

    async fn open_labelled_session(
        &self,
        ttl_seconds: u32,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<pb::Session, CliError> {
        call(
            "berth.v1.Workers/OpenSession",
            self.client
                .workers()
                .open_session(pb::OpenSessionRequest {
                    ttl_seconds,
                    labels,
                    ..Default::default()
                })
                .await,
        )
    }

    /// `berth session open`: with `--hold-while`, the process and the destinations are checked
    /// before the session exists, and a session whose holder cannot start is closed again.
    async fn session_open(
        &self,
        a: &SessionOpenArgs,
        term: &mut Terminal<'_>,
    ) -> Result<Outcome, CliError> {
        // The holder runs in `/`: its TLS files are named by absolute paths.
        let held = match a.hold_while {
            Some(pid) => Some((
                pid,
                holder::start_time_of(pid).await?,
                holder::absolute(self.server)?,
            )),
            None => None,
        };
        for p in a.output.iter().chain(&a.output_stderr) {
            drop(holder::open_destination(p).await?);
        }
        let mut labels: std::collections::HashMap<String, String> =
            a.labels.iter().cloned().collect();
        labels
            .entry("berth.cli".to_owned())
            .or_insert_with(|| "session".to_owned());
        let session = self.open_labelled_session(a.ttl, labels).await?;
        let holder_pid = match held {
            None => None,
            Some((pid, start_time, server)) => {
                let spec = HolderSpec {
                    server,
                    session: session.id.clone(),
                    ttl_seconds: session.ttl_seconds.max(1),
                    pid,
                    start_time,
                    output: a.output.clone(),
                    output_stderr: a.output_stderr.clone(),
                };
                match holder::spawn(&spec).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        let _ = self.close_session(&session.id).await;
                        return Err(e);
                    }
                }
            }
        };
        self.print_session(term, &session, holder_pid)
    }

    /// A session: the document with `--json`, else its id alone (for `S=$(berth session open)`).
    fn print_session(
        &self,
        term: &mut Terminal<'_>,
        s: &pb::Session,
        holder_pid: Option<u32>,
    ) -> Result<Outcome, CliError> {
        if self.json {
            print_json(term, &json::session(s, holder_pid))?;
        } else {
            print_text(term, &format!("{}\n", s.id))?;
        }
        Ok(Outcome::Success)
    }

    async fn session_close(
        &self,
        a: &SessionCloseArgs,
        term: &mut Terminal<'_>,
    ) -> Result<Outcome, CliError> {
        let r = call(
            "berth.v1.Workers/CloseSession",
            self.client
                .workers()
                .close_session(pb::CloseSessionRequest {
                    session_id: a.id.clone(),
                    grace_seconds: a.grace,
                })
                .await,
        )?;
        if self.json {
            print_json(term, &json::close_response(&r))?;
        } else {
            print_text(term, &view::workers_table(&r.stopped, SystemTime::now()))?;
        }
        Ok(Outcome::Success)
    }

    async fn keep_alive(&self, id: &str) -> Result<pb::Session, CliError> {
        call(
            "berth.v1.Workers/KeepAlive",
            self.client
                .workers()
                .keep_alive(pb::KeepAliveRequest {
                    session_id: id.to_owned(),
                })
                .await,
        )
    }

    /// Closes session `id`, stopping its workers with the server's stop grace.
    async fn close_session(&self, id: &str) -> Result<(), CliError> {
        call(
            "berth.v1.Workers/CloseSession",
            self.client
                .workers()
                .close_session(pb::CloseSessionRequest {
                    session_id: id.to_owned(),
                    grace_seconds: None,
                })
                .await,
        )
        .map(drop)
    }

    /// The output of `ids` as it comes, until they have all ended; then a line on stderr per
    /// failed worker.
    async fn stream_until_ended(
        &self,
        ids: &[String],
        term: &mut Terminal<'_>,
    ) -> Result<Outcome, CliError> {
        let stream = call(
            "berth.v1.Workers/StreamOutput",
            self.client
                .workers()
                .stream_output(pb::StreamOutputRequest {
                    ids: ids.to_vec(),
                    follow: true,
                    from_start: true,
                    ..Default::default()
                })
                .await,
        )?;
        pump(stream, OutputDemux::new(ids.len() > 1), term).await?;
        let r = self.await_ended(ids).await?;
        for w in &r.failures {
            writeln!(
                term.err,
                "berth: worker {} {}: {}",
                w.id,
                view::status_name(w.status()),
                view::outcome(w)
            )?;
        }
        Ok(if r.failures.is_empty() {
            Outcome::Success
        } else {
            Outcome::WorkersFailed
        })
    }

    /// Awaits completion of `ids` with no bound, in rounds of [`AWAIT_ROUND_SECS`].
    async fn await_ended(&self, ids: &[String]) -> Result<pb::AwaitWorkersResponse, CliError> {
        loop {
            let mut r = call(
                "berth.v1.Workers/AwaitWorkers",
                self.client
                    .workers()
                    .await_workers(pb::AwaitWorkersRequest {
                        ids: ids.to_vec(),
                        wait_for_completion: Some(true),
                        timeout_seconds: Some(AWAIT_ROUND_SECS),
                        ..Default::default()
                    })
                    .await,
            )?;
            if r.failures.iter().all(|w| view::has_ended(w.status())) {
                sort_like(&mut r.workers, ids);
                sort_like(&mut r.failures, ids);
                return Ok(r);
            }
        }
    }

    async fn list(&self, a: &ListArgs, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
        let r = call(
            "berth.v1.Workers/ListWorkers",
            self.client.workers().list_workers(request::list(a)).await,
        )?;
        self.print_workers(term, &r.workers)?;
        Ok(Outcome::Success)
    }

    async fn await_workers(
        &self,
        a: &AwaitArgs,
        term: &mut Terminal<'_>,
    ) -> Result<Outcome, CliError> {
        let mut r = call(
            "berth.v1.Workers/AwaitWorkers",
            self.client
                .workers()
                .await_workers(request::await_workers(a))
                .await,
        )?;
        sort_like(&mut r.workers, &a.ids);
        sort_like(&mut r.failures, &a.ids);
        self.print_await(term, &r)
    }

    async fn stop(&self, a: &StopArgs, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
        let r = call(
            "berth.v1.Workers/StopWorkers",
            self.client.workers().stop_workers(request::stop(a)).await,
        )?;
        self.print_workers(term, &r.workers)?;
        Ok(Outcome::Success)
    }

    /// Raw output; `--json` does not apply (the bytes are the workers').
    async fn logs(&self, a: &LogsArgs, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
        let several = match &a.session {
            // How many workers a session selects is known only to the server.
            Some(s) => {
                call(
                    "berth.v1.Workers/ListWorkers",
                    self.client
                        .workers()
                        .list_workers(pb::ListWorkersRequest {
                            session_id: s.clone(),
                            ..Default::default()
                        })
                        .await,
                )?
                .workers
                .len()
                    > 1
            }
            None => request::distinct(&a.ids) > 1,
        };
        let stream = call(
            "berth.v1.Workers/StreamOutput",
            self.client.workers().stream_output(request::logs(a)).await,
        )?;
        pump(stream, OutputDemux::new(several), term).await?;
        Ok(Outcome::Success)
    }

    async fn info(&self, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
        let h = call(
            "berth.v1.Host/GetHostInfo",
            self.client
                .host()
                .get_host_info(pb::GetHostInfoRequest {})
                .await,
        )?;
        if self.json {
            print_json(term, &json::host_info(&h))?;
        } else {
            print_text(term, &view::host_info_view(&h, SystemTime::now()))?;
        }
        Ok(Outcome::Success)
    }

    async fn hosts(&self, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
        let r = call(
            "berth.v1.Cluster/ListHosts",
            self.client
                .cluster()
                .list_hosts(pb::ListHostsRequest {})
                .await,
        )
        .map_err(|e| self.needs_cluster(e, "hosts"))?;
        if self.json {
            print_json(term, &json::hosts(&r))?;
        } else {
            print_text(term, &view::hosts_table(&r.hosts, SystemTime::now()))?;
        }
        Ok(Outcome::Success)
    }

    /// `berth hosts remove NAME`: prints the host as it was, and how many workers are LOST.
    async fn remove_host(&self, name: &str, term: &mut Terminal<'_>) -> Result<Outcome, CliError> {
        let r = call(
            "berth.v1.Cluster/RemoveHost",
            self.client
                .cluster()
                .remove_host(pb::RemoveHostRequest {
                    name: name.to_owned(),
                })
                .await,
        )
        .map_err(|e| self.needs_cluster(e, "hosts remove"))?;
        let host = r.host.unwrap_or_default();
        if self.json {
            print_json(
                term,
                &serde_json::json!({
                    "removed": json::cluster_host(&host),
                    "workers_lost": r.workers_lost,
                }),
            )?;
        } else {
            print_text(
                term,
                &format!(
                    "{}removed {name}: {} of its workers LOST\n",
                    view::hosts_table(&[host], SystemTime::now()),
                    r.workers_lost
                ),
            )?;
        }
        Ok(Outcome::Success)
    }

    /// `berth drain NAME` (`drain`) and `berth undrain NAME`: prints the host as it is now.
    async fn drain(
        &self,
        name: &str,
        drain: bool,
        term: &mut Terminal<'_>,
    ) -> Result<Outcome, CliError> {
        let mut cluster = self.client.cluster();
        let (verb, res) = if drain {
            (
                "drain",
                call(
                    "berth.v1.Cluster/DrainHost",
                    cluster
                        .drain_host(pb::DrainHostRequest {
                            name: name.to_owned(),
                        })
                        .await,
                ),
            )
        } else {
            (
                "undrain",
                call(
                    "berth.v1.Cluster/UndrainHost",
                    cluster
                        .undrain_host(pb::UndrainHostRequest {
                            name: name.to_owned(),
                        })
                        .await,
                ),
            )
        };
        let host = res.map_err(|e| self.needs_cluster(e, verb))?;
        if self.json {
            print_json(term, &json::cluster_host(&host))?;
        } else {
            print_text(term, &view::hosts_table(&[host], SystemTime::now()))?;
        }
        Ok(Outcome::Success)
    }

    /// A hint on UNIMPLEMENTED from a host daemon: cluster verbs need a scheduler's address.
    fn needs_cluster(&self, e: CliError, verb: &str) -> CliError {
        match e {
            CliError::Call {
                method,
                status,
                hint: None,
            } if status.code() == tonic::Code::Unimplemented => CliError::Call {
                method,
                status,
                hint: Some(format!(
                    "{} serves no cluster: `berth {verb}` needs the address of a berth-scheduler",
                    self.server.addr
                )),
            },
            e => e,
        }
    }
}

/// Copies an output stream to the terminal as it comes, flushing after every chunk so that a
/// follower sees each line when the worker writes it.
async fn pump(
    mut stream: Streaming<pb::OutputChunk>,
    mut demux: OutputDemux,
    term: &mut Terminal<'_>,
) -> Result<(), CliError> {
    let end = loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                let (sink, bytes) = demux.push(&chunk);
                write_to(term, sink, &bytes)?;
            }
            Ok(None) => break Ok(()),
            Err(status) => {
                break Err(CliError::Call {
                    method: "berth.v1.Workers/StreamOutput",
                    status,
                    hint: None,
                })
            }
        }
    };
    for (sink, bytes) in demux.finish() {
        write_to(term, sink, &bytes)?;
    }
    end
}

fn write_to(term: &mut Terminal<'_>, sink: Sink, bytes: &[u8]) -> Result<(), CliError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let w = match sink {
        Sink::Stdout => &mut *term.out,
        Sink::Stderr => &mut *term.err,
    };
    w.write_all(bytes)?;
    w.flush()?;
    Ok(())
}
