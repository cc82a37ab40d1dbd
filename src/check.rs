//! `comet --check`'s warnings: what would go wrong at run time in a config that is valid, such
//! as secrets still at their shipped `change-me-...` values, more connections allowed than the
//! process may open files, or a SQLite file the daemon could not write. Pure but for the two
//! facts about the machine it is given (the open-file limit, whether a path is writable), so
//! the rules are tested without touching the system.

use crate::config::Config;
use std::path::Path;

/// Descriptors the daemon needs besides connections (listeners, poll, waker, stderr, store).
const OWN_FILES: u64 = 16;

/// One warning: the key it is about, and what will go wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct Warning {
    /// The config key, as written in `server.toml`.
    pub key: String,
    /// What will go wrong, and how to fix it.
    pub problem: String,
}

/// A secret that is still the shipped placeholder.
fn placeholder(secret: &str) -> bool {
    secret.to_ascii_lowercase().contains("change-me")
}

/// The warnings for `cfg`, given the process's open-file limit and a test for writable paths.
pub fn warnings(cfg: &Config, nofile: Option<u64>, writable: impl Fn(&Path) -> bool) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |key: String, problem: String| out.push(Warning { key, problem });
    for (name, secret) in &cfg.tokens {
        if placeholder(secret) {
            warn(format!("control.tokens.{name}"), "still the shipped placeholder secret: anyone who read the package can publish; set a random one".into());
        }
    }
    if placeholder(&cfg.auth.key_secret) {
        warn("auth.key_secret".into(), "still the shipped placeholder: anyone can sign subscribe keys; set a random one".into());
    }
    if cfg.mercure.as_ref().is_some_and(|m| m.placeholder_key) {
        warn("mercure.publisher_jwt_key".into(), "a shipped example key is still set: anyone who knows it can publish to the Mercure hub; set a random one".into());
    }
    if let Some(c) = &cfg.cluster {
        if placeholder(&c.password) {
            warn("cluster.password".into(), "still the shipped placeholder: set Redis's requirepass".into());
        }
    }
    if let Some(n) = nofile {
        let want = cfg.limits.max_connections as u64 + OWN_FILES + cfg.workers.threads as u64;
        if want > n {
            warn(
                "limits.max_connections".into(),
                format!(
                    "{} connections (plus about {} descriptors of the daemon's own) exceed this process's open-file limit of {n}: \
                     accepts will fail with EMFILE; raise the limit (systemd: LimitNOFILE) or lower the key",
                    cfg.limits.max_connections,
                    want - cfg.limits.max_connections as u64
                ),
            );
        }
    }
    let mut files = Vec::new();
    if let Some((p, _)) = &cfg.store {
        files.push(("store.path", p));
    }
    if let Some(p) = &cfg.presence.database {
        files.push(("presence.database", p));
    }
    for (key, p) in files {
        // SQLite writes the file and, beside it, its journal: the directory must be writable.
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !writable(dir) || (p.exists() && !writable(p)) {
            warn(key.into(), format!("{} cannot be written by this user (SQLite needs the file and its directory)", p.display()));
        }
    }
    out
}

/// The soft open-file limit of this process.
pub fn nofile_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills a local struct.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur as u64)
}

/// Whether this process may write `path` (access(2) with W_OK).
pub fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a NUL-terminated path that lives across the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(cfg: &str, nofile: Option<u64>, writable: impl Fn(&Path) -> bool) -> Vec<String> {
        warnings(&Config::parse(cfg).unwrap(), nofile, writable).into_iter().map(|w| w.key).collect::<Vec<_>>()
    }

    #[test]
    fn shipped_file_warns_about_its_placeholder_secrets_only() {
        let k = keys(include_str!("../server.toml"), Some(1 << 20), |_| true);
        assert_eq!(k, ["control.tokens.php", "mercure.publisher_jwt_key"]);
    }

    #[test]
    fn placeholders_name_their_key() {
        let cfg = "[control.tokens]\nphp = \"Change-Me-please\"\nok = \"a-real-secret\"\n[auth]\nkey_secret = \"change-me-key-secret-16\"\n";
        assert_eq!(keys(cfg, None, |_| true), ["control.tokens.php", "auth.key_secret"]);
        let cfg = "[cluster]\nredis = \"127.0.0.1:6379\"\npassword = \"change-me\"\n";
        assert_eq!(keys(cfg, None, |_| true), ["cluster.password"]);
    }

    #[test]
    fn max_connections_above_the_file_limit() {
        let cfg = "[limits]\nmax_connections = 1010\n[workers]\nthreads = 4\n";
        assert_eq!(keys(cfg, Some(1024), |_| true), ["limits.max_connections"], "1010 + 16 + 4 > 1024");
        assert!(keys(cfg, Some(1029), |_| true).contains(&"limits.max_connections".to_string()));
        assert!(keys(cfg, Some(1030), |_| true).is_empty(), "1010 + 16 + 4 = 1030 fits");
        assert!(keys(cfg, None, |_| true).is_empty(), "no limit known: nothing to say");
        let w = warnings(&Config::parse(cfg).unwrap(), Some(1024), |_| true);
        assert!(w[0].problem.contains("1024") && w[0].problem.contains("LimitNOFILE"), "{:?}", w[0]);
    }

    #[test]
    fn unwritable_sqlite_files() {
        let cfg = "[store]\npath = \"/nowhere/store.sqlite\"\n[presence]\ndatabase = \"/data/app.sqlite\"\n";
        assert_eq!(keys(cfg, None, |p| p == Path::new("/data")), ["store.path"]);
        assert_eq!(keys(cfg, None, |_| false), ["store.path", "presence.database"]);
        assert!(keys(cfg, None, |_| true).is_empty());
        // The real test: a temp dir is writable, a missing directory is not.
        let dir = std::env::temp_dir();
        assert!(writable(&dir));
        assert!(!writable(Path::new("/nonexistent-comet-dir")));
        let cfg = format!("[store]\npath = \"{}/s.sqlite\"\n", dir.display());
        assert!(keys(&cfg, None, writable).is_empty());
        assert_eq!(keys("[store]\npath = \"/nonexistent-comet-dir/s.sqlite\"\n", None, writable), ["store.path"]);
    }
}
