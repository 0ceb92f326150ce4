//! `crd_task_walk` (`iter/task`): the fd program for kernels with `bpf_loop` from 6.2 on.
//! Each fd table is walked in one program run, from the task iterator, with `bpf_loop`
//! over `fdt->fd[]`, instead of the task_file iterator's program run per fd, which
//! also takes and drops a reference on each file and goes through the seq_file
//! machinery for it: that walk alone costs ~100 ns per fd, this one ~15 (see
//! docs/performance.md). The records are [`crate::fd_record`]'s, the same as
//! `crd_task_file`'s; userspace cannot tell which program sent them.
//!
//! The price: a file pointer copied out of the fd array is a plain number to the
//! verifier, so the file's, inode's, superblock's and pipe's fields are copied with
//! `bpf_probe_read_kernel` instead of loaded directly; each struct's span of interest
//! is copied with one call ([`crate::Windows`]), into a slot of `crd_windows`.
//!
//! **Which tables.** The task iterator visits every thread; a thread's table is walked
//! unless it shares its group leader's (the rule of the task_file iterator, which
//! crd_task_file relies on): a thread that unshared its table has its own records, as
//! there.
//!
//! **A full ring.** The walk stops at the fd whose record did not fit, remembers it in
//! `crd_walk_resume` (the table and the thread) and returns 1: the kernel then ends the
//! `read()` and calls the program for the same thread on the next one, after userspace
//! drained the ring, and the walk resumes at that fd. Records of earlier fds are not
//! sent again, none is skipped. Userspace clears the slot before each harvest, so a
//! harvest cut short leaves nothing for the next. (An epoll's items are sent before its
//! own record; cut short, that fd is walked again, as on the task_file path.)
//!
//! **No reference taken.** The task_file iterator takes a reference on each file while
//! its program runs; the walk reads under the iterator's RCU read lock only (the fd
//! array and the files it points to are freed after a grace period, and a copy never
//! faults). A checkpoint's targets are frozen, so their tables hold still; for `ls` of a
//! running process, an fd closed during the walk can give a record mixing the old file
//! and a reused one, where task_file would have listed it or not.
//!
//! **Close-on-exec**: the bitmap's word is copied once per 64 fds and kept in the walk's
//! state (`crd_walk_state`).
use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_probe_read_kernel},
    macros::map,
    maps::Array,
};
use crd_common::{WINDOW_BYTES, WINDOW_COUNT};

use crate::{Reader, Table, TaskCtx, Windows, config, fd_record, load, wanted};

/// Where a walk cut short by a full ring resumes (see the module documentation).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WalkResume {
    /// The `files_struct` of the table; 0: no walk to resume.
    files: u64,
    /// The thread whose table it is.
    pid: u32,
    /// The first fd not sent.
    next: u32,
}

/// One slot: crd runs one iteration of its own maps at a time, and an iteration runs
/// on one CPU at a time.
#[map]
#[allow(non_upper_case_globals)]
static crd_walk_resume: Array<WalkResume> = Array::with_max_entries(1, 0);

/// The spans copied for the fd being recorded (see [`Windows`]); one slot, as above. A
/// map value rather than the stack: the program's 512 bytes of stack are shared by the
/// task program, the walk's callback and the epoll walk's.
#[map]
#[allow(non_upper_case_globals)]
static crd_windows: Array<[[u8; WINDOW_BYTES as usize]; WINDOW_COUNT]> = Array::with_max_entries(1, 0);

/// The state of the walk under way, in a map value: the stack is short (512 bytes for
/// the task program, the walk's callback and the epoll walk's together). One slot, as
/// above.
#[map]
#[allow(non_upper_case_globals)]
static crd_walk_state: Array<FdWalk> = Array::with_max_entries(1, 0);

/// The walk's state (see `crd_walk_state`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FdWalk {
    /// `fdt->fd`: the array of `struct file *`.
    fds: u64,
    /// `fdt->close_on_exec`.
    cloexec: u64,
    /// The close-on-exec word last copied and its index (`u32::MAX`: none yet).
    word: u64,
    word_index: u32,
    /// The fd the walk starts at (a resumed walk's), added to `bpf_loop`'s index.
    start: u32,
    table_files: u64,
    tgid: u32,
    pid: u32,
    /// The fd whose record did not fit, or `u32::MAX`.
    stopped: u32,
    _pad: u32,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub extern "C" fn crd_task_walk(ctx: *const TaskCtx) -> i32 {
    // SAFETY: the kernel passes a valid context; `task` is NULL on the final call.
    let task = unsafe { (*ctx).task };
    let off = config();
    let Some(tgid) = wanted(task, off) else { return 0 };
    let files: *const u8 = load(task, off.task_files);
    if files.is_null() {
        return 0;
    }
    let pid: u32 = load(task, off.task_pid);
    if pid != tgid {
        // A thread sharing its leader's table: the leader's walk sends it.
        let leader: *const u8 = load(task, off.task_group_leader);
        if load::<*const u8>(leader, off.task_files) as u64 == files as u64 {
            return 0;
        }
    }
    let fdt: *const u8 = load(files, off.files_fdt);
    let max: u32 = load(fdt, off.fdtable_max_fds);
    let Some(resume) = crd_walk_resume.get_ptr_mut(0) else { return 0 };
    // SAFETY: a pointer from a successful lookup of the one slot, which only this
    // program touches while crd's iteration runs.
    let resume = unsafe { &mut *resume };
    let start = if resume.files == files as u64 && resume.pid == pid { resume.next } else { 0 };
    let Some(state) = crd_walk_state.get_ptr_mut(0) else { return 0 };
    // SAFETY: as for `resume`.
    let walk = unsafe { &mut *state };
    *walk = FdWalk {
        fds: load::<*const u8>(fdt, off.fdtable_fd) as u64,
        cloexec: load::<*const u8>(fdt, off.fdtable_close_on_exec) as u64,
        word: 0,
        word_index: u32::MAX,
        start,
        table_files: files as u64,
        tgid,
        pid,
        stopped: u32::MAX,
        _pad: 0,
    };
    if start < max {
        // SAFETY: bpf_loop calls `walk_fd` at most `max - start` times with a NULL
        // context; the callback finds the state in `crd_walk_state`.
        unsafe { bpf_loop(max - start, walk_fd as *mut core::ffi::c_void, core::ptr::null_mut(), 0) };
    }
    if walk.stopped != u32::MAX {
        *resume = WalkResume { files: files as u64, pid, next: walk.stopped };
        return 1;
    }
    *resume = WalkResume { files: 0, pid: 0, next: 0 };
    0
}

/// `bpf_loop`'s callback: the record of fd `start + index`, if it is open; 1 (ending
/// the loop) when the ring is full.
#[inline(never)]
extern "C" fn walk_fd(index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(state) = crd_walk_state.get_ptr_mut(0) else { return 1 };
    // SAFETY: the one slot, set up by `crd_task_walk` before the loop.
    let walk = unsafe { &mut *state };
    let fd = walk.start.wrapping_add(index as u32);
    let mut file: u64 = 0;
    // SAFETY: the helper checks the address itself and writes the 8 bytes of `file`.
    let ret = unsafe {
        bpf_probe_read_kernel(
            (&raw mut file).cast(),
            8,
            (walk.fds + fd as u64 * 8) as *const core::ffi::c_void,
        )
    };
    let mut r = Reader { failed: (ret as u64) >> 63 };
    if file == 0 {
        // A failed copy is counted (and voids the harvest); the fd is not open or unknown.
        r.report();
        return 0;
    }
    let Some(slot) = crd_windows.get_ptr_mut(0) else { return 1 };
    let word_index = fd / 64;
    if walk.word_index != word_index {
        walk.word = if walk.cloexec == 0 { 0 } else { r.get(walk.cloexec, word_index * 8) };
        walk.word_index = word_index;
    }
    let cloexec = walk.word & (1u64 << (fd % 64)) != 0;
    let table = Table { tgid: walk.tgid, pid: walk.pid, files: walk.table_files };
    let windows = Windows { slot };
    if fd_record::<true, true>(&mut r, windows, table, fd, file as *const u8, cloexec, core::ptr::null()) != 0 {
        walk.stopped = fd;
        return 1;
    }
    0
}
