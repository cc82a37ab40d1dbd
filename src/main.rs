//! The `comet` binary: reads the command line and the config, installs the signal handler, and
//! runs the loop. Errors end here as one line on stderr and a non-zero exit.

use comet::config::Config;
use comet::server::Server;
use std::path::PathBuf;
use std::process::ExitCode;

const HELP: &str = "\
comet: a COMET (server push) daemon

USAGE:
    comet [--config PATH] [--check]

OPTIONS:
    -c, --config PATH   the configuration file (default: ./server.toml)
        --check         validate the configuration and exit: 0 if valid, 2 with the key
                        and the problem if not. A valid file may still get warnings on
                        stderr, one line each naming the key (placeholder secrets left in,
                        limits.max_connections above the open-file limit, a store or
                        presence SQLite file this user cannot write): the exit stays 0
    -h, --help          this text
    -V, --version       the version

The daemon listens for browsers (long-poll HTTP), backends (Redis protocol) and the admin HTTP
endpoint on the addresses in the config, logs to stderr (level from [log] level or RUST_LOG),
and stops gracefully on SIGINT or SIGTERM.
";

fn main() -> ExitCode {
    let mut config = PathBuf::from("server.toml");
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" | "--config" => match args.next() {
                Some(p) => config = PathBuf::from(p),
                None => return usage("--config needs a PATH"),
            },
            "--check" => check = true,
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("comet {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => match other.strip_prefix("--config=") {
                Some(p) => config = PathBuf::from(p),
                None => return usage(&format!("unknown argument {other:?}")),
            },
        }
    }
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("comet: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let warnings = comet::check::warnings(&cfg, comet::check::nofile_limit(), comet::check::writable);
    if check {
        for w in &warnings {
            eprintln!("comet: warning: {}: {}", w.key, w.problem);
        }
        println!("comet: {} is valid", config.display());
        return ExitCode::SUCCESS;
    }
    comet::log::init(cfg.log_level);
    for w in &warnings {
        comet::warn!("{}: {}", w.key, w.problem);
    }
    fixed_mmap_threshold();
    let mut server = match Server::bind(cfg) {
        Ok(s) => s,
        Err(e) => {
            comet::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = server.handle();
    if let Err(e) = ctrlc::set_handler(move || handle.shutdown()) {
        comet::error!("cannot install the signal handler: {e}");
        return ExitCode::FAILURE;
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            comet::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Large blocks (the hash tables, slabs and queues that grow with the connections held, which
/// reallocate by doubling) are mapped on their own and given back to the kernel when freed.
/// glibc's default raises this threshold after the first such block is freed, so every table
/// outgrown afterwards would stay in the heap, unused, for the rest of the run.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator, which takes its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("comet: {msg}\n\n{HELP}");
    ExitCode::from(2)
}
