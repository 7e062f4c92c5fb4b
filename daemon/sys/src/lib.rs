//! Every effect on the Linux host, each behind a small trait or a module with pure parsers:
//! cgroups, spawning shims, worker output files and their change notifications, host facts.

pub mod cgroup;
pub mod devbpf;
pub mod fake;
pub mod gpu;
pub mod host;
pub mod launcher;
pub mod netns;
pub mod notify;
pub mod output;
pub mod peer;
pub mod state_lock;
pub mod store;
pub mod systemd;
pub mod users;
