//! Programs that measure floors (issue #13), loaded only by the testing build's
//! `crd bench-harvest`: none of them sends anything. Each is verified only when loaded,
//! so they cost the product's loads nothing.
//!
//! - `crd_floor_null` (`iter/task_file`): returns at once: the kernel's walk of the fd
//!   table (a file reference taken and dropped per fd) and a program call per fd.
//! - `crd_floor_walk` (`iter/task`): for each wanted thread-group leader, walks its fd
//!   array in one program run with `bpf_loop`, copying each `fd[i]` (skipping NULL) and,
//!   as `WALK_MODE` says, chunks of the file and what a pipe's record needs.
use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, macros::map, maps::Array};

use crd_common::{FdRecord, FdWith, PipeTail};

use crate::{TaskCtx, TaskFileCtx, config, emit, load, wanted};

/// `crd_floor_walk`'s mode, set by userspace before each run: 0: copy `fd[i]` only;
/// 1: and the whole `struct file`; 2: and spans of the inode, superblock and pipe (the
/// reads of a pipe's record, at 6.18's offsets); 3: and send a pipe-sized record per fd
/// (not resumed when the ring fills: a measurement only).
#[map]
#[allow(non_upper_case_globals)]
static crd_floor_mode: Array<u32> = Array::with_max_entries(1, 0);

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn crd_floor_null(_ctx: *const TaskFileCtx) -> i32 {
    0
}

/// A pipe-sized record of zeros for each fd of a wanted process: the cost of sending.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn crd_floor_emit(ctx: *const TaskFileCtx) -> i32 {
    // SAFETY: the kernel passes a valid context; `task` is NULL on the final call.
    let task = unsafe { (*ctx).task };
    if wanted(task, config()).is_none() {
        return 0;
    }
    emit(FdWith { common: FdRecord::default(), tail: PipeTail::default() })
}

#[repr(C)]
struct Walk {
    fds: u64,
    mode: u32,
    found: u32,
    sum: u64,
}

#[inline(always)]
fn copy<T: Copy>(at: u64) -> T {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: bpf_probe_read_kernel checks the address itself and fills every byte of
    // the destination (zeros on failure); only integers and byte arrays are read.
    unsafe {
        bpf_probe_read_kernel(value.as_mut_ptr().cast(), core::mem::size_of::<T>() as u32, at as *const _);
        value.assume_init()
    }
}

#[inline(never)]
extern "C" fn walk_fd(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes the `Walk` on the caller's stack given as its context.
    let walk = unsafe { &mut *(ctx as *mut Walk) };
    let file: u64 = copy(walk.fds + index * 8);
    if file == 0 {
        return 0;
    }
    walk.found += 1;
    if walk.mode == 0 {
        return 0;
    }
    let off = config();
    let chunk: [u64; 23] = copy(file);
    let inode = chunk[4];
    walk.sum = walk.sum.wrapping_add(chunk[5]).wrapping_add(chunk[14]).wrapping_add(chunk[22]);
    if walk.mode == 1 {
        return 0;
    }
    let head: [u64; 12] = copy(inode);
    let sb = head.get(off.inode_i_sb as usize / 8).copied().unwrap_or(0);
    let pipe: u64 = copy(inode + off.inode_i_pipe as u64);
    let sbc: [u64; 13] = copy(sb);
    let pipec: [u64; 16] = copy(pipe);
    walk.sum = walk.sum.wrapping_add(head[1]).wrapping_add(sbc[12]).wrapping_add(pipec[9]);
    if walk.mode == 2 {
        return 0;
    }
    let mut common = FdRecord::default();
    common.file = file;
    common.inode = inode;
    common.ino = head[8];
    common.sb_magic = sbc[12];
    let tail = PipeTail { pipe, max_usage: pipec[11] as u32, ..PipeTail::default() };
    emit(FdWith { common, tail }) as i64
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub extern "C" fn crd_floor_walk(ctx: *const TaskCtx) -> i32 {
    // SAFETY: the kernel passes a valid context; `task` is NULL on the final call.
    let task = unsafe { (*ctx).task };
    let off = config();
    let Some(tgid) = wanted(task, off) else { return 0 };
    if load::<u32>(task, off.task_pid) != tgid {
        return 0;
    }
    let files: *const u8 = load(task, off.task_files);
    let fdt: *const u8 = load(files, off.files_fdt);
    let max: u32 = load(fdt, off.fdtable_max_fds);
    let fds = load::<*const u8>(fdt, off.fdtable_fd) as u64;
    let mode = crd_floor_mode.get(0).copied().unwrap_or(0);
    let mut walk = Walk { fds, mode, found: 0, sum: 0 };
    // SAFETY: bpf_loop calls `walk_fd` at most `max` times with the `Walk` on this stack.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            max,
            walk_fd as *mut core::ffi::c_void,
            (&raw mut walk).cast(),
            0,
        )
    };
    core::hint::black_box(walk.sum);
    0
}
