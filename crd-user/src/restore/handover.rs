//! The hand-over of descriptions from crd to its stubs, through memory they share.
//!
//! Stubs are forked *before* crd makes (or, for a graft, takes) the descriptions: a fork
//! copies the parent's fd table and the child must then close every copy again, so a
//! fork from a crd holding 18,000 descriptions costs 36,000 reference-count updates per
//! stub for nothing. Instead crd maps a shared area before the first fork and, as it
//! makes each description, writes the fd number holding it into the description's slot
//! (by objref). The stubs pull each description with `pidfd_getfd` as soon as its slot
//! is filled, so on two CPUs crd's making and the stubs' pulling overlap. Waiting stubs
//! sleep on a futex: crd bumps a generation word and wakes them once per batch of
//! descriptions, and once more when it is done.
//!
//! After the objref slots come one word per stub, where each stub writes its PID as it
//! starts (and wakes whoever waits on that word): crd opens a pidfd on a stub
//! ([`crate::kinds::Stubs`]) while it makes the descriptions. Then one word per stub
//! that it sets once its process group is in place ([`super::plan::Group`]): the stubs
//! joining that group wait on it.
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

/// A slot not filled yet.
const EMPTY: i32 = -1;
/// Descriptions published between two wake-ups.
const BATCH: u32 = 128;

/// The shared area: a header, then one slot per objref, then one PID word per stub.
#[repr(C)]
struct Header {
    /// Bumped (and waited on) once per batch.
    generation: AtomicU32,
    /// Non-zero once crd has published everything it will.
    done: AtomicU32,
}

/// crd's side owns the mapping; a stub, forked from crd, uses its copy of the same
/// shared pages and never unmaps them (it execs or exits).
pub(super) struct Handover {
    base: NonNull<c_void>,
    len: usize,
    /// Objrefs 0..slots have a slot.
    slots: usize,
    /// Stubs 0..stubs have a PID word.
    stubs: usize,
    /// crd's count of descriptions published since the last wake-up.
    unannounced: std::cell::Cell<u32>,
}

impl Handover {
    /// Room for descriptions numbered up to `max_objref`, and `stubs` stubs' PIDs.
    pub fn new(max_objref: ObjRef, stubs: usize) -> Result<Self, SyscallError> {
        let slots = max_objref.0 as usize + 1;
        let len = size_of::<Header>() + slots * size_of::<AtomicI32>() + 2 * stubs * size_of::<AtomicU32>();
        let length = NonZeroUsize::new(len).unwrap_or(NonZeroUsize::MIN);
        // SAFETY: a fresh anonymous mapping aliases nothing; it starts zeroed, which is
        // a valid header (generation 0, not done) and PID words saying "not started".
        let base = unsafe {
            mmap_anonymous(None, length, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED)
        }
        .map_err(|e| SyscallError { call: "mmap", source: e.into() })?;
        let handover = Self { base, len, slots, stubs, unannounced: std::cell::Cell::new(0) };
        for index in 0..slots {
            if let Some(slot) = handover.slot(ObjRef(index as u32)) {
                slot.store(EMPTY, Ordering::Relaxed);
            }
        }
        Ok(handover)
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping holds a Header at its (page-aligned) start, zero-initialised
        // (valid atomics) and alive as long as `self`; it is only accessed atomically.
        unsafe { self.base.cast::<Header>().as_ref() }
    }

    fn slot(&self, objref: ObjRef) -> Option<&AtomicI32> {
        let index = objref.0 as usize;
        if index >= self.slots {
            return None;
        }
        // SAFETY: slot `index` lies inside the mapping (checked above), 4-aligned after
        // the 8-byte header, and is only ever accessed atomically.
        Some(unsafe { &*self.base.as_ptr().cast::<Header>().add(1).cast::<AtomicI32>().add(index) })
    }

    fn pid_word(&self, index: usize) -> Option<&AtomicU32> {
        if index >= self.stubs {
            return None;
        }
        self.stub_word(index)
    }

    /// Stub `index`'s "my process group is in place" word, after the PID words.
    fn group_word(&self, index: usize) -> Option<&AtomicU32> {
        if index >= self.stubs {
            return None;
        }
        self.stub_word(self.stubs + index)
    }

    /// Word `word` of the per-stub words (the PID words, then the group words), which
    /// follow the header and the objref slots.
    fn stub_word(&self, word: usize) -> Option<&AtomicU32> {
        if word >= 2 * self.stubs {
            return None;
        }
        // SAFETY: the mapping holds the header, `slots` objref slots (4-aligned) and
        // `2 * stubs` words after them; `word` is below `2 * stubs` (checked above). The
        // words are only ever accessed atomically.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .cast::<Header>()
                .add(1)
                .cast::<AtomicI32>()
                .add(self.slots)
                .cast::<AtomicU32>()
                .add(word)
        })
    }

    /// A stub: stub `index`'s process group is in place; others may join it.
    pub fn grouped(&self, index: usize) {
        if let Some(word) = self.group_word(index) {
            word.store(1, Ordering::Release);
            futex(word, libc::FUTEX_WAKE, i32::MAX as u32, None);
        }
    }

    /// A stub: waits up to `timeout` for stub `index`'s process group; false if it did
    /// not come.
    pub fn wait_grouped(&self, index: usize, timeout: Duration) -> bool {
        let Some(word) = self.group_word(index) else { return false };
        let deadline = std::time::Instant::now() + timeout;
        while word.load(Ordering::Acquire) == 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            futex(word, libc::FUTEX_WAIT, 0, Some(Duration::from_millis(50)));
        }
        true
    }

    /// A stub: stub `index` has started as `pid`.
    pub fn born(&self, index: usize, pid: u32) {
        if let Some(word) = self.pid_word(index) {
            word.store(pid, Ordering::Release);
            futex(word, libc::FUTEX_WAKE, i32::MAX as u32, None);
        }
    }

    /// crd: the PID of stub `index`, waiting up to `timeout` for it to start.
    pub fn pid_of(&self, index: usize, timeout: Duration) -> Option<crate::types::Pid> {
        let word = self.pid_word(index)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match word.load(Ordering::Acquire) {
                0 if std::time::Instant::now() < deadline => {
                    futex(word, libc::FUTEX_WAIT, 0, Some(Duration::from_millis(50)))
                }
                0 => return None,
                pid => return Some(crate::types::Pid(pid)),
            }
        }
    }

    /// crd: `objref`'s description now exists, at `fd` in crd.
    pub fn publish(&self, objref: ObjRef, fd: RawFd) {
        if let Some(slot) = self.slot(objref) {
            slot.store(fd, Ordering::Release);
        }
        let unannounced = self.unannounced.get() + 1;
        self.unannounced.set(unannounced);
        if unannounced >= BATCH {
            self.wake();
        }
    }

    /// crd: everything is published; a slot still empty will stay so.
    pub fn finish(&self) {
        self.header().done.store(1, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        self.unannounced.set(0);
        self.header().generation.fetch_add(1, Ordering::Release);
        futex(&self.header().generation, libc::FUTEX_WAKE, i32::MAX as u32, None);
    }

    /// A stub: the fd number in crd of `objref`'s description, once crd has made it;
    /// None if crd finished without it. crd dying meanwhile kills the stub
    /// (PR_SET_PDEATHSIG), so this needs no other way out.
    pub fn fd_of(&self, objref: ObjRef) -> Option<RawFd> {
        let slot = self.slot(objref)?;
        loop {
            // Read the generation first: a publish after this read bumps it (within a
            // batch), so the futex wait below cannot sleep through it.
            let generation = self.header().generation.load(Ordering::Acquire);
            let fd = slot.load(Ordering::Acquire);
            if fd != EMPTY {
                return Some(fd);
            }
            if self.header().done.load(Ordering::Acquire) != 0 {
                return None;
            }
            futex(&self.header().generation, libc::FUTEX_WAIT, generation, Some(Duration::from_millis(50)));
        }
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
    let timespec = timeout.map(nix::sys::time::TimeSpec::from_duration);
    let timeout_ptr = timespec.as_ref().map_or(std::ptr::null(), |t| t.as_ref() as *const libc::timespec);
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
    fn a_forked_child_gets_each_fd_once_published_and_none_for_a_missing_one() {
        let handover = Handover::new(ObjRef(40), 2).expect("mapping");
        // SAFETY: the test process forks a child that only touches the shared mapping
        // and exits with _exit.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let got = (handover.fd_of(ObjRef(7)), handover.fd_of(ObjRef(40)), handover.fd_of(ObjRef(3)));
                let code = if got == (Some(12), Some(99), None) { 0 } else { 1 };
                // SAFETY: ends the forked test child without running the harness.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                std::thread::sleep(Duration::from_millis(30));
                // Fewer than a batch: the child only learns of them from `finish`.
                handover.publish(ObjRef(7), 12);
                std::thread::sleep(Duration::from_millis(30));
                handover.publish(ObjRef(40), 99);
                handover.finish();
                let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
