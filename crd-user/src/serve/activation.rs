//! The listening socket: handed over by systemd (socket activation: `LISTEN_PID`,
//! `LISTEN_FDS`, the socket at fd 3), or made by the service at `--socket`, 0600, or
//! 0660 with `--group`, and removed when the service stops.
use std::{
    ffi::CString,
    fs,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt, net::UnixListener},
    },
    path::{Path, PathBuf},
};

/// The first fd systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("a crd service already listens at {0}")]
    InUse(String),
    #[error("cannot listen at {path}")]
    Bind { path: String, source: std::io::Error },
    #[error("no group named {0}")]
    NoGroup(String),
    #[error("cannot give {path} to group {group}")]
    Chown { path: String, group: String, source: std::io::Error },
    #[error("LISTEN_FDS={0}: expected one socket from systemd")]
    Fds(String),
    #[error("fd 3 from systemd is not a listening unix socket")]
    NotASocket(#[source] std::io::Error),
}

/// The service's listening socket, and the file to remove when it stops.
pub struct Listening {
    pub listener: UnixListener,
    /// The socket file the service made (None: systemd's, which systemd removes), with
    /// its inode, so a newer service's socket at the same path is left alone.
    made: Option<(PathBuf, u64)>,
}

impl Listening {
    /// systemd's socket, if this process was socket-activated; else a new one at `path`.
    pub fn open(path: &Path, group: Option<&str>) -> Result<Self, SocketError> {
        match from_systemd()? {
            Some(listener) => Ok(Listening { listener, made: None }),
            None => bind(path, group),
        }
    }

    /// Where the socket is, for the log.
    pub fn describe(&self) -> String {
        match &self.made {
            Some((path, _)) => path.display().to_string(),
            None => "the socket systemd passed (fd 3)".into(),
        }
    }

    /// Removes the socket file the service made, if it is still the one it made.
    pub fn remove(&self) {
        if let Some((path, ino)) = &self.made
            && fs::symlink_metadata(path).is_ok_and(|m| m.ino() == *ino)
        {
            let _ = fs::remove_file(path);
        }
    }
}

/// The socket systemd passed, if `LISTEN_PID` names this process.
fn from_systemd() -> Result<Option<UnixListener>, SocketError> {
    let ours =
        std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    if !ours {
        return Ok(None);
    }
    let fds = std::env::var("LISTEN_FDS").unwrap_or_default();
    if fds.trim() != "1" {
        return Err(SocketError::Fds(fds));
    }
    // SAFETY: systemd passed fd 3 to this process (LISTEN_PID is ours, LISTEN_FDS=1) and
    // nothing else in it takes fd 3: this is its one owner.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let accepting = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|e| SocketError::NotASocket(e.into()))?;
    if !accepting {
        return Err(SocketError::NotASocket(std::io::Error::other("not listening")));
    }
    // Not for the restore and graft subprocesses.
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| SocketError::NotASocket(e.into()))?;
    Ok(Some(UnixListener::from(fd)))
}

fn bind(path: &Path, group: Option<&str>) -> Result<Listening, SocketError> {
    let name = path.display().to_string();
    let bind_err = |source| SocketError::Bind { path: name.clone(), source };
    let gid = group
        .map(|g| {
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|g| g.gid)
                .ok_or_else(|| SocketError::NoGroup(g.to_string()))
        })
        .transpose()?;
    // A socket file left by a service that died: nobody answers on it.
    if fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(name));
        }
        fs::remove_file(path).map_err(bind_err)?;
    }
    // Born 0600: no moment when another user could connect. umask is the process's,
    // but nothing else creates files while the service starts.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(bind_err)?;
    let ino = fs::symlink_metadata(path).map_err(bind_err)?.ino();
    let listening = Listening { listener, made: Some((path.to_path_buf(), ino)) };
    if let Some(gid) = gid {
        let chown_err = |source| SocketError::Chown {
            path: name.clone(),
            group: group.unwrap_or_default().into(),
            source,
        };
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| chown_err(std::io::Error::other("NUL in path")))?;
        // SAFETY: `c_path` is a valid C string; chown changes only the file's group.
        if unsafe { libc::chown(c_path.as_ptr(), u32::MAX, gid.as_raw()) } != 0 {
            listening.remove();
            return Err(chown_err(std::io::Error::last_os_error()));
        }
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660)).map_err(|e| {
            listening.remove();
            chown_err(e)
        })?;
    }
    Ok(listening)
}
