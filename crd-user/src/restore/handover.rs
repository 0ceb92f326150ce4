//! The hand-over of descriptions from crd to its stubs, through memory they share.
//!
//! Stubs are forked *before* crd makes (or, for a graft, takes) the descriptions: a fork
//! copies the parent's fd table and the child must then close every copy again, so a
//! fork from a crd holding 18,000 descriptions costs 36,000 reference-count updates per
//! stub for nothing. Instead crd maps one shared page area before the first fork; once
//! the descriptions exist it writes, per objref, the fd number that holds it in crd,
//! raises a flag and wakes the stubs (a futex on the flag), which then pull each
//! description with `pidfd_getfd`.
use std::{
    ffi::c_void,
    num::NonZeroUsize,
    os::fd::RawFd,
    ptr::NonNull,
    sync::atomic::{AtomicI32, AtomicU32, Ordering},
    time::Duration,
};

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

use crate::{sys::SyscallError, types::ObjRef};

/// The flag's values.
const WAITING: u32 = 0;
const READY: u32 = 1;

/// crd's side owns the mapping; a stub, forked from crd, uses its copy of the same
/// shared pages and never unmaps them (it execs or exits).
pub(super) struct Handover {
    base: NonNull<c_void>,
    len: usize,
    /// Objrefs 0..slots have a slot.
    slots: usize,
}

impl Handover {
    /// Room for descriptions numbered up to `max_objref`.
    pub fn new(max_objref: ObjRef) -> Result<Self, SyscallError> {
        let slots = max_objref.0 as usize + 1;
        let len = size_of::<AtomicU32>() + slots * size_of::<AtomicI32>();
        let length = NonZeroUsize::new(len).unwrap_or(NonZeroUsize::MIN);
        // SAFETY: a fresh anonymous mapping aliases nothing; it starts zeroed (WAITING,
        // and fd 0 in every slot until `publish`).
        let base = unsafe {
            mmap_anonymous(None, length, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED)
        }
        .map_err(|e| SyscallError { call: "mmap", source: e.into() })?;
        Ok(Self { base, len, slots })
    }

    fn flag(&self) -> &AtomicU32 {
        // SAFETY: the mapping is at least 4 bytes, page-aligned, zero-initialised and
        // lives as long as `self`; it is only ever accessed atomically.
        unsafe { self.base.cast::<AtomicU32>().as_ref() }
    }

    fn slot(&self, objref: ObjRef) -> Option<&AtomicI32> {
        let index = objref.0 as usize;
        if index >= self.slots {
            return None;
        }
        // SAFETY: slot `index` lies inside the mapping (checked above), 4-aligned after
        // the 4-byte flag, and is only ever accessed atomically.
        Some(unsafe { &*self.base.as_ptr().cast::<AtomicU32>().add(1).cast::<AtomicI32>().add(index) })
    }

    /// crd: the descriptions exist; tell every stub where.
    pub fn publish(&self, fds: impl IntoIterator<Item = (ObjRef, RawFd)>) {
        for (objref, fd) in fds {
            if let Some(slot) = self.slot(objref) {
                slot.store(fd, Ordering::Relaxed);
            }
        }
        self.flag().store(READY, Ordering::Release);
        futex(self.flag(), libc::FUTEX_WAKE, i32::MAX as u32, None);
    }

    /// A stub: waits until crd has published. crd dying meanwhile kills the stub
    /// (PR_SET_PDEATHSIG), so this needs no way out.
    pub fn wait(&self) {
        while self.flag().load(Ordering::Acquire) != READY {
            futex(self.flag(), libc::FUTEX_WAIT, WAITING, Some(Duration::from_millis(100)));
        }
    }

    /// A stub, after `wait`: the fd number of `objref`'s description in crd.
    pub fn fd_of(&self, objref: ObjRef) -> Option<RawFd> {
        self.slot(objref).map(|slot| slot.load(Ordering::Relaxed))
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and nothing borrows
        // it past `self`.
        let _ = unsafe { munmap(self.base, self.len) };
    }
}

/// futex(2) on a word of the shared mapping (not FUTEX_PRIVATE: the waiters are other
/// processes). Errors (EAGAIN: the word already changed; ETIMEDOUT; EINTR) only mean
/// "look again", which every caller does.
fn futex(word: &AtomicU32, op: i32, value: u32, timeout: Option<Duration>) {
    let timespec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let timeout_ptr = timespec.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 in memory that outlives the call; the
    // timeout pointer is null or points at a live timespec.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), op, value, timeout_ptr, std::ptr::null::<u32>(), 0)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forked_child_waits_for_the_published_fds() {
        let handover = Handover::new(ObjRef(40)).expect("mapping");
        // SAFETY: the test process forks a child that only touches the shared mapping
        // and exits with _exit.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                handover.wait();
                let code =
                    match (handover.fd_of(ObjRef(7)), handover.fd_of(ObjRef(40)), handover.fd_of(ObjRef(41)))
                    {
                        (Some(12), Some(99), None) => 0,
                        _ => 1,
                    };
                // SAFETY: ends the forked test child without running the harness.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                std::thread::sleep(Duration::from_millis(50));
                handover.publish([(ObjRef(7), 12), (ObjRef(40), 99)]);
                let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
