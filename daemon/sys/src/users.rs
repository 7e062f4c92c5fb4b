//! Local accounts and groups as a worker that runs as them sees them (through NSS, as `id`
//! does), and file checks made with a user's filesystem identity.
//!
//! Every call here is blocking: NSS may read files or ask a daemon (sssd, systemd-userdbd).
//! Call it off async threads.
//!
//! [`as_user`] switches the identity of *the calling thread only*, through raw syscalls
//! (`SYS_setgroups`, `SYS_setfsgid`, `SYS_setfsuid`). The kernel keeps credentials per thread;
//! it is glibc's wrappers that broadcast a change to every thread of the process (the setxid
//! signal dance), which here would hand the whole daemon to the user for a moment. The raw calls
//! are safe because nothing else runs on the thread between the switch and its restoration: a
//! guard puts the thread's fsuid, fsgid and groups back before `as_user` returns or unwinds,
//! and aborts the process if it cannot (a thread left as another user is worse than a crash).
//! Only the filesystem ids change: the real and effective uid stay root's, so a signal or a
//! `kill` in `f` would still act as root; `f` is meant for path lookups, `stat` and [`eaccess`].
//! Threads started inside `f` inherit the user's identity for their whole life, and a
//! glibc `setuid`/`setgid`/`setgroups` call on another thread during `f` would overwrite this
//! thread's credentials too.

use std::ffi::{c_char, c_int, CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Failure of an account lookup or of a switch of identity, with the name or id it concerned.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user or group name held a NUL byte, which no account name can.
    #[error("{what} name {name:?} contains a NUL byte")]
    NulInName { what: &'static str, name: String },
    /// The NSS lookup itself failed (not: found nothing).
    #[error("{call}({key}): {source}")]
    Lookup {
        call: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },
    /// The entry did not fit in the largest buffer we allow.
    #[error("{call}({key}): entry larger than {limit} bytes")]
    EntryTooLarge {
        call: &'static str,
        key: String,
        limit: usize,
    },
    /// The user belongs to more groups than the kernel allows a process.
    #[error("getgrouplist({user}): more than {limit} groups")]
    TooManyGroups { user: String, limit: usize },
    /// The account's name is not UTF-8.
    #[error("account with uid {uid}: name is not UTF-8")]
    NameNotUtf8 { uid: u32 },
    /// This thread's filesystem identity could not be switched to the user's (typically: no
    /// CAP_SETUID/CAP_SETGID); nothing ran as the user.
    #[error("acting as {user} (uid {uid}): {op}: {source}")]
    Identity {
        user: String,
        uid: u32,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A local account, as a worker that runs as it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The login name, as NSS spells it (for `by_name`, the canonical one).
    pub name: String,
    /// The user id.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Every group of the user (getgrouplist: the primary included), sorted, deduplicated.
    pub groups: Vec<u32>,
    /// Home directory, as the passwd entry gives it (it need not exist).
    pub home: PathBuf,
    /// Login shell, as the passwd entry gives it (may be empty or `nologin`).
    pub shell: PathBuf,
}

/// First size of the buffer for `getpw*_r`/`getgr*_r` strings; doubled on `ERANGE`.
const FIRST_BUFFER: usize = 1024;
/// Largest such buffer: an entry needing more is an error.
const MAX_BUFFER: usize = 1 << 20;
/// First size of the getgrouplist buffer.
const FIRST_GROUPS: usize = 64;
/// Largest group list: the kernel's NGROUPS_MAX.
const MAX_GROUPS: usize = 65536;

/// The account with uid `uid`, or `None` when NSS knows none. Blocking.
pub fn by_uid(uid: u32) -> Result<Option<Account>, UserError> {
    let key = uid.to_string();
    let found = reentrant(
        "getpwuid_r",
        &key,
        |entry, buf, result| {
            // SAFETY: `entry` and `result` point to writable storage of the right types and
            // `buf` is a writable buffer of `buf.len()` bytes, all alive for the call.
            unsafe { libc::getpwuid_r(uid, entry, buf.as_mut_ptr(), buf.len(), result) }
        },
        read_passwd,
    )?;
    found.map(with_groups).transpose()
}

/// The account named `name`, or `None` when NSS knows none. Blocking.
pub fn by_name(name: &str) -> Result<Option<Account>, UserError> {
    let c_name = c_name("user", name)?;
    let found = reentrant(
        "getpwnam_r",
        name,
        |entry, buf, result| {
            // SAFETY: `c_name` is a NUL-terminated string; `entry` and `result` point to
            // writable storage of the right types and `buf` is a writable buffer of
            // `buf.len()` bytes, all alive for the call.
            unsafe { libc::getpwnam_r(c_name.as_ptr(), entry, buf.as_mut_ptr(), buf.len(), result) }
        },
        read_passwd,
    )?;
    found.map(with_groups).transpose()
}

/// The gid of group `name` (getgrnam_r), None when there is no such group. Blocking.
pub fn group_gid(name: &str) -> Result<Option<u32>, UserError> {
    let c_name = c_name("group", name)?;
    reentrant(
        "getgrnam_r",
        name,
        |entry, buf, result| {
            // SAFETY: as in `by_name`, for `struct group`.
            unsafe { libc::getgrnam_r(c_name.as_ptr(), entry, buf.as_mut_ptr(), buf.len(), result) }
        },
        |group: &libc::group| Ok(group.gr_gid),
    )
}

/// Runs `f` on this thread with the filesystem identity of `account` (fsuid, fsgid and the
/// supplementary groups of this thread only, through raw syscalls: SYS_setgroups, SYS_setfsgid,
/// SYS_setfsuid; glibc's wrappers would change every thread of the process), so that every path
/// lookup, stat and `eaccess` inside `f` is checked as that user would be, ACLs included. Restores
/// this thread's identity afterwards (also when `f` panics: a guard). Needs CAP_SETUID/CAP_SETGID
/// (root); without them it returns Err without running `f`.
///
/// Switching fsuid away from 0 also drops the filesystem capabilities (CAP_DAC_OVERRIDE,
/// CAP_DAC_READ_SEARCH, CAP_FOWNER, …) from this thread's effective set; switching back raises
/// them again. If the identity cannot be restored the process aborts. See the module
/// documentation for what `f` must not do.
pub fn as_user<T>(account: &Account, f: impl FnOnce() -> T) -> Result<T, UserError> {
    let guard = FsIdentity::enter(account)?;
    let out = f();
    drop(guard);
    Ok(out)
}

/// faccessat(AT_FDCWD, path, mode, AT_EACCESS): checked with the thread's effective/filesystem
/// identity (so inside `as_user`, as that user), unlike access(2), which uses the real uid.
///
/// `mode` is `libc::F_OK` or an or of `R_OK`, `W_OK`, `X_OK`. Any failure reads as "no
/// access", including a path with a NUL byte. It calls the `faccessat2` syscall itself: glibc
/// emulates `AT_EACCESS` in user space on kernels without it, from the effective uid (root's,
/// inside `as_user`) and without ACLs, which would answer wrongly; on such kernels (before
/// 5.8) this answers `false`.
pub fn eaccess(path: &Path, mode: i32) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is a NUL-terminated string alive for the call; the other arguments are
    // plain integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_faccessat2,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            mode,
            libc::AT_EACCESS,
        )
    };
    rc == 0
}

fn c_name(what: &'static str, name: &str) -> Result<CString, UserError> {
    CString::new(name).map_err(|_| UserError::NulInName {
        what,
        name: name.to_owned(),
    })
}

/// Calls a `get*_r` function `lookup(entry, buffer, result)` with a buffer grown on `ERANGE`,
/// and reads the entry it found with `read`. `None`: no such entry (0 with a null result, or
/// `ENOENT`, which some NSS modules return).
fn reentrant<E, R>(
    call: &'static str,
    key: &str,
    mut lookup: impl FnMut(*mut E, &mut [c_char], *mut *mut E) -> c_int,
    read: impl FnOnce(&E) -> Result<R, UserError>,
) -> Result<Option<R>, UserError> {
    let mut buf: Vec<c_char> = vec![0; FIRST_BUFFER];
    loop {
        let mut entry = MaybeUninit::<E>::uninit();
        let mut result: *mut E = std::ptr::null_mut();
        match lookup(entry.as_mut_ptr(), &mut buf, &mut result) {
            0 if result.is_null() => return Ok(None),
            0 => {
                // SAFETY: on success `result` points to `entry`, which the call filled in;
                // its strings point into `buf`, alive until the end of this function.
                let entry = unsafe { &*result };
                return read(entry).map(Some);
            }
            libc::ENOENT => return Ok(None),
            libc::EINTR => {}
            libc::ERANGE if buf.len() < MAX_BUFFER => buf.resize(buf.len() * 2, 0),
            libc::ERANGE => {
                return Err(UserError::EntryTooLarge {
                    call,
                    key: key.to_owned(),
                    limit: MAX_BUFFER,
                })
            }
            errno => {
                return Err(UserError::Lookup {
                    call,
                    key: key.to_owned(),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }
}

/// The bytes of C string `ptr`, empty for a null pointer.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string that outlives `'a`.
unsafe fn c_bytes<'a>(ptr: *const c_char) -> &'a [u8] {
    if ptr.is_null() {
        return &[];
    }
    // SAFETY: the caller promises a NUL-terminated string alive for 'a.
    unsafe { CStr::from_ptr(ptr) }.to_bytes()
}

/// An account from a `passwd` entry, its groups not yet filled in.
fn read_passwd(pw: &libc::passwd) -> Result<Account, UserError> {
    let path = |ptr| {
        // SAFETY: a filled-in `passwd` holds null or NUL-terminated strings in the lookup's
        // buffer, alive while `pw` is.
        PathBuf::from(std::ffi::OsStr::from_bytes(unsafe { c_bytes(ptr) }))
    };
    // SAFETY: as above.
    let name = unsafe { c_bytes(pw.pw_name) };
    let name =
        String::from_utf8(name.to_vec()).map_err(|_| UserError::NameNotUtf8 { uid: pw.pw_uid })?;
    Ok(Account {
        name,
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        groups: Vec::new(),
        home: path(pw.pw_dir),
        shell: path(pw.pw_shell),
    })
}

fn with_groups(mut account: Account) -> Result<Account, UserError> {
    account.groups = group_list(&account.name, account.gid)?;
    Ok(account)
}

/// getgrouplist(name, gid): every group of the user, the primary `gid` included; sorted,
/// deduplicated.
fn group_list(name: &str, gid: u32) -> Result<Vec<u32>, UserError> {
    let c_name = c_name("user", name)?;
    let mut groups: Vec<libc::gid_t> = vec![0; FIRST_GROUPS];
    loop {
        let mut count = groups.len() as c_int;
        // SAFETY: `c_name` is NUL-terminated; `groups` has room for `count` gids and `count`
        // is a valid pointer, all alive for the call.
        let rc =
            unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate((count.max(0) as usize).min(groups.len()));
            groups.sort_unstable();
            groups.dedup();
            return Ok(groups);
        }
        if groups.len() >= MAX_GROUPS {
            return Err(UserError::TooManyGroups {
                user: name.to_owned(),
                limit: MAX_GROUPS,
            });
        }
        // glibc reports the count it needs in `count`.
        let want = (count.max(0) as usize).max(groups.len() * 2);
        groups.resize(want.min(MAX_GROUPS), 0);
    }
}

/// This thread's supplementary groups (`SYS_getgroups`: this thread's credentials).
fn thread_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: size 0 with a null list only asks for the count.
    let count =
        unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<libc::gid_t>()) };
    if count < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups: Vec<libc::gid_t> = vec![0; count as usize];
    // SAFETY: `groups` has room for `count` gids; only this thread changes its own groups.
    let got = unsafe { libc::syscall(libc::SYS_getgroups, count, groups.as_mut_ptr()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(got as usize);
    Ok(groups)
}

/// Sets this thread's supplementary groups (`SYS_setgroups`, not glibc's process-wide one).
fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: `groups` is a readable array of `groups.len()` gids alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SYS_setfsuid`: sets this thread's fsuid when allowed; returns the previous one either way.
/// `u32::MAX` (an invalid uid) changes nothing and so reads the current one.
fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes one integer and cannot fail in a way that harms memory.
    unsafe { libc::syscall(libc::SYS_setfsuid, libc::c_long::from(uid)) as u32 }
}

/// `SYS_setfsgid`, as [`set_fsuid`] for the fsgid.
fn set_fsgid(gid: u32) -> u32 {
    // SAFETY: setfsgid takes one integer and cannot fail in a way that harms memory.
    unsafe { libc::syscall(libc::SYS_setfsgid, libc::c_long::from(gid)) as u32 }
}

/// This thread's fsuid.
fn fsuid() -> u32 {
    set_fsuid(u32::MAX)
}

/// This thread's fsgid.
fn fsgid() -> u32 {
    set_fsgid(u32::MAX)
}

/// What [`as_user`] changed on this thread, put back on drop in the reverse order (fsuid first,
/// which raises the filesystem capabilities again).
struct FsIdentity {
    groups: Option<Vec<libc::gid_t>>,
    fsgid: Option<u32>,
    fsuid: Option<u32>,
}

impl FsIdentity {
    fn enter(account: &Account) -> Result<Self, UserError> {
        let fail = |op, source| UserError::Identity {
            user: account.name.clone(),
            uid: account.uid,
            op,
            source,
        };
        let denied = || io::Error::from_raw_os_error(libc::EPERM);
        if account.uid == u32::MAX || account.gid == u32::MAX {
            return Err(fail(
                "check ids",
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let mut restore = FsIdentity {
            groups: None,
            fsgid: None,
            fsuid: None,
        };
        let saved = thread_groups().map_err(|e| fail("getgroups", e))?;
        set_thread_groups(&account.groups).map_err(|e| fail("setgroups", e))?;
        restore.groups = Some(saved);
        restore.fsgid = Some(set_fsgid(account.gid));
        if fsgid() != account.gid {
            return Err(fail("setfsgid", denied()));
        }
        restore.fsuid = Some(set_fsuid(account.uid));
        if fsuid() != account.uid {
            return Err(fail("setfsuid", denied()));
        }
        Ok(restore)
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        let lost = |what: &str| -> ! {
            eprintln!(
                "berth: cannot restore this thread's {what} after acting as a user; aborting"
            );
            std::process::abort()
        };
        if let Some(uid) = self.fsuid {
            set_fsuid(uid);
            if fsuid() != uid {
                lost("fsuid");
            }
        }
        if let Some(gid) = self.fsgid {
            set_fsgid(gid);
            if fsgid() != gid {
                lost("fsgid");
            }
        }
        if let Some(groups) = &self.groups {
            if set_thread_groups(groups).is_err() {
                lost("supplementary groups");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    use std::sync::{mpsc, Mutex};

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// The line of /etc/passwd for `uid`: (name, home, shell).
    fn passwd_line(uid: u32) -> Option<(String, PathBuf, PathBuf)> {
        let text = std::fs::read_to_string("/etc/passwd").unwrap();
        text.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() == 7 && f[2].parse() == Ok(uid))
                .then(|| (f[0].to_owned(), PathBuf::from(f[5]), PathBuf::from(f[6])))
        })
    }

    #[test]
    fn root_is_as_etc_passwd_says() {
        let root = by_uid(0).unwrap().unwrap();
        let (name, home, shell) = passwd_line(0).unwrap();
        assert_eq!(
            (root.name.as_str(), &root.home, &root.shell),
            (name.as_str(), &home, &shell)
        );
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{:?}", root.groups);
        assert_eq!(by_name(&name).unwrap().unwrap(), root);
    }

    #[test]
    fn nobody_and_unknown_names() {
        let nobody = by_name("nobody").unwrap().unwrap();
        assert_eq!((nobody.uid, nobody.name.as_str()), (65534, "nobody"));
        assert!(nobody.groups.contains(&nobody.gid));
        assert!(
            nobody.groups.windows(2).all(|w| w[0] < w[1]),
            "sorted, deduplicated"
        );
        assert_eq!(by_name("berth_no_such_user_x").unwrap(), None);
        assert_eq!(by_uid(3_999_999_999).unwrap(), None);
        assert!(matches!(
            by_name("no\0body"),
            Err(UserError::NulInName { .. })
        ));
    }

    #[test]
    fn groups_by_name() {
        assert_eq!(group_gid("root").unwrap(), Some(0));
        assert_eq!(group_gid("berth_no_such_group_x").unwrap(), None);
        assert!(matches!(
            group_gid("ro\0ot"),
            Err(UserError::NulInName { .. })
        ));
    }

    /// Serialises useradd/userdel: they fail on a locked /etc/passwd instead of waiting.
    static ACCOUNTS: Mutex<()> = Mutex::new(());

    /// A throwaway user `berthtest_<random>` in a primary and a supplementary group of its
    /// own, all removed on drop (also when the test fails).
    struct TestUser {
        name: String,
        primary: String,
        extra: String,
    }

    fn run(program: &str, args: &[&str]) -> bool {
        let status = Command::new(program).args(args).status();
        matches!(status, Ok(s) if s.success())
    }

    impl TestUser {
        fn create() -> TestUser {
            let _lock = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let suffix = format!("{:08x}", nanos ^ std::process::id().rotate_left(16));
            let user = TestUser {
                name: format!("berthtest_{suffix}"),
                primary: format!("berthtest_{suffix}_p"),
                extra: format!("berthtest_{suffix}_s"),
            };
            // From here on, drop removes whatever was made.
            assert!(
                run("groupadd", &[&user.primary]),
                "groupadd {}",
                user.primary
            );
            assert!(run("groupadd", &[&user.extra]), "groupadd {}", user.extra);
            assert!(
                run(
                    "useradd",
                    &[
                        "-M",
                        "-N",
                        "-g",
                        &user.primary,
                        "-G",
                        &user.extra,
                        &user.name
                    ]
                ),
                "useradd {}",
                user.name
            );
            user
        }
    }

    impl Drop for TestUser {
        fn drop(&mut self) {
            let _lock = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
            run("userdel", &[&self.name]);
            run("groupdel", &[&self.primary]);
            run("groupdel", &[&self.extra]);
        }
    }

    #[test]
    fn real_user_has_its_ids_and_groups() {
        if !is_root() {
            eprintln!("skipped: needs root (useradd)");
            return;
        }
        let user = TestUser::create();
        let primary = group_gid(&user.primary).unwrap().unwrap();
        let extra = group_gid(&user.extra).unwrap().unwrap();
        let account = by_name(&user.name).unwrap().unwrap();
        assert_eq!(account.gid, primary);
        let mut want = vec![primary, extra];
        want.sort_unstable();
        assert_eq!(account.groups, want);
        assert_eq!(by_uid(account.uid).unwrap().unwrap(), account);
        let id_u = Command::new("id")
            .args(["-u", &user.name])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&id_u.stdout).trim(),
            account.uid.to_string()
        );
    }

    /// A 0700 root-owned directory with a file in it.
    fn private_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, b"x").unwrap();
        (dir, file)
    }

    #[test]
    fn as_user_checks_paths_as_that_user_and_restores() {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_SETUID/CAP_SETGID)");
            return;
        }
        let nobody = by_name("nobody").unwrap().unwrap();
        let (dir, file) = private_dir();
        let groups_before = thread_groups().unwrap();
        assert!(eaccess(dir.path(), libc::X_OK));
        assert!(std::fs::metadata(&file).is_ok());

        // A thread that exists before the switch keeps root's identity throughout.
        let (ask, asked) = mpsc::channel::<PathBuf>();
        let (tell, told) = mpsc::channel::<bool>();
        let other = std::thread::spawn(move || {
            for path in asked {
                tell.send(std::fs::metadata(path).is_ok()).unwrap();
            }
        });

        let (x_ok, meta, ids, other_sees) = as_user(&nobody, || {
            ask.send(file.clone()).unwrap();
            (
                eaccess(dir.path(), libc::X_OK),
                std::fs::metadata(&file).map_err(|e| e.kind()),
                (fsuid(), fsgid(), thread_groups().unwrap()),
                told.recv().unwrap(),
            )
        })
        .unwrap();
        assert!(!x_ok, "nobody may not enter a 0700 root directory");
        assert_eq!(meta.unwrap_err(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(ids, (nobody.uid, nobody.gid, nobody.groups.clone()));
        assert!(other_sees, "another thread kept its identity");
        drop(ask);
        other.join().unwrap();

        assert_eq!((fsuid(), fsgid()), (0, 0));
        assert_eq!(thread_groups().unwrap(), groups_before);
        assert!(eaccess(dir.path(), libc::X_OK));
        assert!(std::fs::metadata(&file).is_ok());
    }

    #[test]
    fn as_user_restores_after_a_panic() {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_SETUID/CAP_SETGID)");
            return;
        }
        let nobody = by_name("nobody").unwrap().unwrap();
        let groups_before = thread_groups().unwrap();
        let unwound = std::panic::catch_unwind(|| {
            as_user(&nobody, || {
                assert_eq!(fsuid(), nobody.uid);
                panic!("inside as_user");
            })
        });
        assert!(unwound.is_err());
        assert_eq!((fsuid(), fsgid()), (0, 0));
        assert_eq!(thread_groups().unwrap(), groups_before);
    }

    #[test]
    fn as_user_applies_supplementary_groups() {
        if !is_root() {
            eprintln!("skipped: needs root (useradd, CAP_SETUID/CAP_SETGID)");
            return;
        }
        let user = TestUser::create();
        let account = by_name(&user.name).unwrap().unwrap();
        let extra = group_gid(&user.extra).unwrap().unwrap();
        assert_ne!(
            account.gid, extra,
            "the group is supplementary, not primary"
        );
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::os::unix::fs::chown(&shared, Some(0), Some(extra)).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o750)).unwrap();
        // The outer temp dir is 0700 root: open it to others so only `shared` decides.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let file = shared.join("data");
        std::fs::write(&file, b"x").unwrap();

        let inside = as_user(&account, || {
            (
                eaccess(&shared, libc::X_OK),
                eaccess(&shared, libc::R_OK),
                eaccess(&shared, libc::W_OK),
                std::fs::metadata(&file).is_ok(),
            )
        })
        .unwrap();
        assert_eq!(inside, (true, true, false, true));

        let nobody = by_name("nobody").unwrap().unwrap();
        let outsider = as_user(&nobody, || {
            (
                eaccess(&shared, libc::X_OK),
                std::fs::metadata(&file).is_ok(),
            )
        })
        .unwrap();
        assert_eq!(outsider, (false, false));
    }

    #[test]
    fn as_user_without_privilege_does_not_run() {
        if is_root() {
            eprintln!("skipped: needs a non-root user (checks the refusal without CAP_SETGID)");
            return;
        }
        let me = by_uid(euid()).unwrap().unwrap();
        let mut ran = false;
        let result = as_user(&me, || ran = true);
        assert!(
            matches!(
                result,
                Err(UserError::Identity {
                    op: "setgroups",
                    ..
                })
            ),
            "{result:?}"
        );
        assert!(!ran);
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn eaccess_answers_false_for_odd_paths() {
        assert!(!eaccess(Path::new("/no/such/path/berth"), libc::F_OK));
        assert!(!eaccess(Path::new("a\0b"), libc::F_OK));
        assert!(eaccess(Path::new("/"), libc::X_OK));
    }
}
