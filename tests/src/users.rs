//! Real local users and groups for the security tests: made with `useradd`/`groupadd` and
//! removed when dropped, and commands run as them with `setpriv` (their uid, primary group and
//! supplementary groups, nothing else).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    // Names stay under 32 characters (useradd's limit).
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn id_of(flag: &str, name: &str) -> Result<u32> {
    let out = Command::new("id").arg(flag).arg(name).output()?;
    if !out.status.success() {
        bail!("id {flag} {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// A group that exists while this value lives.
#[derive(Debug)]
pub struct TestGroup {
    pub name: String,
    pub gid: u32,
}

impl TestGroup {
    pub fn create() -> Result<Self> {
        let name = unique("bg");
        run(Command::new("groupadd").arg(&name))?;
        let out = Command::new("getent").args(["group", &name]).output()?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let gid = line
            .split(':')
            .nth(2)
            .and_then(|g| g.trim().parse().ok())
            .with_context(|| format!("gid of {name}: {line:?}"))?;
        Ok(Self { name, gid })
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A user (with a group of its own name, no home directory) that exists while this value lives.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// A new user, member of `groups` besides its own.
    pub fn create(groups: &[&TestGroup]) -> Result<Self> {
        let name = unique("bu");
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-U", "-s", "/bin/sh", "-d", "/nonexistent"]);
        if !groups.is_empty() {
            let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
            cmd.arg("-G").arg(names.join(","));
        }
        run(cmd.arg(&name))?;
        Ok(Self {
            uid: id_of("-u", &name)?,
            gid: id_of("-g", &name)?,
            name,
        })
    }

    /// `program args…` as this user: its uid, its primary and supplementary groups.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Anything the user still runs would keep userdel from working.
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .output();
        let _ = Command::new("userdel").arg(&self.name).output();
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A copy of the `berth` CLI in `dir` that every user can run (the build directory may sit under
/// a home that other users cannot enter); it goes with `dir`.
pub fn cli_in(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("berth");
    if !p.exists() {
        std::fs::copy(crate::bin("berth"), &p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(p)
}

/// `run()`'s output, run again while it fails with ETXTBSY: a child forked by another test
/// thread while a copied program was being written holds the write descriptor until its exec,
/// which comes a moment later.
pub fn output_past_etxtbsy(mut run: impl FnMut() -> std::process::Output) -> std::process::Output {
    let mut out = run();
    for _ in 0..20 {
        if !String::from_utf8_lossy(&out.stderr).contains("Text file busy") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = run();
    }
    out
}
