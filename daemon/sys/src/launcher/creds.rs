//! Who a worker runs as ([`WorkerCreds`], part of the shim's spec) and the plain values its
//! process applies between its clone and its exec ([`ChildCreds`], prepared by the shim before the
//! clone, since the child may not allocate). The syscalls of the child are the shim's
//! (`apply_creds` in `shim`); those on the bounding set of a zygote or shim are here.
//!
//! # The bounding set, once per zygote
//!
//! Each capability dropped from a bounding set is a copy and commit of the process's
//! credentials (`PR_CAPBSET_DROP` takes one at a time): 41 of them were 55–72 µs of every
//! worker's start. So a zygote drops from its own bounding set, once, every capability that no
//! worker may keep ([`shrink_bounding_set`]; the union of what root workers keep, from the
//! daemon); the shims it forks inherit that set and are told it, and each worker's process drops
//! only what is left there and not its to keep ([`ChildCreds::for_bounding_set`]): normally
//! nothing. The bounding set only limits what an exec may give; the zygote's permitted and
//! effective sets stay whole, so its shims still join namespaces and cgroups and switch users. A
//! shim exec'd by the daemon (where no zygote could start) has the daemon's whole set, and its
//! worker's process drops everything it does not keep, as before.
//!
//! # Order in the child
//!
//! Each step needs privileges that a later one gives up, so they run in this order:
//!
//! 1. join the cgroup (v1 `tasks`, the fallback's `cgroup.procs`: root-owned files) and the
//!    network namespace (`setns` needs CAP_SYS_ADMIN), as before;
//! 2. `oom_score_adj`: opened while the process is still root, because a change of uid makes it
//!    non-dumpable and its `/proc/self` files root's; lowering the value needs CAP_SYS_RESOURCE;
//! 3. resource limits: raising a hard limit needs CAP_SYS_RESOURCE;
//! 4. umask (unprivileged, any time before exec);
//! 5. the capability bounding set (what the shim still has of it and the worker may not keep,
//!    normally nothing, see above): dropping needs CAP_SETPCAP, which the switch of identity takes
//!    away; and the ambient set, where the worker keeps capabilities (the `capset` of step 7
//!    leaves of it only what is both permitted and inheritable, so for any other worker it is
//!    cleared there);
//! 6. supplementary groups, gid, then uid: `setgroups` and `setresgid` need CAP_SETGID, which
//!    `setresuid` to a non-root uid clears;
//! 7. `capset` of what remains: after `setresuid` (a capset before it that dropped CAP_SETUID or
//!    CAP_SETGID would make the switch fail), which already cleared a non-root worker's permitted,
//!    effective and ambient sets but not its inheritable one;
//! 8. `PR_SET_NO_NEW_PRIVS`: it only restricts later execs, so after the switch is fine;
//! 9. `chdir` to the workdir, now as the user, so a directory the user cannot enter fails the
//!    start at once rather than the program at its first relative path; then `execve`.

use serde::{Deserialize, Serialize};

/// The nice value of every worker, whatever the daemon's: the unit runs berthd (and so its shims)
/// at -5, so that a host whose workers take every CPU still answers, copies output and reaps at
/// once; a worker must not inherit that.
pub const WORKER_NICE: libc::c_int = 0;

/// Who a worker runs as and what it keeps: applied by the worker's process between its clone and
/// its exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCreds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary may be among them).
    pub groups: Vec<u32>,
    /// Capabilities a root worker keeps (numbers, e.g. 10 = CAP_NET_BIND_SERVICE); empty: none.
    /// Only meaningful with uid 0: a non-root worker keeps none whatever this says.
    #[serde(default)]
    pub keep_caps: Vec<u8>,
    /// Resource limits set before the switch (RLIMIT_* numbers of libc as i32; u64::MAX =
    /// infinity). A hard limit above what the shim may raise it to is lowered to the highest it
    /// may, as systemd does for services (`setrlimit_closest`).
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    pub umask: u32,
    /// Written to /proc/self/oom_score_adj (the daemon and its shims run at -900; workers at 0).
    pub oom_score_adj: i32,
    /// A pooled interpreter (uid 0, keeping CAP_SETUID and CAP_SETGID for its switch at claim):
    /// what it keeps stays out of its inheritable set, so that the `setresuid` to the user at
    /// its claim clears every set of every thread.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
}

impl WorkerCreds {
    /// Whether these credentials can be applied at all (capability numbers, ranges, soft limits
    /// not above hard ones), as the shim checks them before it starts the worker.
    pub fn validate(&self) -> Result<(), CredsError> {
        ChildCreds::prepare(self).map(drop)
    }
}

/// One resource limit: `resource` is a `libc::RLIMIT_*` number; `u64::MAX` is infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}

/// The capabilities of `<linux/capability.h>`, by number (0..=40, Linux 5.9).
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Capability number of a name such as "CAP_NET_BIND_SERVICE" (or "net_bind_service"), for the
/// config key root_worker_capabilities; None for an unknown name. Case does not matter.
pub fn cap_number(name: &str) -> Option<u8> {
    let bare = match name.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("CAP_") => &name[4..],
        _ => name,
    };
    CAP_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(bare))
        .map(|i| i as u8)
}

/// systemd's default rlimits for services, what workers get unless configured: NOFILE 1024 soft /
/// 524288 hard (and nothing else changed). A soft limit of 1024 keeps `select()` safe; the hard
/// one lets a program that needs more raise its own.
pub fn default_rlimits() -> Vec<Rlimit> {
    vec![Rlimit {
        resource: libc::RLIMIT_NOFILE as i32,
        soft: 1024,
        hard: 524_288,
    }]
}

/// Credentials that cannot be applied, found before the worker's process is cloned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredsError {
    /// The kernel's capability sets have 64 bits.
    #[error("capability {0} out of range (0..=63)")]
    Capability(u8),
    #[error("oom_score_adj {0} out of range (-1000..=1000)")]
    OomScoreAdj(i32),
    #[error("umask {0:#o} has bits beyond 0777")]
    Umask(u32),
    #[error("resource limit {resource}: negative resource number")]
    Resource { resource: i32 },
    #[error("resource limit {resource}: soft limit {soft} above hard limit {hard}")]
    SoftAboveHard { resource: i32, soft: u64, hard: u64 },
    /// NGROUPS_MAX of the kernel.
    #[error("{0} supplementary groups, more than the kernel's 65536")]
    Groups(usize),
    /// A root worker may keep only what its shim's bounding set still has: a zygote keeps
    /// there the capabilities it was told root workers may keep, and drops the rest.
    #[error("capabilities {0:?} to keep are not in the shim's bounding set")]
    NotInBoundingSet(Vec<u8>),
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets, in two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct` of `<linux/capability.h>`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct CapHeader {
    pub(super) version: u32,
    /// 0: the calling thread.
    pub(super) pid: i32,
}

/// `struct __user_cap_data_struct`: one 32-bit word of each set.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CapData {
    pub(super) effective: u32,
    pub(super) permitted: u32,
    pub(super) inheritable: u32,
}

/// `struct rlimit64`, as `prlimit64` takes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KernelRlimit {
    pub(super) cur: u64,
    pub(super) max: u64,
}

/// [`WorkerCreds`] checked and laid out as the worker's process applies them: plain values and
/// vectors that the child only reads, so it needs no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChildCreds {
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
    pub(super) groups: Vec<libc::gid_t>,
    pub(super) rlimits: Vec<(libc::c_int, KernelRlimit)>,
    pub(super) umask: libc::mode_t,
    /// Capabilities kept in the bounding set and in the effective, permitted and inheritable
    /// sets, a bit per number; 0 for a non-root worker.
    pub(super) keep: u64,
    /// Capabilities the child drops from its bounding set: those of the shim's it does not keep
    /// ([`Self::for_bounding_set`]); until that is known, every one not kept (the child stops at
    /// the first the kernel does not know).
    pub(super) drop_bounding: u64,
    /// Whether what is kept goes into the inheritable set too (not for a pooled interpreter).
    pub(super) inheritable: bool,
    /// The nice value the process takes: [`WORKER_NICE`], or for a pooled interpreter
    /// [`super::pool::POOL_NICE`] (a refill yields the CPU to workers; the daemon gives it
    /// [`WORKER_NICE`] at its claim).
    pub(super) nice: libc::c_int,
    /// `oom_score_adj` as the decimal text written to /proc.
    oom_text: [u8; 8],
    oom_len: usize,
}

impl ChildCreds {
    pub(super) fn prepare(c: &WorkerCreds) -> Result<Self, CredsError> {
        let mut keep = 0u64;
        for &cap in &c.keep_caps {
            if cap >= 64 {
                return Err(CredsError::Capability(cap));
            }
            keep |= 1 << cap;
        }
        if c.uid != 0 {
            keep = 0;
        }
        if !(-1000..=1000).contains(&c.oom_score_adj) {
            return Err(CredsError::OomScoreAdj(c.oom_score_adj));
        }
        let text = c.oom_score_adj.to_string();
        let mut oom_text = [0u8; 8];
        oom_text[..text.len()].copy_from_slice(text.as_bytes());
        if c.umask > 0o777 {
            return Err(CredsError::Umask(c.umask));
        }
        let rlimits = c
            .rlimits
            .iter()
            .map(|r| {
                if r.resource < 0 {
                    Err(CredsError::Resource {
                        resource: r.resource,
                    })
                } else if r.soft > r.hard {
                    Err(CredsError::SoftAboveHard {
                        resource: r.resource,
                        soft: r.soft,
                        hard: r.hard,
                    })
                } else {
                    Ok((
                        r.resource,
                        KernelRlimit {
                            cur: r.soft,
                            max: r.hard,
                        },
                    ))
                }
            })
            .collect::<Result<_, _>>()?;
        if c.groups.len() > 65_536 {
            return Err(CredsError::Groups(c.groups.len()));
        }
        Ok(Self {
            uid: c.uid,
            gid: c.gid,
            groups: c.groups.clone(),
            rlimits,
            umask: c.umask as libc::mode_t,
            keep,
            drop_bounding: !keep,
            inheritable: !c.pooled,
            nice: if c.pooled {
                super::pool::POOL_NICE
            } else {
                WORKER_NICE
            },
            oom_text,
            oom_len: text.len(),
        })
    }

    /// These credentials for a shim whose bounding set is `present`: the child drops only what
    /// is there and not kept (under a zygote, nothing). A capability to keep that is not there
    /// cannot be given (the `capset` would fail): refused here, by name.
    pub(super) fn for_bounding_set(mut self, present: u64) -> Result<Self, CredsError> {
        let missing = self.keep & !present;
        if missing != 0 {
            return Err(CredsError::NotInBoundingSet(Caps(missing).collect()));
        }
        self.drop_bounding = present & !self.keep;
        Ok(self)
    }

    /// These credentials without the resource limits the shim has already (`current` tells what
    /// it has of one, `None` when it cannot): the child inherits those and sets only the others,
    /// each a `prlimit64` fewer. (Not so `oom_score_adj`: to know the shim's costs an open of
    /// /proc as the child's write does, and shims run at -900, workers at 0.)
    pub(super) fn without_inherited_limits(
        mut self,
        current: impl Fn(libc::c_int) -> Option<KernelRlimit>,
    ) -> Self {
        self.rlimits
            .retain(|(resource, want)| current(*resource) != Some(*want));
        self
    }

    /// What the child writes to /proc/self/oom_score_adj.
    pub(super) fn oom_score_adj_text(&self) -> &[u8] {
        &self.oom_text[..self.oom_len]
    }

    /// The header `capset` takes.
    pub(super) fn cap_header(&self) -> CapHeader {
        CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        }
    }

    /// The sets `capset` gets after the switch: effective = permitted = inheritable = what is
    /// kept, low word first.
    pub(super) fn cap_data(&self) -> [CapData; 2] {
        let inheritable = self.inheritable;
        let word = |w: u32| CapData {
            effective: w,
            permitted: w,
            inheritable: if inheritable { w } else { 0 },
        };
        [word(self.keep as u32), word((self.keep >> 32) as u32)]
    }
}

/// The capabilities of a set, by number, lowest first; no allocation, so the child may use it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps(pub(super) u64);

impl Iterator for Caps {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        if self.0 == 0 {
            return None;
        }
        let cap = self.0.trailing_zeros() as u8;
        self.0 &= self.0 - 1;
        Some(cap)
    }
}

/// A set of capabilities by number; `None` if one is beyond the kernel's 64 bits.
pub(super) fn cap_bits(caps: &[u8]) -> Option<u64> {
    caps.iter()
        .try_fold(0u64, |set, &cap| (cap < 64).then(|| set | 1 << cap))
}

/// The calling thread's bounding set, a bit per capability: `PR_CAPBSET_READ` up to the last
/// one this kernel knows. 42 calls, 7 µs here (10–15 µs in a shim's start), against 15 µs to
/// open and parse CapBnd of /proc/thread-self/status; a zygote reads it once and tells its
/// shims.
pub(super) fn bounding_set() -> u64 {
    let mut set = 0;
    for cap in 0..64u64 {
        // SAFETY: prctl with integer arguments only; it reads this thread's credentials.
        match unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } {
            1 => set |= 1 << cap,
            0 => {}
            // EINVAL: past the last capability of this kernel.
            _ => break,
        }
    }
    set
}

/// The calling process's limit of `resource`; `None` where the kernel refuses to tell (a
/// resource it does not know).
pub(super) fn current_rlimit(resource: libc::c_int) -> Option<KernelRlimit> {
    let mut now = KernelRlimit { cur: 0, max: 0 };
    let none = std::ptr::null::<KernelRlimit>();
    // SAFETY: prlimit64 of this process, writing `now` only.
    let r = unsafe { libc::syscall(libc::SYS_prlimit64, 0, resource, none, &mut now as *mut _) };
    (r == 0).then_some(now)
}

/// Drops from the calling thread's bounding set every capability not in `keep`, as a zygote
/// does once for all its shims; returns the set left. Its permitted and effective sets stay as
/// they are. Without CAP_SETPCAP nothing is dropped: each worker's process then drops (or fails
/// to drop) what it must itself, as where there is no zygote.
pub(super) fn shrink_bounding_set(keep: u64) -> u64 {
    for cap in Caps(bounding_set() & !keep) {
        // SAFETY: prctl with integer arguments only; it changes this thread's bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0 {
            break;
        }
    }
    bounding_set()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> WorkerCreds {
        WorkerCreds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
            keep_caps: vec![],
            rlimits: default_rlimits(),
            umask: 0o022,
            oom_score_adj: 0,
            pooled: false,
        }
    }

    #[test]
    fn a_pooled_interpreter_inherits_nothing() {
        let c = ChildCreds::prepare(&WorkerCreds {
            uid: 0,
            gid: 0,
            groups: vec![],
            keep_caps: vec![6, 7, 8],
            pooled: true,
            ..nobody()
        })
        .unwrap();
        let [low, high] = c.cap_data();
        assert_eq!(
            (low.effective, low.permitted, low.inheritable),
            (0x1c0, 0x1c0, 0)
        );
        assert_eq!(high.inheritable, 0);
    }

    #[test]
    fn capability_names() {
        for name in [
            "CAP_NET_BIND_SERVICE",
            "net_bind_service",
            "cap_net_bind_service",
            "Cap_Net_Bind_Service",
            "NET_BIND_SERVICE",
        ] {
            assert_eq!(cap_number(name), Some(10), "{name}");
        }
        assert_eq!(cap_number("CAP_CHOWN"), Some(0));
        assert_eq!(cap_number("sys_admin"), Some(21));
        assert_eq!(cap_number("CAP_SYS_RESOURCE"), Some(24));
        assert_eq!(cap_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        for unknown in [
            "",
            "CAP_",
            "cap",
            "NET_BIND",
            "CAP_CAP_CHOWN",
            "CAP_NET_BIND_SERVICE ",
            "10",
            "CAP_ALL",
        ] {
            assert_eq!(cap_number(unknown), None, "{unknown:?}");
        }
        // Every number has its name, and no two names share a number.
        for (i, name) in CAP_NAMES.iter().enumerate() {
            assert_eq!(cap_number(&format!("CAP_{name}")), Some(i as u8));
        }
    }

    #[test]
    fn default_limits_are_systemds() {
        assert_eq!(
            default_rlimits(),
            [Rlimit {
                resource: libc::RLIMIT_NOFILE as i32,
                soft: 1024,
                hard: 524_288
            }]
        );
    }

    #[test]
    fn creds_serde() {
        let json = r#"{"uid":1000,"gid":1000,"groups":[1000,27],"umask":18,"oom_score_adj":0}"#;
        let c: WorkerCreds = serde_json::from_str(json).unwrap();
        assert_eq!(c.keep_caps, Vec::<u8>::new());
        assert_eq!(c.rlimits, []);
        assert_eq!(c.groups, [1000, 27]);
        let c = nobody();
        let back: WorkerCreds = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn prepared_for_the_child() {
        let c = ChildCreds::prepare(&nobody()).unwrap();
        assert_eq!(c.oom_score_adj_text(), b"0");
        assert_eq!(c.keep, 0);
        assert_eq!(
            c.rlimits,
            [(
                libc::RLIMIT_NOFILE as i32,
                KernelRlimit {
                    cur: 1024,
                    max: 524_288
                }
            )]
        );
        // A non-root worker keeps nothing whatever it asks for.
        let c = ChildCreds::prepare(&WorkerCreds {
            keep_caps: vec![10, 12],
            ..nobody()
        })
        .unwrap();
        assert_eq!(c.keep, 0);
        assert_eq!(
            c.cap_data(),
            [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0
            }; 2]
        );
        let root = WorkerCreds {
            uid: 0,
            gid: 0,
            groups: vec![],
            keep_caps: vec![10, 40],
            oom_score_adj: -1000,
            ..nobody()
        };
        let c = ChildCreds::prepare(&root).unwrap();
        assert_eq!(c.keep, 1 << 10 | 1 << 40);
        let [low, high] = c.cap_data();
        assert_eq!(
            (low.effective, low.permitted, low.inheritable),
            (0x400, 0x400, 0x400)
        );
        assert_eq!(
            (high.effective, high.permitted, high.inheritable),
            (0x100, 0x100, 0x100)
        );
        assert_eq!(c.oom_score_adj_text(), b"-1000");
        assert_eq!(c.cap_header().version, 0x2008_0522);
    }

    #[test]
    fn only_what_is_left_of_the_bounding_set_is_dropped() {
        let root = WorkerCreds {
            uid: 0,
            gid: 0,
            keep_caps: vec![10, 12],
            ..nobody()
        };
        let kept = 1 << 10 | 1 << 12;
        let full = (1u64 << 41) - 1;
        // Before the shim's set is known: everything not kept.
        assert_eq!(
            ChildCreds::prepare(&nobody()).unwrap().drop_bounding,
            u64::MAX
        );
        assert_eq!(ChildCreds::prepare(&root).unwrap().drop_bounding, !kept);
        let left = |c: &WorkerCreds, present: u64| {
            ChildCreds::prepare(c)
                .unwrap()
                .for_bounding_set(present)
                .map(|c| c.drop_bounding)
        };
        for (creds, present, drop) in [
            // A shim with the whole set: all of it, less what is kept.
            (&nobody(), full, Ok(full)),
            (&root, full, Ok(full & !kept)),
            // A zygote's shim: the zygote kept what root workers may keep, nothing else.
            (&nobody(), kept, Ok(kept)),
            (&root, kept, Ok(0)),
            (&nobody(), 0, Ok(0)),
            // A root worker that keeps less than the zygote kept.
            (
                &WorkerCreds {
                    keep_caps: vec![12],
                    ..root.clone()
                },
                kept,
                Ok(1 << 10),
            ),
            // Nor can it keep what is not there.
            (
                &root,
                1 << 12 | 1 << 21,
                Err(CredsError::NotInBoundingSet(vec![10])),
            ),
            (&root, 0, Err(CredsError::NotInBoundingSet(vec![10, 12]))),
        ] {
            assert_eq!(
                left(creds, present),
                drop,
                "uid {} keeping {:?} with {present:#x}",
                creds.uid,
                creds.keep_caps
            );
        }
        assert_eq!(
            CredsError::NotInBoundingSet(vec![10, 12]).to_string(),
            "capabilities [10, 12] to keep are not in the shim's bounding set"
        );
    }

    #[test]
    fn limits_the_shim_has_already_are_not_set_again() {
        let limits = |r: &[(i32, u64, u64)]| {
            r.iter()
                .map(|&(resource, soft, hard)| Rlimit {
                    resource,
                    soft,
                    hard,
                })
                .collect::<Vec<_>>()
        };
        let c = WorkerCreds {
            rlimits: limits(&[(7, 1024, 524_288), (4, 0, u64::MAX), (6, 100, 200)]),
            ..nobody()
        };
        // NOFILE (7) as asked, CORE (4) not, NPROC (6) unknown.
        let shim = |resource| match resource {
            7 => Some(KernelRlimit {
                cur: 1024,
                max: 524_288,
            }),
            4 => Some(KernelRlimit {
                cur: 0,
                max: 1 << 30,
            }),
            _ => None,
        };
        let left = ChildCreds::prepare(&c)
            .unwrap()
            .without_inherited_limits(shim);
        let want = ChildCreds::prepare(&WorkerCreds {
            rlimits: limits(&[(4, 0, u64::MAX), (6, 100, 200)]),
            ..nobody()
        })
        .unwrap();
        assert_eq!(left.rlimits, want.rlimits);
        // This process's own, read back.
        let own = current_rlimit(libc::RLIMIT_NOFILE as i32).unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((own.cur, own.max), (lim.rlim_cur, lim.rlim_max));
        assert_eq!(current_rlimit(1000), None);
    }

    #[test]
    fn capability_sets() {
        assert_eq!(Caps(0).count(), 0);
        assert_eq!(Caps(1 << 10 | 1 << 40 | 1).collect::<Vec<_>>(), [0, 10, 40]);
        assert_eq!(
            Caps(u64::MAX).collect::<Vec<_>>(),
            (0..64).collect::<Vec<_>>()
        );
        assert_eq!(cap_bits(&[]), Some(0));
        assert_eq!(cap_bits(&[10, 40, 10]), Some(1 << 10 | 1 << 40));
        assert_eq!(cap_bits(&[63]), Some(1 << 63));
        assert_eq!(cap_bits(&[10, 64]), None);
    }

    #[test]
    fn refused_before_the_clone() {
        assert_eq!(nobody().validate(), Ok(()));
        let bad = |c: WorkerCreds| c.validate().unwrap_err().to_string();
        assert_eq!(
            bad(WorkerCreds {
                uid: 0,
                keep_caps: vec![64],
                ..nobody()
            }),
            "capability 64 out of range (0..=63)"
        );
        assert_eq!(
            bad(WorkerCreds {
                oom_score_adj: 1001,
                ..nobody()
            }),
            "oom_score_adj 1001 out of range (-1000..=1000)"
        );
        assert_eq!(
            bad(WorkerCreds {
                umask: 0o1022,
                ..nobody()
            }),
            "umask 0o1022 has bits beyond 0777"
        );
        assert_eq!(
            bad(WorkerCreds {
                rlimits: vec![Rlimit {
                    resource: 7,
                    soft: 2,
                    hard: 1
                }],
                ..nobody()
            }),
            "resource limit 7: soft limit 2 above hard limit 1"
        );
        assert!(bad(WorkerCreds {
            groups: vec![1; 65_537],
            ..nobody()
        })
        .contains("65537 supplementary groups"));
    }
}
