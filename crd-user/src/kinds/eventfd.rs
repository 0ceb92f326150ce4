//! eventfd: a 64-bit counter in the kernel (`struct eventfd_ctx`), shared like any
//! description (dup, fork, SCM_RIGHTS).
//!
//! - Recognised by its anon-inode name `[eventfd]`; its object is the `eventfd_ctx`
//!   (`file->private_data`), not the anon inode every anon file shares.
//! - BPF tail: `EventfdTail` (the counter and the creation flags, EFD_SEMAPHORE among
//!   them, on every kernel). /proc: fdinfo `eventfd-count` (hex) and, since 6.5,
//!   `eventfd-semaphore`. CRIU saves only the counter and loses EFD_SEMAPHORE; crd
//!   keeps it. EFD_NONBLOCK is the description's O_NONBLOCK, restored with its flags.
//! - Restore: `eventfd(0, EFD_CLOEXEC [| EFD_SEMAPHORE])`, then the counter is written
//!   (eventfd's initial value is only 32 bits; a write takes all 64). An eventfd cannot
//!   be reopened, so only one description per object can be made.
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::{FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Recognise};
use crate::sys::SyscallError;

pub struct Eventfd;

/// `EFD_SEMAPHORE` (include/uapi/linux/eventfd.h).
const EFD_SEMAPHORE: u32 = 1;

/// What a harvest reads of an eventfd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventfdLive {
    pub count: u64,
    /// None: this kernel's /proc does not say (before 6.5).
    pub semaphore: Option<bool>,
}

/// What an image holds of an eventfd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventfdState {
    pub count: u64,
    /// EFD_SEMAPHORE: each read takes 1 instead of the whole count.
    pub semaphore: bool,
}

impl FileKind for Eventfd {
    const NAME: &'static str = "eventfd";
    const IDENTITY: Identity = Identity::Private;
    type Live = EventfdLive;
    type Saved = EventfdState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC) && r.name == Some("[eventfd]")
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<EventfdLive> {
        let t: crd_common::EventfdTail = super::tail(tail)?;
        Some(EventfdLive { count: t.count, semaphore: Some(t.flags & EFD_SEMAPHORE != 0) })
    }

    fn from_proc(slot: &ProcSlot<'_>) -> EventfdLive {
        let count = slot.field("eventfd-count").and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
        let semaphore = slot.field("eventfd-semaphore").map(|v| v == "1");
        if semaphore.is_none() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                log::warn!(
                    "this kernel's /proc does not show EFD_SEMAPHORE (6.5+ does); eventfds are saved as non-semaphore: use --source bpf"
                )
            });
        }
        EventfdLive { count, semaphore }
    }

    fn sketch(live: &EventfdLive) -> EventfdState {
        EventfdState { count: live.count, semaphore: live.semaphore.unwrap_or(false) }
    }

    fn detail(saved: &EventfdState) -> Option<String> {
        Some(format!("count={}{}", saved.count, if saved.semaphore { " semaphore" } else { "" }))
    }

    fn open(
        saved: &EventfdState,
        args: &OpenArgs<'_>,
        _store: &mut ObjectStore,
    ) -> Result<Opened, KindError> {
        if !args.first {
            return Err(KindError::Other(
                "a second open file description of one eventfd cannot be made (an eventfd cannot be reopened)".into(),
            ));
        }
        let flags = libc::EFD_CLOEXEC | if saved.semaphore { libc::EFD_SEMAPHORE } else { 0 };
        // SAFETY: plain syscall with integer arguments.
        let raw = unsafe { libc::eventfd(0, flags) };
        if raw < 0 {
            return Err(SyscallError::last("eventfd").into());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if saved.count != 0 {
            // A fresh, blocking eventfd at 0 takes any count below u64::MAX at once.
            nix::unistd::write(fd.as_fd(), &saved.count.to_ne_bytes())
                .map_err(|e| KindError::errno("write(eventfd)", e))?;
        }
        Ok(Opened { fd, fresh: true })
    }

    fn same(a: &EventfdState, b: &EventfdState) -> Result<(), String> {
        if a != b {
            return Err(format!("eventfd {a:?} vs {b:?}"));
        }
        Ok(())
    }
}
