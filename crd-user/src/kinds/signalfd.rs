//! signalfd: a file that reads the signals pending for the *reading* thread among a
//! mask (`struct signalfd_ctx`).
//!
//! - Recognised by its anon-inode name `[signalfd]`; its object is the `signalfd_ctx`
//!   (`file->private_data`).
//! - The whole state is the mask: fdinfo `sigmask:` (hexadecimal, bit N-1 for signal N),
//!   which the kernel prints un-inverted: `signalfd_ctx.sigmask` itself is stored
//!   inverted. The /proc harvester reads fdinfo; the BPF harvester reads the stored mask
//!   ([`crd_common::SignalfdTail`]) and inverts it back, or reads fdinfo where this
//!   kernel's BTF lacks `signalfd_ctx`.
//!   SFD_NONBLOCK is the description's O_NONBLOCK, restored with its flags.
//! - The queued signals are not the fd's: they are pending on the process or its threads
//!   (a signalfd only reports them, and only those the reading thread blocks). crd saves
//!   no signal state, so signals pending at checkpoint are not restored, and the
//!   restored process's signal mask is not the original's: a stub blocks SIGUSR1 only
//!   (crd's commit signal), and with `--exec` the program starts with crd's own mask. A
//!   signal in the mask sent to a stub thus takes its default action unless it is
//!   SIGUSR1; the program run with `--exec` must block the signals it reads through the
//!   signalfd, as the original did.
//! - Restore: `signalfd(-1, mask, SFD_CLOEXEC)` (as the raw `signalfd4` with the kernel's
//!   64-bit mask: glibc's `sigaddset` refuses the two real-time signals it reserves). A
//!   signalfd cannot be reopened, so only one description per object can be made.
use std::os::fd::{FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::{FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Recognise};
use crate::sys::SyscallError;

pub struct Signalfd;

/// What an image holds of a signalfd (also what a harvest reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalfdState {
    /// Bit N-1: signal N.
    pub mask: u64,
}

/// The mask of a signalfd's fdinfo; None if it is not one.
pub fn parse_fdinfo(slot: &ProcSlot<'_>) -> Option<u64> {
    u64::from_str_radix(slot.field("sigmask")?, 16).ok()
}

/// The mask fdinfo shows from the one `signalfd_ctx` stores: the kernel keeps the
/// complement (`signotset` in signalfd4), so that SIGKILL and SIGSTOP, never readable,
/// are set there and clear here.
pub fn uninvert(stored: u64) -> u64 {
    !stored
}

/// The signals of `mask` by name (`SIGINT,SIGTERM`), numbers for those without one.
pub fn signal_names(mask: u64) -> String {
    (1..=64)
        .filter(|n| mask & (1u64 << (n - 1)) != 0)
        .map(|n| match nix::sys::signal::Signal::try_from(n) {
            Ok(signal) => signal.as_str().to_string(),
            Err(_) => n.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl FileKind for Signalfd {
    const NAME: &'static str = "signalfd";
    const IDENTITY: Identity = Identity::Private;
    type Live = SignalfdState;
    type Saved = SignalfdState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC) && r.name == Some("[signalfd]")
    }

    /// From the signalfd tail; without one, from the fd's fdinfo (see the module doc),
    /// None if gone since or unreadable (the fd is then listed as an opaque anon file).
    fn from_bpf(record: &crd_common::FdRecord, tail: &[u8]) -> Option<SignalfdState> {
        if record.tail == crd_common::TAIL_SIGNALFD {
            let tail: crd_common::SignalfdTail = super::tail(tail)?;
            return Some(SignalfdState { mask: uninvert(tail.sigmask_inverted) });
        }
        let fdinfo = super::timerfd::read_fdinfo(record.tgid, record.fd)?;
        let slot = ProcSlot {
            tgid: crate::types::Tgid(record.tgid),
            fd: crate::types::Fd(record.fd),
            fdinfo: &fdinfo,
            link: "anon_inode:[signalfd]",
            size: 0,
            rdev: crate::types::DeviceId { major: 0, minor: 0 },
            socket: None,
        };
        Some(SignalfdState { mask: parse_fdinfo(&slot)? })
    }

    fn from_proc(slot: &ProcSlot<'_>) -> SignalfdState {
        SignalfdState { mask: parse_fdinfo(slot).unwrap_or(0) }
    }

    fn sketch(live: &SignalfdState) -> SignalfdState {
        live.clone()
    }

    fn detail(saved: &SignalfdState) -> Option<String> {
        Some(match saved.mask {
            0 => "no signals".into(),
            mask => signal_names(mask),
        })
    }

    fn open(
        saved: &SignalfdState,
        args: &OpenArgs<'_>,
        _store: &mut ObjectStore,
    ) -> Result<Opened, KindError> {
        if !args.first {
            return Err(KindError::Other(
                "a second open file description of one signalfd cannot be made (a signalfd cannot be reopened)".into(),
            ));
        }
        let mask = saved.mask;
        // SAFETY: signalfd4 reads `sizeof mask` (8, the kernel's sigset_t) bytes from a
        // valid pointer; -1 asks for a new fd.
        let raw = unsafe {
            libc::syscall(libc::SYS_signalfd4, -1, &mask as *const u64, size_of::<u64>(), libc::SFD_CLOEXEC)
        };
        if raw < 0 {
            return Err(SyscallError::last("signalfd").into());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        Ok(Opened { fd, fresh: true })
    }

    fn same(a: &SignalfdState, b: &SignalfdState) -> Result<(), String> {
        if a != b {
            return Err(format!("signalfd mask {:#x} vs {:#x}", a.mask, b.mask));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_mask_is_read_as_is_and_named() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000000004002\n";
        let slot = ProcSlot {
            tgid: crate::types::Tgid(1),
            fd: crate::types::Fd(3),
            fdinfo: info,
            link: "anon_inode:[signalfd]",
            size: 0,
            rdev: crate::types::DeviceId { major: 0, minor: 0 },
            socket: None,
        };
        let mask = parse_fdinfo(&slot).unwrap();
        assert_eq!(mask, (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGTERM - 1)));
        assert_eq!(Signalfd::detail(&SignalfdState { mask }).as_deref(), Some("SIGINT,SIGTERM"));
        assert_eq!(signal_names(1 << 33), "34");
    }
}
