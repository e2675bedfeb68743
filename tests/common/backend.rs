//! Which backend a conformance test runs against. Every test of the suite is written once
//! and [`conformance!`] instantiates it per backend as `tokio::NAME`, `smol::NAME` and
//! `glommio::NAME`, so a failure names its backend.
//!
//! The tokio build is the `fanpipe` binary cargo built for this package (or `FANPIPE_BIN`).
//! The others are built on first use by `cargo build --no-default-features --features B`
//! into `target/backends/B`, in the profile of this test. `FANPIPE_BACKENDS=tokio,smol`
//! limits a run to some backends. A backend that cannot run on this machine (glommio
//! without io_uring) is skipped with the reason its binary gives, printed to stderr.

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Tokio,
    Smol,
    Glommio,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tokio => "tokio",
            Backend::Smol => "smol",
            Backend::Glommio => "glommio",
        }
    }

    /// The server binary of this backend, built if need be.
    pub fn binary(self) -> PathBuf {
        static BUILT: [OnceLock<Result<PathBuf, String>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let built = BUILT[self as usize].get_or_init(|| match self {
            Backend::Tokio => Ok(std::env::var_os("FANPIPE_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fanpipe")))),
            _ => build(self),
        });
        match built {
            Ok(path) => path.clone(),
            Err(e) => panic!("{e}"),
        }
    }

    /// Why this backend cannot run here, if it cannot: its binary's own words.
    fn unavailable(self) -> Option<&'static str> {
        static PROBED: [OnceLock<Option<String>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        PROBED[self as usize].get_or_init(|| probe(self)).as_deref()
    }
}

thread_local! {
    static CURRENT: Cell<Backend> = const { Cell::new(Backend::Tokio) };
}

/// The backend of the test running on this thread.
pub fn current() -> Backend {
    CURRENT.with(Cell::get)
}

/// Runs `test` against `backend`, or says on stderr why it is skipped.
pub fn run_on(backend: Backend, test: fn()) {
    if let Ok(list) = std::env::var("FANPIPE_BACKENDS") {
        if !list.split(',').any(|b| b.trim() == backend.name()) {
            skip(backend, "not in FANPIPE_BACKENDS");
            return;
        }
    }
    if let Some(why) = backend.unavailable() {
        skip(backend, why);
        return;
    }
    CURRENT.with(|c| c.set(backend));
    test();
}

/// Says why a test did not run; straight to stderr, past the harness's capture, so a
/// skipped test is never mistaken for a passed one.
fn skip(backend: Backend, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED on {}: {why}", backend.name());
}

fn build(backend: Backend) -> Result<PathBuf, String> {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let target = PathBuf::from(manifest)
        .join("target/backends")
        .join(backend.name());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(manifest)
        .args([
            "build",
            "--quiet",
            "--bin",
            "fanpipe",
            "--no-default-features",
        ])
        .args(["--features", backend.name()])
        .arg("--target-dir")
        .arg(&target);
    if profile == "release" {
        cmd.arg("--release");
    }
    let out = cmd.output().map_err(|e| {
        format!(
            "cannot run cargo to build the {} backend: {e}",
            backend.name()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "building the {} backend failed:\n{}",
            backend.name(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target.join(profile).join("fanpipe"))
}

/// Starts `bin` on a free port of 127.0.0.1 with `extra` flags, its stderr piped.
pub fn spawn_server(bin: &Path, extra: &[&str]) -> Child {
    Command::new(bin)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

/// Starts the backend's binary once: `None` if it listens, else the line it exited with.
fn probe(backend: Backend) -> Option<String> {
    let bin = backend.binary();
    let mut child = spawn_server(&bin, &["--threads", "1"]);
    let stderr = child.stderr.take().expect("probe stderr");
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut first = String::new();
        let _ = std::io::BufReader::new(stderr).read_line(&mut first);
        first
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if !status.success() => {
                let line = lines.join().unwrap_or_default();
                return Some(format!("{} ({status})", line.trim()));
            }
            Ok(Some(_)) => panic!("{} exited 0 at start-up", bin.display()),
            Ok(None) if lines.is_finished() || Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let line = lines.join().unwrap_or_default();
                assert!(
                    line.contains("listening on"),
                    "{} did not start: {line}",
                    bin.display()
                );
                return None;
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Instantiates each named test (a plain `fn()`) once per backend.
#[macro_export]
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod tokio {
            $( #[test] fn $test() { $crate::common::run_on($crate::common::Backend::Tokio, super::$test) } )*
        }
        mod smol {
            $( #[test] fn $test() { $crate::common::run_on($crate::common::Backend::Smol, super::$test) } )*
        }
        mod glommio {
            $( #[test] fn $test() { $crate::common::run_on($crate::common::Backend::Glommio, super::$test) } )*
        }
    };
}
