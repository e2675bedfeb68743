//! `fanpipe sign`: the two URLs of one signed pipe, the sender's and the receivers', for
//! a trusted job to hand to the others. Also the loading of a secret file, shared with
//! the server.

use std::fmt::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use fanpipe_core::request::{Role, API_PREFIX};
use fanpipe_core::signed::{sign, Keys};

/// Reads and checks a secret file; the error is one line that names the file.
pub fn load_keys(path: &Path) -> Result<Keys, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--secret-file {shown}: cannot read it: {e}"))?;
    let keys = Keys::parse(&text).map_err(|e| format!("--secret-file {shown}: {e}"))?;
    warn_if_readable_by_others(path);
    Ok(keys)
}

/// A secret others on the host can read is no secret: say so (but go on).
#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "fanpipe: warning: --secret-file {} can be read by other users (chmod 600 it)",
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// A name nobody can guess: 128 bits from the OS's random source, in hex.
pub fn random_name() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no random bytes from the OS: {e}"))?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// `name` for a URL path: unreserved bytes and `/` as they are, the rest percent-encoded,
/// so the server decodes it back to the very name that was signed.
fn encode_path(name: &str) -> String {
    name.bytes().fold(String::new(), |mut s, b| {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
        s
    })
}

/// The sender's URL and the receivers' URL of pipe `name` on the server at `base`,
/// valid until `exp` (unix seconds).
pub fn urls(keys: &Keys, base: &str, name: &str, n: usize, exp: u64) -> (String, String) {
    let base = base.trim_end_matches('/');
    let path = format!("{base}{API_PREFIX}{}", encode_path(name));
    let key = keys.signing();
    let url = |role| format!("{path}?n={n}&{}", sign(key, role, name, n, exp));
    (url(Role::Sender), url(Role::Receiver))
}

/// Prints the two URLs, one per line, and nothing else on stdout.
pub fn run(
    secret_file: &Path,
    base: &str,
    n: usize,
    ttl: u64,
    name: Option<String>,
) -> Result<(), String> {
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(format!(
            "--url {base:?}: give the server's base URL, such as https://pipe.example"
        ));
    }
    let keys = load_keys(secret_file)?;
    let name = match name {
        Some(name) => name.trim_start_matches('/').to_owned(),
        None => random_name()?,
    };
    if name.is_empty() {
        return Err("the pipe name is empty".into());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the clock is before 1970".to_owned())?
        .as_secs();
    let (send, recv) = urls(&keys, base, &name, n, now.saturating_add(ttl));
    println!("{send}\n{recv}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_urls_differ_only_in_their_signature_and_encode_the_name() {
        let keys =
            Keys::parse("k1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n")
                .unwrap();
        let (send, recv) = urls(&keys, "https://p.example/", "ci/a b", 3, 1700000000);
        let prefix = "https://p.example/api/v1/pipe/ci/a%20b?n=3&exp=1700000000&kid=k1&sig=";
        assert!(send.starts_with(prefix), "{send}");
        assert!(recv.starts_with(prefix), "{recv}");
        assert_ne!(send, recv);
        let a = random_name().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_name().unwrap());
    }
}
