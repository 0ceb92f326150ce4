//! Records shared by crd's BPF programs (`crd-ebpf`) and its userspace (`crd-user`).
//!
//! Everything here is `#[repr(C)]`, fixed-size and plain old data: the kernel side
//! writes these bytes into a BPF ring buffer and userspace reads them back, so both
//! sides must agree on the layout to the byte. Kernel pointers are carried as `u64`
//! *identities* (they are never dereferenced in userspace); they tell which fds share an
//! open file description, which share an inode, and which tasks share an fd table.
#![no_std]

/// Tag of a [`TaskRecord`] in the ring buffer.
pub const RECORD_TASK: u32 = 1;
/// Tag of a [`FdRecord`] in the ring buffer.
pub const RECORD_FD: u32 = 2;

/// Length of `task_struct::comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// [`FdRecord::flags`]: the pipe had more occupied buffers than the program walks, so
/// `pipe_queued` is a lower bound (userspace measures the queue itself with FIONREAD).
pub const FD_PIPE_QUEUE_TRUNCATED: u32 = 1 << 0;
/// [`FdRecord::flags`]: the fd's close-on-exec bit is set.
pub const FD_CLOEXEC: u32 = 1 << 1;
/// [`FdRecord::flags`]: the inode is a FIFO or pipe and its `pipe_inode_info` was read.
pub const FD_HAS_PIPE: u32 = 1 << 2;

/// How many occupied pipe buffers the BPF program sums at most to count queued bytes.
pub const MAX_PIPE_BUFS_WALKED: u32 = 16;

/// The BPF program copies `pipe_inode_info` in one read of this many bytes, from
/// `pipe_head` on: `head`, `tail`, `ring_size`, `readers`, `writers` and `bufs` must all
/// lie inside (userspace checks the kernel's layout before loading).
pub const PIPE_CHUNK: usize = 128;

/// One task (thread) of a checkpointed process, from the `iter/task` program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskRecord {
    /// Always [`RECORD_TASK`].
    pub kind: u32,
    /// Thread id (`task_struct::pid`), in the initial pid namespace.
    pub pid: u32,
    /// Thread-group id (`task_struct::tgid`), i.e. the process id.
    pub tgid: u32,
    /// Thread-group id of `real_parent` (not the ptrace parent, which is crd itself).
    pub parent_tgid: u32,
    /// `task_struct::files`: tasks with the same pointer share one fd table.
    pub files: u64,
    /// `task_struct::comm`, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// One open fd, from the `iter/task_file` program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdRecord {
    /// Always [`RECORD_FD`].
    pub kind: u32,
    /// The fd number.
    pub fd: u32,
    /// Process that owns the fd table (as visited by the iterator).
    pub tgid: u32,
    /// Thread through which the iterator saw the table.
    pub pid: u32,
    /// `task_struct::files`: identity of the fd table.
    pub files: u64,
    /// `struct file *`: identity of the open file description.
    pub file: u64,
    /// `file::f_inode`: identity of the inode.
    pub inode: u64,
    /// `inode::i_pipe` when the inode is a FIFO/pipe, else 0: identity of the pipe.
    pub pipe: u64,
    /// `file::f_pos`.
    pub pos: i64,
    /// Raw reference count of the open file description (`f_ref`/`f_count`, see
    /// [`Offsets::file_ref_bias`]).
    pub file_refs: i64,
    /// `inode::i_ino`.
    pub ino: u64,
    /// `super_block::s_magic` of the inode's filesystem (PIPEFS_MAGIC, SOCKFS_MAGIC...).
    pub sb_magic: u64,
    /// `file::f_flags` (O_* open flags).
    pub f_flags: u32,
    /// `file::f_mode` (FMODE_* bits: FMODE_READ = 1, FMODE_WRITE = 2).
    pub f_mode: u32,
    /// `inode::i_mode` (file type and permission bits).
    pub i_mode: u32,
    /// `super_block::s_dev` (kernel dev_t encoding: major << 20 | minor).
    pub s_dev: u32,
    /// `inode::i_rdev` for device nodes (kernel dev_t encoding).
    pub i_rdev: u32,
    /// `FD_*` bits.
    pub flags: u32,
    /// `pipe_inode_info::max_usage`: buffer slots the pipe may fill; its capacity
    /// (F_GETPIPE_SZ) is this many pages.
    pub pipe_max_usage: u32,
    /// `pipe_inode_info::readers`: open read descriptions of the pipe, system-wide.
    pub pipe_readers: u32,
    /// `pipe_inode_info::writers`: open write descriptions of the pipe, system-wide.
    pub pipe_writers: u32,
    /// Bytes queued in the pipe (sum of occupied buffer lengths).
    pub pipe_queued: u32,
}

/// Kernel struct field offsets, resolved in userspace from the running kernel's BTF and
/// handed to the BPF programs as a read-only global. Rust eBPF emits no CO-RE
/// relocations, so this is how one BPF object reads the right fields on every kernel.
///
/// Every value is a byte offset inside the named struct, except where it says otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_comm: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_close_on_exec: u32,
    pub file_f_flags: u32,
    pub file_f_mode: u32,
    pub file_f_pos: u32,
    pub file_f_inode: u32,
    pub file_f_ref: u32,
    pub inode_i_mode: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub inode_i_rdev: u32,
    pub inode_i_pipe: u32,
    pub sb_s_magic: u32,
    pub sb_s_dev: u32,
    pub pipe_head: u32,
    pub pipe_tail: u32,
    pub pipe_ring_size: u32,
    pub pipe_max_usage: u32,
    pub pipe_readers: u32,
    pub pipe_writers: u32,
    pub pipe_bufs: u32,
    pub pipe_buffer_len: u32,
    /// `sizeof(struct pipe_buffer)`.
    pub pipe_buffer_size: u32,
    /// Added to the raw file reference count to get the number of references: 1 for
    /// `file_ref_t f_ref` (6.13+, counts from 0), 0 for `atomic_long_t f_count`.
    pub file_ref_bias: u32,
}

/// Read-only configuration of one harvest, a global of the BPF object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub offsets: Offsets,
    /// Non-zero: report every task on the system, ignoring the tgid filter map.
    pub match_all: u32,
    pub _pad: u32,
}

/// Indices into the `crd_stats` array map.
pub const STAT_SUBMITTED: u32 = 0;
/// Times a record did not fit in the ring buffer and the iterator was paused.
pub const STAT_RING_FULL: u32 = 1;
/// Kernel reads (bpf_probe_read_kernel) that failed; any non-zero value voids a harvest.
pub const STAT_READ_FAILED: u32 = 2;
/// Number of entries in `crd_stats`.
pub const STAT_COUNT: u32 = 3;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): the types are #[repr(C)], Copy, contain only integers and
    // byte arrays, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::TaskRecord {}
    unsafe impl aya::Pod for super::FdRecord {}
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::Config {}
}
