//! pidfd: a file that refers to a process (or, with PIDFD_THREAD, a thread).
//!
//! - Recognised by its filesystem: pidfs since Linux 6.9 (`/proc/PID/fd/N` still says
//!   `anon_inode:[pidfd]`), the anon inode named `[pidfd]` before. Its object is its
//!   description (`Identity::Private`): before 6.9 every pidfd shares the anon inode, and
//!   two pidfds to one process restore as two `pidfd_open`s either way.
//! - State: the PID it refers to, from fdinfo `Pid:` (BPF does not walk `struct pid`:
//!   the harvest reads the fd's fdinfo, [`FileKind::fdinfo_pending`]), and PIDFD_THREAD,
//!   which is O_EXCL in the description's flags (6.9+). PIDFD_NONBLOCK is the
//!   description's O_NONBLOCK, restored with its flags.
//! - The process is not an object of the graph but a task: the state keeps the old PID
//!   ([`FileKind::task`]); the graph marks the pidfd held outside when that task is not
//!   checkpointed, and an image restore refuses it naming the PID (a pidfd cannot be made
//!   "disconnected", and `--allow-external` does not change that). Inside the image,
//!   restore opens the pidfd on the stub standing for that task (`pidfd_open` of its new
//!   PID, [`super::Stubs`]), which is forked before crd makes any description.
//! - Not kept: a pidfd to a process that has exited (fdinfo `Pid: -1`) or lives in
//!   another PID namespace (`Pid: 0`) is refused; a pidfd to a thread other than a
//!   process's main thread is refused (a stub starts its threads only after its fds are
//!   in place).
use std::os::fd::{FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::{FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Recognise};
use crate::{sys::SyscallError, types::Pid};

pub struct Pidfd;

/// `PIDFD_THREAD` (include/uapi/linux/pidfd.h): O_EXCL.
const PIDFD_THREAD: u32 = libc::O_EXCL as u32;

/// What a harvest reads of a pidfd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PidfdLive {
    /// fdinfo `Pid:` (-1: exited; 0: not in this PID namespace); None: not read yet (a
    /// BPF harvest, until its fdinfo is read).
    pub pid: Option<i64>,
    pub thread: bool,
}

/// What an image holds of a pidfd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidfdState {
    /// The PID it referred to at checkpoint time (-1: exited; 0: in another PID
    /// namespace).
    pub pid: i64,
    /// PIDFD_THREAD: it refers to one thread, not to the whole process.
    pub thread: bool,
}

impl PidfdState {
    fn target(&self) -> Option<Pid> {
        u32::try_from(self.pid).ok().filter(|&p| p > 0).map(Pid)
    }
}

impl FileKind for Pidfd {
    const NAME: &'static str = "pidfd";
    const IDENTITY: Identity = Identity::Private;
    type Live = PidfdLive;
    type Saved = PidfdState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.fs_magic == Some(crd_common::PIDFS_MAGIC)
            || (r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC) && r.name == Some("[pidfd]"))
    }

    fn from_bpf(record: &crd_common::FdRecord, _tail: &[u8]) -> Option<PidfdLive> {
        Some(PidfdLive { pid: None, thread: record.f_flags & PIDFD_THREAD != 0 })
    }

    fn from_proc(slot: &ProcSlot<'_>) -> PidfdLive {
        let flags = slot.field("flags").and_then(|f| u32::from_str_radix(f, 8).ok()).unwrap_or(0);
        // An fdinfo without `Pid:` (before 5.10? never on a pidfd) reads as exited.
        let pid = slot.field("Pid").and_then(|p| p.parse().ok()).unwrap_or(-1);
        PidfdLive { pid: Some(pid), thread: flags & PIDFD_THREAD != 0 }
    }

    fn fdinfo_pending(live: &PidfdLive) -> bool {
        live.pid.is_none()
    }

    fn sketch(live: &PidfdLive) -> PidfdState {
        PidfdState { pid: live.pid.unwrap_or(-1), thread: live.thread }
    }

    fn detail(saved: &PidfdState) -> Option<String> {
        let thread = if saved.thread { " thread" } else { "" };
        Some(match saved.pid {
            -1 => format!("exited{thread}"),
            0 => format!("pid=? (another PID namespace){thread}"),
            pid => format!("pid={pid}{thread}"),
        })
    }

    fn task(saved: &PidfdState) -> Option<Pid> {
        saved.target()
    }

    fn refusal(saved: &PidfdState) -> Option<String> {
        match saved.pid {
            -1 => Some("its process had exited; crd does not recreate a pidfd to a dead process".into()),
            0 => Some("its process is in another PID namespace; crd cannot tell which it is".into()),
            _ => None,
        }
    }

    fn open(saved: &PidfdState, args: &OpenArgs<'_>, _store: &mut ObjectStore) -> Result<Opened, KindError> {
        if let Some(why) = Self::refusal(saved) {
            return Err(KindError::Other(why));
        }
        let old = saved.target().ok_or_else(|| KindError::Other(format!("bad PID {}", saved.pid)))?;
        let new = args.stubs.new_pid(old)?;
        let flags = if saved.thread { PIDFD_THREAD } else { 0 };
        // SAFETY: plain syscall with integer arguments.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, new.0 as libc::pid_t, flags) };
        if raw < 0 {
            return Err(SyscallError::last("pidfd_open").into());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        Ok(Opened { fd, fresh: true })
    }

    /// The PIDs differ after a restore (the pidfd refers to the stub): compared are the
    /// flag and whether it referred to a live process.
    fn same(a: &PidfdState, b: &PidfdState) -> Result<(), String> {
        if (a.thread, a.pid > 0) != (b.thread, b.pid > 0) {
            return Err(format!("pidfd {a:?} vs {b:?}"));
        }
        Ok(())
    }
}
