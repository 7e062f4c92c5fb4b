//! Which launches a warm interpreter pool may serve: pure rules, no I/O.
//!
//! A pooled worker is an interpreter that started ahead of need, as root with nothing but
//! CAP_SETUID/CAP_SETGID, with the pool's environment, and imported its preload list. What it
//! read at its start it cannot read again, so a launch takes one only where a cold start would
//! have read the same: the same interpreter arguments, the same value (or absence) of every
//! variable that the interpreter or a preloaded library reads at start ([`start_time_var`]),
//! and nothing the pooled worker cannot give afterwards (its own network mode, code that goes by
//! fd 3, a GPU, a root worker, a memory limit below what it already uses). Anything else starts
//! cold, as it always did.

use std::collections::BTreeMap;

use crate::launch::NetworkMode;

/// Whether the variable `name` is read by the Python interpreter, its C library or a library
/// commonly preloaded (NumPy's BLAS, OpenMP) when they start, rather than later by the code:
/// a launch that sets it differently from the pool starts cold.
pub fn start_time_var(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "LANG",
        "LANGUAGE",
        "TZ",
        "MALLOC_ARENA_MAX",
        "MALLOC_TOP_PAD_",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_BIND_NOW",
        "GOTO_NUM_THREADS",
        "VIRTUAL_ENV",
        "HOME",
        "TMPDIR",
    ];
    const PREFIXES: &[&str] = &[
        "PYTHON",
        "LC_",
        "OMP_",
        "OPENBLAS_",
        "MKL_",
        "BLIS_",
        "NUMEXPR_",
        "VECLIB_",
        "NPY_",
        "NUMPY_",
        "KMP_",
        "GLIBC_",
    ];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The start-time variables of `env` (see [`start_time_var`]), by name, but for `HOME`: a pooled
/// worker starts without one and takes the user's at its claim (its user site directory is added
/// then, as a cold start adds it).
pub fn start_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(k, _)| start_time_var(k) && k.as_str() != "HOME")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A launch as the pool sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask<'a> {
    pub kernel: &'a str,
    pub network: NetworkMode,
    pub nvidia_gpu: u32,
    /// The code goes by fd 3 (too long for the command line).
    pub code_by_fd: bool,
    /// The uid the worker runs as; `None`: the daemon's own identity (no switch).
    pub uid: Option<u32>,
    /// The worker's whole environment, as a cold start would get it.
    pub env: &'a [(String, String)],
    pub memory_bytes: u64,
    /// The interpreter and its arguments (before `-c CODE` or the script).
    pub interpreter_args: &'a [String],
}

/// What the pool's workers are.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer<'a> {
    pub kernel: &'a str,
    /// The start-time variables the pooled interpreters started with ([`start_env`]).
    pub start_env: &'a BTreeMap<String, String>,
    /// What one idle pooled worker uses (bytes of its cgroup's memory).
    pub usage_bytes: u64,
    pub interpreter_args: &'a [String],
}

/// Why a launch starts cold rather than from the pool; `None`: it may take a pooled worker.
pub fn cold_reason(ask: &Ask<'_>, offer: &Offer<'_>) -> Option<String> {
    if ask.kernel != offer.kernel {
        return Some(format!("kernel {} has no pool", ask.kernel));
    }
    if ask.network != NetworkMode::Bridge {
        return Some("network mode is not bridge".into());
    }
    if ask.nvidia_gpu > 0 {
        return Some("GPUs are asked for".into());
    }
    if ask.code_by_fd {
        return Some("the code is too long for the command line".into());
    }
    match ask.uid {
        Some(0) | None => return Some("root workers start cold".into()),
        Some(_) => {}
    }
    if ask.interpreter_args != offer.interpreter_args {
        return Some("other interpreter arguments".into());
    }
    if ask.memory_bytes < offer.usage_bytes.saturating_mul(5) / 4 {
        return Some(format!(
            "memory limit {} below a pooled worker's use {} (+25%)",
            ask.memory_bytes, offer.usage_bytes
        ));
    }
    let mut seen = 0;
    for (k, v) in ask.env {
        if !start_time_var(k) || k == "HOME" {
            continue;
        }
        if offer.start_env.get(k) != Some(v) {
            return Some(format!("{k} is set to another value than the pool's"));
        }
        seen += 1;
    }
    if seen != offer.start_env.len() {
        return Some("a variable the pool started with is unset".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn start_time_variables() {
        for v in [
            "PYTHONPATH",
            "PYTHONHOME",
            "PYTHONHASHSEED",
            "PYTHONDONTWRITEBYTECODE",
            "LANG",
            "LC_ALL",
            "LC_CTYPE",
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
            "LD_PRELOAD",
            "TZ",
        ] {
            assert!(start_time_var(v), "{v}");
        }
        for v in [
            "PATH",
            "USER",
            "BERTH_WORKER_ID",
            "CDSW_MASTER_IP",
            "MY_VAR",
            "LCX",
        ] {
            assert!(!start_time_var(v), "{v}");
        }
    }

    #[test]
    fn what_starts_cold() {
        let args = vec!["/usr/bin/python3".to_owned(), "-u".to_owned()];
        let pool_env = BTreeMap::from([("LANG".to_owned(), "C.UTF-8".to_owned())]);
        let offer = Offer {
            kernel: "python3",
            start_env: &pool_env,
            usage_bytes: 10 << 20,
            interpreter_args: &args,
        };
        let plain = env(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/home/u"),
            ("LANG", "C.UTF-8"),
            ("BERTH_WORKER_ID", "x"),
            ("MY", "1"),
        ]);
        let ok = Ask {
            kernel: "python3",
            network: NetworkMode::Bridge,
            nvidia_gpu: 0,
            code_by_fd: false,
            uid: Some(1000),
            env: &plain,
            memory_bytes: 1 << 30,
            interpreter_args: &args,
        };
        assert_eq!(cold_reason(&ok, &offer), None);
        let pythonpath = env(&[("LANG", "C.UTF-8"), ("PYTHONPATH", "/x")]);
        let omp = env(&[("LANG", "C.UTF-8"), ("OMP_NUM_THREADS", "1")]);
        let other_lang = env(&[("LANG", "de_DE.UTF-8")]);
        let no_lang = env(&[("PATH", "/usr/bin")]);
        let lc = env(&[("LANG", "C.UTF-8"), ("LC_ALL", "C")]);
        let other_args = vec!["/usr/bin/python3".to_owned()];
        for (ask, why) in [
            (
                Ask {
                    kernel: "r",
                    ..ok.clone()
                },
                "kernel",
            ),
            (
                Ask {
                    network: NetworkMode::Host,
                    ..ok.clone()
                },
                "network",
            ),
            (
                Ask {
                    network: NetworkMode::None,
                    ..ok.clone()
                },
                "network",
            ),
            (
                Ask {
                    nvidia_gpu: 1,
                    ..ok.clone()
                },
                "GPU",
            ),
            (
                Ask {
                    code_by_fd: true,
                    ..ok.clone()
                },
                "too long",
            ),
            (
                Ask {
                    uid: Some(0),
                    ..ok.clone()
                },
                "root",
            ),
            (
                Ask {
                    uid: None,
                    ..ok.clone()
                },
                "root",
            ),
            (
                Ask {
                    memory_bytes: 12 << 20,
                    ..ok.clone()
                },
                "memory",
            ),
            (
                Ask {
                    env: &pythonpath,
                    ..ok.clone()
                },
                "PYTHONPATH",
            ),
            (
                Ask {
                    env: &omp,
                    ..ok.clone()
                },
                "OMP_NUM_THREADS",
            ),
            (
                Ask {
                    env: &other_lang,
                    ..ok.clone()
                },
                "LANG",
            ),
            (
                Ask {
                    env: &no_lang,
                    ..ok.clone()
                },
                "unset",
            ),
            (
                Ask {
                    env: &lc,
                    ..ok.clone()
                },
                "LC_ALL",
            ),
            (
                Ask {
                    interpreter_args: &other_args,
                    ..ok.clone()
                },
                "arguments",
            ),
        ] {
            let got = cold_reason(&ask, &offer);
            assert!(
                got.as_deref().is_some_and(|r| r.contains(why)),
                "{why}: {got:?}"
            );
        }
        // Exactly at the memory bound (usage + 25%) it fits.
        let at = Ask {
            memory_bytes: (10 << 20) * 5 / 4,
            ..ok.clone()
        };
        assert_eq!(cold_reason(&at, &offer), None);
    }

    #[test]
    fn the_pool_env_keeps_start_time_variables_but_home() {
        let base = BTreeMap::from([
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
            ("FOO".to_owned(), "1".to_owned()),
            ("TZ".to_owned(), "UTC".to_owned()),
        ]);
        let s = start_env(&base);
        assert_eq!(s.keys().collect::<Vec<_>>(), ["LANG", "TZ"]);
    }
}
