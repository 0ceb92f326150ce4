//! Records shared by crd's BPF programs (`crd-ebpf`) and its userspace (`crd-user`).
//!
//! Everything here is `#[repr(C)]`, fixed-size and plain old data: the kernel side
//! writes these bytes into a BPF ring buffer and userspace reads them back, so both
//! sides must agree on the layout to the byte. Kernel pointers are carried as `u64`
//! *identities* (they are never dereferenced in userspace); they tell which fds share an
//! open file description, which share an object, and which tasks share an fd table.
//!
//! An fd record is a common part ([`FdRecord`]) followed by a *tail* that depends on the
//! file's kind ([`FdRecord::tail`] says which): a pipe's bookkeeping, an anon or shmem
//! file's name, an eventfd's counter. A kind's fields widen only its own records.
#![no_std]

mod offsets;

pub use offsets::{Field, FieldGroup, Offsets};

/// Tag of a [`TaskRecord`] in the ring buffer.
pub const RECORD_TASK: u32 = 1;
/// Tag of an [`FdRecord`] (and its tail) in the ring buffer.
pub const RECORD_FD: u32 = 2;
/// Tag of an [`EpollItemRecord`]: one item of an epoll's interest list, sent before the
/// record of the fd it belongs to.
pub const RECORD_EPOLL_ITEM: u32 = 3;

/// Length of `task_struct::comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;
/// Bytes of a dentry's name the BPF program copies (`[eventfd]`, `memfd:NAME`...).
pub const NAME_LEN: usize = 16;

/// [`FdRecord::flags`]: the fd's close-on-exec bit is set.
pub const FD_CLOEXEC: u32 = 1 << 1;

/// [`FdRecord::tail`]: no tail (the common part says all BPF knows).
pub const TAIL_NONE: u32 = 0;
/// [`FdRecord::tail`]: a [`PipeTail`] follows (pipes and FIFOs).
pub const TAIL_PIPE: u32 = 1;
/// [`FdRecord::tail`]: a [`NamedTail`] follows (anon-inode and shmem files).
pub const TAIL_NAMED: u32 = 2;
/// [`FdRecord::tail`]: an [`EventfdTail`] follows.
pub const TAIL_EVENTFD: u32 = 3;

/// [`FdRecord::tail`]: a [`SocketTail`] follows (every socket whose `struct sock` was
/// read; a socket sent without it is listed as an opaque socket).
pub const TAIL_SOCKET: u32 = 4;

/// [`FdRecord::tail`]: an [`EpollTail`] follows (its items came before, as
/// [`EpollItemRecord`]s).
pub const TAIL_EPOLL: u32 = 5;
/// [`FdRecord::tail`]: a [`TimerfdTail`] follows.
pub const TAIL_TIMERFD: u32 = 6;
/// [`FdRecord::tail`]: a [`SignalfdTail`] follows.
pub const TAIL_SIGNALFD: u32 = 7;

/// [`PipeTail::flags`]: the pipe had more occupied buffers than the program walks, so
/// `queued` is a lower bound (userspace measures the queue itself with FIONREAD).
pub const PIPE_QUEUE_TRUNCATED: u32 = 1 << 0;

/// How many occupied pipe buffers the BPF program sums at most to count queued bytes.
pub const MAX_PIPE_BUFS_WALKED: u32 = 16;

/// [`Config::kinds`] bits: which kinds' kernel fields resolved on this kernel. A kind
/// whose bit is clear is sent without its tail (userspace lists it as opaque).
pub const KIND_NAMED: u32 = 1 << 0;
/// [`Config::kinds`]: `eventfd_ctx` fields resolved.
pub const KIND_EVENTFD: u32 = 1 << 1;
/// [`Config::kinds`]: `shmem_inode_info::seals` resolved (memfd seals).
pub const KIND_SHMEM: u32 = 1 << 2;

/// [`Config::kinds`]: `socket`, `sock`, `unix_sock` and `unix_address` fields resolved:
/// sockets carry a [`SocketTail`].
pub const KIND_SOCKET: u32 = 1 << 3;
/// [`Config::kinds`]: the kernel has the helpers `bpf_sock_from_file` (5.11) and
/// `bpf_skc_to_unix_sock` (5.16), which hand back BTF-typed `struct socket *` and
/// `struct unix_sock *`: a socket's fields are then direct loads, not one
/// `bpf_probe_read_kernel` call each (a helper call costs ~20 loads).
pub const KIND_SOCKET_TYPED: u32 = 1 << 4;

/// [`Config::kinds`]: `eventpoll`, `epitem` and `rb_node` fields resolved: the BPF
/// program walks each epoll's interest list ([`EpollTail`]).
pub const KIND_EPOLL: u32 = 1 << 5;
/// [`Config::kinds`]: `timerfd_ctx` and `hrtimer` fields resolved ([`TimerfdTail`]).
pub const KIND_TIMERFD: u32 = 1 << 6;
/// [`Config::kinds`]: `signalfd_ctx::sigmask` resolved ([`SignalfdTail`]).
pub const KIND_SIGNALFD: u32 = 1 << 7;
/// [`Config::kinds`]: this kernel has `bpf_loop` (5.17+), so the program that walks
/// epolls with it is the one loaded; without it, the program with a small fixed bound.
pub const KIND_BPF_LOOP: u32 = 1 << 8;
/// The kernel's task and task_file iterators take a task filter (`bpf_iter_link_info.task`,
/// 6.1+): userspace runs them over each asked-for process alone. (Userspace only: the
/// programs do not look at it.)
pub const KIND_ITER_TASK_FILTER: u32 = 1 << 9;
/// Userspace runs `crd_task_walk` (the task iterator, each fd table walked in one program
/// run with `bpf_loop`) instead of `crd_task_file` (a program run and a file reference
/// per fd): kernels with `bpf_loop` from 6.2 on. (Userspace only: the programs do not
/// look at it.)
pub const KIND_FD_WALK: u32 = 1 << 10;

/// The most items of one epoll the BPF program walks with `bpf_loop`; the ring's size
/// lowers it ([`Config::epoll_max_items`]): every item of one walk must fit in the ring
/// at once, since a walk interrupted by a full ring starts over.
pub const EPOLL_MAX_ITEMS: u32 = 4096;
/// The most items of one epoll the program without `bpf_loop` walks (5.10-5.16): each
/// step is verified once per iteration of an unrolled loop.
pub const EPOLL_BOUNDED_ITEMS: u32 = 8;
/// Steps of the walk per item at most: descend into it, find it has no left child, visit
/// it, climb out of it.
pub const EPOLL_STEPS_PER_ITEM: u32 = 4;

/// [`EpollTail::walk`]: every item was sent, in the kernel's order.
pub const EPOLL_WALK_COMPLETE: u32 = 1;
/// [`EpollTail::walk`]: the epoll has more items than the program walks: userspace reads
/// the interest list from fdinfo instead.
pub const EPOLL_WALK_TRUNCATED: u32 = 2;
/// [`EpollTail::walk`]: the tree changed under the walk (a NULL where a node must be, a
/// node that is not its parent's child, a failed read): fdinfo instead.
pub const EPOLL_WALK_TORN: u32 = 3;

/// Bytes of a unix socket's bound name the BPF program copies (`sun_path`, 108 bytes).
pub const UNIX_PATH_LEN: usize = 108;

/// Superblock magics the BPF program tells kinds apart by (include/uapi/linux/magic.h).
pub const PIPEFS_MAGIC: u64 = 0x5049_5045;
pub const ANON_INODE_FS_MAGIC: u64 = 0x0904_1934;
/// pidfs (Linux 6.9+), where pidfds live instead of the anon inode.
pub const PIDFS_MAGIC: u64 = 0x5049_4446;
pub const TMPFS_MAGIC: u64 = 0x0102_1994;
pub const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
pub const SOCKFS_MAGIC: u64 = 0x534F_434B;

/// `AF_*` numbers the BPF program reads family fields for.
pub const AF_UNIX: u16 = 1;
/// `sk_state` of a listening socket, every family (`TCP_LISTEN`).
pub const SK_STATE_LISTEN: u8 = 10;
/// `SOCK_STREAM`.
pub const SOCK_STREAM: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

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

/// The common part of one open fd, from the `iter/task_file` program. A tail
/// ([`tail`](Self::tail)) follows it in the same ring record.
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
    /// `file::f_pos`.
    pub pos: i64,
    /// Raw reference count of the open file description (`f_ref`/`f_count`, see
    /// [`Config::file_ref_bias`]).
    pub file_refs: i64,
    /// `inode::i_ino`.
    pub ino: u64,
    /// `inode::i_size`.
    pub size: i64,
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
    /// `TAIL_*`: which tail follows.
    pub tail: u32,
    pub _pad: u32,
}

/// The tail of a pipe or FIFO fd: its `pipe_inode_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipeTail {
    /// `inode::i_pipe`: identity of the pipe.
    pub pipe: u64,
    /// `pipe_inode_info::max_usage`: buffer slots the pipe may fill; its capacity
    /// (F_GETPIPE_SZ) is this many pages.
    pub max_usage: u32,
    /// `pipe_inode_info::readers`: open read descriptions of the pipe, system-wide.
    pub readers: u32,
    /// `pipe_inode_info::writers`: open write descriptions of the pipe, system-wide.
    pub writers: u32,
    /// Bytes queued in the pipe (sum of occupied buffer lengths).
    pub queued: u32,
    /// `PIPE_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// The tail of an anon-inode or shmem file: what names it and what it points to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamedTail {
    /// `file::private_data`: an anon file's object (the `eventfd_ctx`, the
    /// `eventpoll`...). Every anon file sits on the kernel's one shared anon inode, so
    /// this, not the inode, is the object's identity.
    pub private_data: u64,
    /// The first bytes of `file->f_path.dentry->d_name`, NUL-padded: `[eventfd]`,
    /// `[eventpoll]`, `memfd:NAME`...
    pub name: [u8; NAME_LEN],
    /// `shmem_inode_info::seals` of a shmem file (F_SEAL_* bits), when resolved.
    pub seals: u32,
    pub _pad: u32,
}

/// The tail of an eventfd.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventfdTail {
    pub named: NamedTail,
    /// `eventfd_ctx::count`.
    pub count: u64,
    /// `eventfd_ctx::flags` (EFD_SEMAPHORE, EFD_NONBLOCK, EFD_CLOEXEC as created).
    pub flags: u32,
    pub _pad: u32,
}

/// The tail of an epoll: how the walk of its interest list (`eventpoll::rbr`) went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpollTail {
    pub named: NamedTail,
    /// Items sent before this record, as [`EpollItemRecord`]s with `index` 0..items
    /// (a walk cut short by a full ring is started over, so earlier copies with the same
    /// index are superseded by the last ones).
    pub items: u32,
    /// `EPOLL_WALK_*`.
    pub walk: u32,
}

/// One item of an epoll's interest list (`struct epitem`), in the kernel's order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpollItemRecord {
    /// Always [`RECORD_EPOLL_ITEM`].
    pub kind: u32,
    /// Position in the walk (the kernel's order: by file, then fd number).
    pub index: u32,
    /// The `struct eventpoll *` (the epoll's `private_data`) the item belongs to.
    pub epoll: u64,
    /// `epitem::ffd.file`: the watched open file description, even when no fd holds it.
    pub file: u64,
    /// `epitem::event.data`, all 64 bits.
    pub data: u64,
    /// Raw reference count of the watched file (as [`FdRecord::file_refs`]).
    pub file_refs: i64,
    /// `i_ino` of the watched file's inode.
    pub ino: u64,
    /// `epitem::ffd.fd`: the fd number it was registered under.
    pub fd: u32,
    /// `epitem::event.events`.
    pub events: u32,
    /// `s_dev` of the watched file's superblock (kernel encoding).
    pub s_dev: u32,
    pub _pad: u32,
}

/// The tail of a timerfd: its `timerfd_ctx`, and the time left on its timer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerfdTail {
    pub named: NamedTail,
    /// `timerfd_ctx::ticks`: expirations not yet read.
    pub ticks: u64,
    /// `timerfd_ctx::tintv`: the interval, in ns.
    pub interval_ns: i64,
    /// Time to the next expiry, in ns, as fdinfo computes it (the timer's expiry minus
    /// its clock's current time, 0 if past): `hrtimer::node.expires` minus the clock
    /// base's offset from CLOCK_MONOTONIC minus `bpf_ktime_get_ns()`.
    pub remaining_ns: i64,
    /// `timerfd_ctx::clockid`.
    pub clockid: i32,
    /// `timerfd_ctx::settime_flags` (TFD_TIMER_*).
    pub settime_flags: u16,
    /// `timerfd_ctx::expired`.
    pub expired: u16,
}

/// The tail of a signalfd.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignalfdTail {
    pub named: NamedTail,
    /// `signalfd_ctx::sigmask` as the kernel stores it: **inverted** (bit N-1 *clear*
    /// for each signal N the signalfd reads).
    pub sigmask_inverted: u64,
}

/// The tail of a socket: its `struct socket` and `struct sock`, for every family, plus
/// the family's own fields (unix: peer and bound name; inet: addresses and ports).
/// Socket options restore needs are read by userspace with getsockopt while the targets
/// are frozen; this tail carries what `ls` and the objref graph need.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketTail {
    /// `socket::sk`: identity of the `struct sock`.
    pub sock: u64,
    /// unix: `unix_sock::peer`, the peer's `struct sock` (0: no peer). Its address is
    /// the peer's identity: userspace finds the peer's inode among the harvested
    /// sockets (`sock`), or asks sock_diag for a peer outside them. Reading the inode
    /// here would cost a cache miss on the peer's `sock` for every unix socket.
    pub peer: u64,
    /// `sock_common::skc_family` (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK...).
    pub family: u16,
    /// `sock::sk_type` (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET, SOCK_RAW...).
    pub sock_type: u16,
    /// `sock::sk_protocol` (IPPROTO_TCP, IPPROTO_UDP...; 0 for unix).
    pub protocol: u16,
    /// `sock_common::skc_state`: TCP_* numbering for every family (unix uses
    /// TCP_ESTABLISHED = 1, TCP_CLOSE = 7, TCP_LISTEN = 10).
    pub state: u8,
    /// `sock::sk_shutdown` (RCV_SHUTDOWN = 1, SEND_SHUTDOWN = 2).
    pub shutdown: u8,
    /// `sock::sk_max_ack_backlog`: a listener's backlog (read for listeners only, 0 for
    /// any other socket).
    pub backlog: u32,
    /// `sock::sk_ack_backlog`: connections waiting to be accepted (listeners only).
    pub pending: u32,
    /// `sock::sk_receive_queue.qlen`: messages queued for reading, read only where crd
    /// uses it: a unix listener (its pending connections) and a unix socket that keeps
    /// message boundaries (its datagram count); 0 for any other socket. Every field
    /// read costs a cache line of the `sock`, and a socket's cost is mostly those misses.
    pub rqueue: u32,
    /// inet: local port (`skc_num`, host order).
    pub local_port: u16,
    /// inet: remote port (`skc_dport`, converted to host order).
    pub remote_port: u16,
    /// inet: local address, network order (IPv4 in the first 4 bytes).
    pub local_addr: [u8; 16],
    /// inet: remote address, network order (IPv4 in the first 4 bytes).
    pub remote_addr: [u8; 16],
    /// unix: `unix_address::len` (bytes of `sockaddr_un` including `sun_family`); 0:
    /// not bound.
    pub name_len: u32,
    /// unix: `sun_path` of the bound name, as many bytes as `name_len` says (an abstract
    /// name starts with a NUL byte). The BPF program does not clear the bytes past
    /// them: they are unspecified.
    pub name: [u8; UNIX_PATH_LEN],
}

impl Default for SocketTail {
    fn default() -> Self {
        Self {
            sock: 0,
            peer: 0,
            family: 0,
            sock_type: 0,
            protocol: 0,
            state: 0,
            shutdown: 0,
            backlog: 0,
            pending: 0,
            rqueue: 0,
            local_port: 0,
            remote_port: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
            name_len: 0,
            name: [0; UNIX_PATH_LEN],
        }
    }
}

/// An fd record with its tail, as one ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdWith<T> {
    pub common: FdRecord,
    pub tail: T,
}

/// Read-only configuration of one harvest, a global of the BPF object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub offsets: Offsets,
    /// `sizeof(struct pipe_buffer)`.
    pub pipe_buffer_size: u32,
    /// Added to the raw file reference count to get the number of references: 1 for
    /// `file_ref_t f_ref` (6.13+, counts from 0), 0 for `atomic_long_t f_count`.
    pub file_ref_bias: u32,
    /// `KIND_*` bits: the kinds whose fields this kernel has.
    pub kinds: u32,
    /// Non-zero: report every task on the system, ignoring the tgid filter map.
    pub match_all: u32,
    /// The most items of one epoll the program walks (at most [`EPOLL_MAX_ITEMS`], and
    /// few enough that one walk fits in the ring); more: the walk says
    /// [`EPOLL_WALK_TRUNCATED`].
    pub epoll_max_items: u32,
    /// For `crd_task_walk`, the span of each struct ([`WINDOW_FILE`]...) copied with one
    /// `bpf_probe_read_kernel`: it covers the fields of that struct a record needs that fit
    /// in [`WINDOW_BYTES`] (the others are copied one by one).
    pub windows: [Window; WINDOW_COUNT],
}

/// A span of a kernel struct, copied whole by `crd_task_walk` (see [`Config::windows`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Offset of the span in the struct.
    pub start: u32,
    /// Its length in bytes (at most [`WINDOW_BYTES`]; 0: nothing copied).
    pub len: u32,
}

impl Window {
    pub const ZERO: Self = Self { start: 0, len: 0 };
}

/// [`Config::windows`]: `struct file`.
pub const WINDOW_FILE: usize = 0;
/// [`Config::windows`]: `struct inode`.
pub const WINDOW_INODE: usize = 1;
/// [`Config::windows`]: `struct super_block`.
pub const WINDOW_SB: usize = 2;
/// [`Config::windows`]: `struct pipe_inode_info`.
pub const WINDOW_PIPE: usize = 3;
/// [`Config::windows`]: the `struct sock_common` at the start of a `struct sock`
/// (family, state, inet addresses and ports).
pub const WINDOW_SOCK: usize = 4;
/// [`Config::windows`]: a `struct sock`'s type, protocol and shutdown.
pub const WINDOW_SOCK_TYPE: usize = 5;
/// [`Config::windows`]: a `struct unix_sock`'s peer and address.
pub const WINDOW_UNIX: usize = 6;
/// Number of [`Config::windows`].
pub const WINDOW_COUNT: usize = 7;
/// The longest span copied at once: three cache lines.
pub const WINDOW_BYTES: u32 = 192;

impl Config {
    /// The placeholder the BPF object is built with (userspace sets the real values
    /// before load).
    pub const ZERO: Self = Self {
        offsets: Offsets::ZERO,
        pipe_buffer_size: 0,
        file_ref_bias: 0,
        kinds: 0,
        match_all: 0,
        epoll_max_items: 0,
        windows: [Window::ZERO; WINDOW_COUNT],
    };
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
