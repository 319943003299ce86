//! `server.json` in the data dir: where the `serve --http` that holds the ledger's write lock
//! listens, so that a CLI write finding the ledger locked can send itself there instead.
//! Written atomically (a temp file renamed over it), owner-only (0600: it says where an
//! authenticated endpoint is), removed on a clean shutdown. A file left by a killed server is
//! ignored: its pid is gone, or nothing answers at its URL (the client then runs locally).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// The file's name in the data dir.
pub(in crate::cli) const FILE_NAME: &str = "server.json";

/// What `server.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(in crate::cli) struct ServerFile {
    /// The MCP endpoint, `http://HOST:PORT/mcp` (a wildcard bind is reached on loopback).
    pub(in crate::cli) url: String,
    /// The server's process id.
    pub(in crate::cli) pid: u32,
    /// Whether the server requires a bearer token (the token itself is never written here).
    pub(in crate::cli) token_required: bool,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The URL a client on this machine uses for a server bound to `bound`.
pub(in crate::cli) fn url_for(bound: SocketAddr) -> String {
    let ip = match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/mcp", SocketAddr::new(ip, bound.port()))
}

/// Records this process as the server of `dir`, listening on `bound`.
pub(in crate::cli) fn write(dir: &Path, bound: SocketAddr, token_required: bool) -> std::io::Result<()> {
    let record = ServerFile { url: url_for(bound), pid: std::process::id(), token_required };
    let text = serde_json::to_string_pretty(&record).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", record.pid));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path(dir))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Removes `dir`'s `server.json` if this process wrote it (a newer server's is left alone).
pub(in crate::cli) fn remove_own(dir: &Path) {
    if read(dir).is_some_and(|f| f.pid == std::process::id()) {
        let _ = std::fs::remove_file(path(dir));
    }
}

/// The file as written, if there is one that parses.
pub(in crate::cli) fn read(dir: &Path) -> Option<ServerFile> {
    let text = std::fs::read_to_string(path(dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The server recorded in `dir`, if its process is still running (not this one).
pub(in crate::cli) fn live(dir: &Path) -> Option<ServerFile> {
    read(dir).filter(|f| f.pid != std::process::id() && pid_alive(f.pid))
}

/// Whether a process with this id exists (signal 0 checks without sending anything; EPERM
/// means it exists under another user).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 performs only the existence and permission checks.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !zombie(pid)
}

/// A killed process that its parent has not reaped yet still answers signal 0.
fn zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_owner_only_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "0.0.0.0:8765".parse().unwrap(), true).unwrap();
        let f = read(dir.path()).unwrap();
        assert_eq!(f.url, "http://127.0.0.1:8765/mcp");
        assert!(f.token_required);
        assert_eq!(live(dir.path()), None, "this process's own file is not a server to talk to");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        remove_own(dir.path());
        assert!(read(dir.path()).is_none());
    }

    #[test]
    fn a_dead_pid_is_not_live() {
        let dir = tempfile::tempdir().unwrap();
        let stale = ServerFile { url: "http://127.0.0.1:1/mcp".into(), pid: i32::MAX as u32, token_required: false };
        std::fs::write(dir.path().join(FILE_NAME), serde_json::to_string(&stale).unwrap()).unwrap();
        assert_eq!(read(dir.path()), Some(stale));
        assert_eq!(live(dir.path()), None);
        assert_eq!(url_for("[::]:9".parse().unwrap()), "http://[::1]:9/mcp");
    }
}
