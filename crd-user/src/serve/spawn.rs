//! Restore and graft run as a `crd` of the client's own: this binary, started with the
//! client's credentials (uid, gid, groups), in the client's directory.
//!
//! Both make processes: stubs that hold the fds and, with `--exec`, the client's program.
//! Those must be the client's, not root's (a user's `--exec` must not run as root), and
//! they must not be children of the long-lived service (nobody would reap them). Forking
//! them from the service itself would also fork a many-threaded process, after which
//! only async-signal-safe code may run until exec. A subprocess gives each of these for
//! free, and does exactly what the client's own `crd` would: the kernel checks its
//! ptrace and file access as the client. (So a graft through the service loads the
//! BPF programs as a client's crd would: an unprivileged client's reads /proc.)
//!
//! Cancelling (the client gone, a deadline, SIGTERM) sends the subprocess SIGINT, as
//! Ctrl-C would: it resumes its targets and kills unfinished stubs, and the service
//! waits for it.
use std::{
    ffi::{CString, OsString},
    os::unix::{
        ffi::OsStrExt,
        process::{CommandExt, ExitStatusExt},
    },
    path::PathBuf,
    process::Stdio,
};

use super::{access::Peer, cancel::Cancel};

/// What the subprocess said and how it ended.
pub struct Ran {
    pub exit: u8,
    pub stdout: String,
    pub stderr: String,
}

/// Why the subprocess could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start crd as the client: {0}")]
    Start(#[source] std::io::Error),
    #[error("the client's directory {0} is not a usable path")]
    BadCwd(String),
}

/// Runs `crd ARGS` as `peer`, in `cwd`, until it ends or `cancel` is raised.
pub async fn run_as(
    peer: &Peer,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    cancel: &Cancel,
) -> Result<Ran, SpawnError> {
    let cwd = cwd
        .map(|dir| {
            CString::new(dir.as_os_str().as_bytes())
                .map_err(|_| SpawnError::BadCwd(dir.display().to_string()))
        })
        .transpose()?;
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .args(args)
        .env_remove("CRD_SERVICE")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let me = nix::unistd::geteuid().as_raw();
    let switch = (me == 0 && peer.uid != 0).then(|| (peer.uid, peer.gid, peer.groups.clone()));
    // SAFETY: the closure runs in the forked child before exec and makes only raw system
    // calls (setgroups, setresgid, setresuid: not glibc's wrappers, which would signal
    // threads this child does not have; and chdir) on data prepared before the fork; it
    // allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if let Some((uid, gid, groups)) = &switch
                && (libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                    || libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) != 0
                    || libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // As the client: a directory it cannot enter is refused to it.
            if let Some(dir) = &cwd
                && libc::chdir(dir.as_ptr()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(SpawnError::Start)?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Waited for on tokio's blocking pool (see Cargo.toml for why not tokio's process).
    // Until it is reaped there, the PID stays the child's: SIGINT cannot reach another.
    let mut waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = tokio::select! {
        output = &mut waited => output,
        () = cancel.raised() => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            waited.await
        }
    };
    let output =
        output.map_err(|e| SpawnError::Start(std::io::Error::other(e)))?.map_err(SpawnError::Start)?;
    let (status, stdout, stderr) = (output.status, output.stdout, output.stderr);
    let exit = match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 1,
    };
    Ok(Ran {
        exit,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}
