//! Bounds of a request, checked before anything is allocated for it: how many workers one launch
//! may ask for, how large its program and environment may be (the server's configured caps), and
//! whether what a worker execs fits the kernel's exec limits. A request past them is refused
//! whole, with the field and the bound named; the numbers of the host are passed in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::launch::LaunchRequest;

/// The kernel's limit on one argv or environment string, its NUL included (`MAX_ARG_STRLEN`,
/// 32 pages): a longer one makes execve fail with E2BIG.
pub const MAX_ARG_STRLEN: usize = 128 * 1024;

/// What the kernel's limit on argv and environment together can be at most: 3/4 of `_STK_LIM`
/// (8 MiB), whatever the stack limit.
pub const ARG_MAX_CEILING: usize = 6 << 20;

/// The kernel's floor of that limit (`ARG_MAX` of `<linux/limits.h>`), whatever the stack limit.
pub const ARG_MAX_FLOOR: usize = 128 * 1024;

/// Most worker ids one request may name (List, Await, Stop, StreamOutput, Watch).
pub const MAX_IDS: usize = 10_000;

/// Inline code (`-c CODE`) up to this size stays on the command line; longer code reaches the
/// interpreter through a file descriptor (see [`crate::launch::SOURCE_PATH`]).
pub const INLINE_CODE_MAX: usize = 64 * 1024;

/// Room kept in the exec limit for what berth adds to every worker's environment (`BERTH_*`,
/// `CDSW_MASTER_IP`, `CUDA_VISIBLE_DEVICES` with GPU UUIDs, `HOME`, `USER`, `LOGNAME`).
pub const BERTH_ENV_RESERVE: usize = 4096;

/// Variables of that reserve, counted for their pointers.
const BERTH_ENV_VARS: usize = 12;

/// The caps a server puts on one launch request (`[limits]` of its configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LaunchLimits {
    /// Most workers one launch may ask for (`n`).
    pub max_workers_per_launch: u32,
    /// Largest `code`, in bytes.
    pub max_code_bytes: usize,
    /// Longest `script` path, in bytes.
    pub max_script_bytes: usize,
    /// Largest `command`: its strings' bytes, each counted with its NUL as exec counts them.
    pub max_command_bytes: usize,
    /// Longest string of `command`, in bytes.
    pub max_command_arg_bytes: usize,
    /// Most variables in `env`.
    pub max_env_vars: usize,
    /// Largest `env`: its names' and values' bytes.
    pub max_env_bytes: usize,
}

impl Default for LaunchLimits {
    fn default() -> Self {
        Self {
            max_workers_per_launch: 1024,
            max_code_bytes: 4 << 20,
            max_script_bytes: 4096,
            max_command_bytes: 1 << 20,
            max_command_arg_bytes: 128 * 1024,
            max_env_vars: 4096,
            max_env_bytes: 1 << 20,
        }
    }
}

impl LaunchLimits {
    /// The key of a cap that is zero (every cap must let something through), if any.
    pub fn zero_cap(&self) -> Option<&'static str> {
        [
            (
                "limits.max_workers_per_launch",
                self.max_workers_per_launch as usize,
            ),
            ("limits.max_code_bytes", self.max_code_bytes),
            ("limits.max_script_bytes", self.max_script_bytes),
            ("limits.max_command_bytes", self.max_command_bytes),
            ("limits.max_command_arg_bytes", self.max_command_arg_bytes),
            ("limits.max_env_vars", self.max_env_vars),
            ("limits.max_env_bytes", self.max_env_bytes),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0)
        .map(|(k, _)| k)
    }
}

fn past(field: impl Into<String>, what: String, cap: usize, key: &str) -> Error {
    Error::invalid(
        field,
        format!("{what}, past the cap of {cap} (limits.{key})"),
    )
}

/// The sizes of `req`'s program and environment against `lim`: INVALID_ARGUMENT naming the field
/// and the cap. Reads the request only.
pub fn check_sizes(req: &LaunchRequest, lim: &LaunchLimits) -> Result<()> {
    if req.code.len() > lim.max_code_bytes {
        return Err(past(
            "code",
            format!("{} bytes", req.code.len()),
            lim.max_code_bytes,
            "max_code_bytes",
        ));
    }
    if req.script.len() > lim.max_script_bytes {
        return Err(past(
            "script",
            format!("{} bytes", req.script.len()),
            lim.max_script_bytes,
            "max_script_bytes",
        ));
    }
    let mut command = 0usize;
    for (i, a) in req.command.iter().enumerate() {
        if a.len() > lim.max_command_arg_bytes {
            return Err(past(
                format!("command[{i}]"),
                format!("{} bytes", a.len()),
                lim.max_command_arg_bytes,
                "max_command_arg_bytes",
            ));
        }
        command = command.saturating_add(a.len() + 1);
    }
    if command > lim.max_command_bytes {
        return Err(past(
            "command",
            format!(
                "{command} bytes in {} strings (each with its NUL)",
                req.command.len()
            ),
            lim.max_command_bytes,
            "max_command_bytes",
        ));
    }
    if req.env.len() > lim.max_env_vars {
        return Err(past(
            "env",
            format!("{} variables", req.env.len()),
            lim.max_env_vars,
            "max_env_vars",
        ));
    }
    let env = req
        .env
        .iter()
        .fold(0usize, |s, (k, v)| s.saturating_add(k.len() + v.len()));
    if env > lim.max_env_bytes {
        return Err(past(
            "env",
            format!("{env} bytes of names and values"),
            lim.max_env_bytes,
            "max_env_bytes",
        ));
    }
    Ok(())
}

/// `n` workers in one launch against `max_per_launch`, and against the worker slots that whoever
/// serves it (a host, the hosts of a cluster) has: `free` of `total`. RESOURCE_EXHAUSTED with
/// what was short. Allocates nothing per worker.
pub fn check_workers(n: u32, max_per_launch: u32, free: u32, total: u32) -> Result<()> {
    check_per_launch(n, max_per_launch)?;
    if n > free {
        return Err(Error::ResourceExhausted(format!(
            "workers: {n} requested, {free} of {total} slots free"
        )));
    }
    Ok(())
}

/// `n` workers in one launch of a cluster against `max_per_launch`, and against the worker
/// slots of all its `hosts` together (`slots`, used or not): past those no placement could ever
/// hold it. RESOURCE_EXHAUSTED with what was short.
pub fn check_cluster_workers(n: u32, max_per_launch: u32, hosts: usize, slots: u64) -> Result<()> {
    check_per_launch(n, max_per_launch)?;
    if u64::from(n) > slots {
        return Err(Error::ResourceExhausted(format!(
            "workers: {n} requested, more than the {slots} slots of all {hosts} hosts together"
        )));
    }
    Ok(())
}

fn check_per_launch(n: u32, max_per_launch: u32) -> Result<()> {
    if n > max_per_launch {
        return Err(Error::ResourceExhausted(format!(
            "workers: {n} requested in one launch, at most {max_per_launch} \
             (limits.max_workers_per_launch)"
        )));
    }
    Ok(())
}

/// The kernel's exec limits of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    /// argv and environment together: their strings with NULs and their pointers
    /// (`sysconf(_SC_ARG_MAX)`, a quarter of the stack limit).
    pub arg_max: usize,
}

impl ExecLimits {
    /// What the kernel allows a process whose soft stack limit is `stack_soft` bytes: a quarter
    /// of it, within [`ARG_MAX_FLOOR`] and [`ARG_MAX_CEILING`].
    pub fn for_stack(stack_soft: u64) -> Self {
        let quarter = usize::try_from(stack_soft / 4).unwrap_or(usize::MAX);
        Self {
            arg_max: quarter.clamp(ARG_MAX_FLOOR, ARG_MAX_CEILING),
        }
    }
}

/// Whether `argv` and the environment a worker would start with (`base`, then `user` over it, as
/// [`crate::launch::worker_env`] merges them, and room for berth's own variables) fit the
/// kernel's exec limits. INVALID_ARGUMENT naming the field that does not fit: `argv_field(i)`
/// says which request field argv string `i` came from, `env[NAME]` a variable.
pub fn check_exec(
    argv: &[String],
    argv_field: impl Fn(usize) -> String,
    base: &BTreeMap<String, String>,
    user: &BTreeMap<String, String>,
    exec: ExecLimits,
) -> Result<()> {
    let mut argv_bytes = 0usize;
    for (i, a) in argv.iter().enumerate() {
        if a.len() + 1 > MAX_ARG_STRLEN {
            return Err(Error::invalid(
                argv_field(i),
                format!(
                    "{} bytes, past the kernel's limit of {} bytes on one argument, its NUL \
                     included (MAX_ARG_STRLEN)",
                    a.len(),
                    MAX_ARG_STRLEN
                ),
            ));
        }
        argv_bytes += a.len() + 1;
    }
    let reserved = |k: &str| k.starts_with("BERTH_") || k == "CDSW_MASTER_IP";
    let vars = user
        .iter()
        .filter(|(k, _)| !reserved(k))
        .chain(base.iter().filter(|(k, _)| !user.contains_key(*k)));
    let mut env_bytes = 0usize;
    let mut env_count = 0usize;
    for (k, v) in vars {
        let len = k.len() + 1 + v.len() + 1;
        if len > MAX_ARG_STRLEN {
            return Err(Error::invalid(
                format!("env[{k}]"),
                format!(
                    "NAME=value takes {len} bytes, past the kernel's limit of {MAX_ARG_STRLEN} \
                     bytes on one variable, its NUL included (MAX_ARG_STRLEN)"
                ),
            ));
        }
        env_bytes += len;
        env_count += 1;
    }
    let pointers = (argv.len().max(1) + env_count + BERTH_ENV_VARS) * std::mem::size_of::<u64>();
    let total = argv_bytes + env_bytes + BERTH_ENV_RESERVE + pointers;
    if total > exec.arg_max {
        let field = if env_bytes >= argv_bytes {
            "env".to_owned()
        } else {
            // The longest argument is what to shorten.
            let longest = (0..argv.len()).max_by_key(|&i| argv[i].len()).unwrap_or(0);
            argv_field(longest)
        };
        return Err(Error::invalid(
            field,
            format!(
                "arguments ({argv_bytes} bytes) and environment ({env_bytes} bytes in {env_count} \
                 variables) with berth's own variables and the pointers take {total} bytes, past \
                 the host's exec limit of {} bytes (ARG_MAX)",
                exec.arg_max
            ),
        ));
    }
    Ok(())
}

/// `ids` as a request names them (`field`, e.g. `ids`): at most [`MAX_IDS`], each once, in the
/// order first named. INVALID_ARGUMENT past the cap; the ids themselves are checked elsewhere.
pub fn dedup_ids(ids: Vec<String>, field: &str) -> Result<Vec<String>> {
    if ids.len() > MAX_IDS {
        return Err(Error::invalid(
            field,
            format!(
                "{} ids, past the cap of {MAX_IDS} in one request",
                ids.len()
            ),
        ));
    }
    if ids.len() < 2 {
        return Ok(ids);
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if !seen.contains(id.as_str()) {
            seen.insert(id.clone());
            out.push(id);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn small() -> LaunchLimits {
        LaunchLimits {
            max_workers_per_launch: 8,
            max_code_bytes: 10,
            max_script_bytes: 10,
            max_command_bytes: 12,
            max_command_arg_bytes: 5,
            max_env_vars: 2,
            max_env_bytes: 8,
        }
    }

    #[test]
    fn sizes_within_the_caps_pass_exactly_at_them() {
        let req = LaunchRequest {
            code: "x".repeat(10),
            script: "s".repeat(10),
            // 6 + 6 = 12 bytes with NULs.
            command: vec!["a".repeat(5), "b".repeat(5)],
            env: BTreeMap::from([("AB".into(), "cd".into()), ("EF".into(), "gh".into())]),
            ..Default::default()
        };
        check_sizes(&req, &small()).unwrap();
    }

    #[test]
    fn sizes_past_a_cap_name_their_field_and_cap() {
        type Mutation = Box<dyn Fn(&mut LaunchRequest)>;
        let cases: Vec<(&str, &str, Mutation)> = vec![
            (
                "code",
                "max_code_bytes",
                Box::new(|r| r.code = "x".repeat(11)),
            ),
            (
                "script",
                "max_script_bytes",
                Box::new(|r| r.script = "s".repeat(11)),
            ),
            (
                "command[1]",
                "max_command_arg_bytes",
                Box::new(|r| r.command = vec!["a".into(), "b".repeat(6)]),
            ),
            // Thirteen empty strings: each counts its NUL.
            (
                "command",
                "max_command_bytes",
                Box::new(|r| r.command = vec![String::new(); 13]),
            ),
            (
                "env",
                "max_env_vars",
                Box::new(|r| {
                    r.env = (0..3).map(|i| (format!("V{i}"), String::new())).collect();
                }),
            ),
            (
                "env",
                "max_env_bytes",
                Box::new(|r| {
                    r.env.insert("NAME".into(), "value".into());
                }),
            ),
        ];
        for (field, key, mutate) in cases {
            let mut r = LaunchRequest::default();
            mutate(&mut r);
            let err = check_sizes(&r, &small()).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
            assert_eq!(field_of(Err(err)), field, "{r:?}");
        }
    }

    #[test]
    fn workers_past_the_launch_cap_or_the_free_slots_are_short() {
        check_workers(8, 8, 8, 10).unwrap();
        let short = |r: Result<()>| match r {
            Err(Error::ResourceExhausted(m)) => m,
            other => panic!("expected ResourceExhausted, got {other:?}"),
        };
        let m = short(check_workers(u32::MAX, 8, 10, 10));
        assert!(
            m.contains("4294967295") && m.contains("max_workers_per_launch"),
            "{m}"
        );
        let m = short(check_workers(5, 8, 4, 10));
        assert_eq!(m, "workers: 5 requested, 4 of 10 slots free");
        check_cluster_workers(8, 8, 2, 8).unwrap();
        let m = short(check_cluster_workers(u32::MAX, u32::MAX, 2, 8192));
        assert_eq!(
            m,
            "workers: 4294967295 requested, more than the 8192 slots of all 2 hosts together"
        );
        let m = short(check_cluster_workers(9, 8, 2, 100));
        assert!(m.contains("max_workers_per_launch"), "{m}");
    }

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn command_field(i: usize) -> String {
        format!("command[{i}]")
    }

    const EXEC: ExecLimits = ExecLimits { arg_max: 2 << 20 };

    #[test]
    fn exec_limit_per_string_counts_the_nul() {
        let none = BTreeMap::new();
        let at = "a".repeat(MAX_ARG_STRLEN - 1);
        check_exec(
            &argv(&["/bin/echo", &at]),
            command_field,
            &none,
            &none,
            EXEC,
        )
        .unwrap();
        let over = "a".repeat(MAX_ARG_STRLEN);
        let r = check_exec(
            &argv(&["/bin/echo", &over]),
            command_field,
            &none,
            &none,
            EXEC,
        );
        assert_eq!(field_of(r), "command[1]");
        // NAME=value: the name, '=' and the NUL count too.
        let user = BTreeMap::from([("BIG".to_string(), "v".repeat(MAX_ARG_STRLEN - 4))]);
        let r = check_exec(&argv(&["/bin/true"]), command_field, &none, &user, EXEC);
        assert_eq!(field_of(r), "env[BIG]");
        let user = BTreeMap::from([("BIG".to_string(), "v".repeat(MAX_ARG_STRLEN - 5))]);
        check_exec(&argv(&["/bin/true"]), command_field, &none, &user, EXEC).unwrap();
    }

    #[test]
    fn exec_limit_in_total_names_the_larger_part() {
        let none = BTreeMap::new();
        // 40 variables of 64 KiB: 2.5 MiB, past 2 MiB.
        let user: BTreeMap<String, String> = (0..40)
            .map(|i| (format!("V{i}"), "v".repeat(64 << 10)))
            .collect();
        let r = check_exec(&argv(&["/bin/true"]), command_field, &none, &user, EXEC);
        assert_eq!(field_of(r), "env");
        // The same bytes as arguments: the longest is named.
        let mut long = vec!["/bin/echo".to_string()];
        long.extend((0..40).map(|i| "a".repeat((64 << 10) + i)));
        let r = check_exec(&long, command_field, &none, &none, EXEC);
        assert_eq!(field_of(r), "command[40]");
        // A base variable the request overrides counts once; berth's own are not the user's.
        let base = BTreeMap::from([("PATH".to_string(), "p".repeat(100 << 10))]);
        let user: BTreeMap<String, String> = (0..14)
            .map(|i| (format!("V{i}"), "v".repeat(100 << 10)))
            .chain([("PATH".to_string(), "/bin".to_string())])
            .chain([("BERTH_WORKER_ID".to_string(), "x".repeat(100 << 10))])
            .collect();
        check_exec(&argv(&["/bin/true"]), command_field, &base, &user, EXEC).unwrap();
        // Small enough for 2 MiB, too big for the floor of 128 KiB.
        let small = ExecLimits::for_stack(0);
        assert_eq!(small.arg_max, ARG_MAX_FLOOR);
        let r = check_exec(&argv(&["/bin/true"]), command_field, &base, &user, small);
        assert_eq!(field_of(r), "env");
    }

    #[test]
    fn arg_max_follows_the_stack_limit_within_the_kernels_bounds() {
        assert_eq!(ExecLimits::for_stack(8 << 20).arg_max, 2 << 20);
        assert_eq!(ExecLimits::for_stack(64 << 10).arg_max, ARG_MAX_FLOOR);
        assert_eq!(ExecLimits::for_stack(u64::MAX).arg_max, ARG_MAX_CEILING);
    }

    #[test]
    fn ids_are_deduplicated_in_order_and_capped() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            dedup_ids(ids(&["b", "a", "b", "c", "a"]), "ids").unwrap(),
            ids(&["b", "a", "c"])
        );
        let many = vec!["a".to_string(); MAX_IDS];
        assert_eq!(dedup_ids(many, "ids").unwrap(), ids(&["a"]));
        let too_many = vec!["a".to_string(); MAX_IDS + 1];
        assert_eq!(field_of(dedup_ids(too_many, "ids").map(|_| ())), "ids");
    }

    #[test]
    fn a_zero_cap_is_found() {
        assert_eq!(LaunchLimits::default().zero_cap(), None);
        let z = LaunchLimits {
            max_env_vars: 0,
            ..Default::default()
        };
        assert_eq!(z.zero_cap(), Some("limits.max_env_vars"));
    }
}
