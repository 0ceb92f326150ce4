//! crd's kernel side: two BPF iterator programs that copy the fd state of the tasks
//! userspace asked for into a ring buffer, as fixed-size records (`crd-common`).
//!
//! - `crd_task` (`iter/task`): one [`TaskRecord`] per thread: identity, real parent, comm,
//!   and the `files_struct` pointer that tells which threads share one fd table.
//! - `crd_task_file` (`iter/task_file`): one [`FdRecord`] per fd of each fd table, and
//!   before an epoll's record one [`EpollItemRecord`](crd_common::EpollItemRecord) per
//!   item of its interest list, walked with `bpf_loop` (5.17+).
//! - `crd_task_file_bounded`: the same for kernels without `bpf_loop` (5.10-5.16), which
//!   refuse a program that merely names a callback; its epoll walk is an unrolled loop of
//!   a few items.
//! - `crd_task_walk` (`iter/task`, [`walk`]): the same records, from 6.2 on, each fd table
//!   walked in one program run with `bpf_loop` instead of a program run and a file
//!   reference per fd; its reads are copies (see below). Userspace loads one of the three.
//!
//! Rust eBPF emits no CO-RE relocations, so every field is read at an offset that
//! userspace resolved from the running kernel's BTF and froze into `.rodata`
//! ([`CRD_CONFIG`]); the verifier then sees the offsets as constants.
//!
//! **Speed**: a helper call costs far more than a load (every call and return pays for
//! the CPU's speculation mitigations), and the task_file iterator runs the program once
//! per fd.
//! So fields of the task, file, inode and superblock are read with *direct loads* from
//! the BTF-typed pointers the iterator passes: the verifier checks each load against
//! the kernel's BTF at load time and turns it into a fault-safe load. Only what BTF
//! cannot type is copied with `bpf_probe_read_kernel`: the close-on-exec bitmap (one
//! copy per 64 fds, cached per CPU), for a pipe holding data its buffer lengths, the
//! name, eventfd counter or memfd seals of the kinds that have them, a unix socket's
//! bound name, and what lies past a `file`'s untyped `private_data`: a timerfd's
//! `timerfd_ctx`, a signalfd's mask, an epoll's tree of items ([`anon`]). A socket's
//! `struct socket` is typed by the helpers `bpf_sock_from_file` and
//! `bpf_skc_to_unix_sock` where the kernel has them (5.16+); before that, every field
//! of a socket is copied.
//!
//! **Kinds**: each fd record is a common part plus a tail for its kind (crd-common):
//! pipes and FIFOs carry their `pipe_inode_info`, anon-inode and shmem files their
//! dentry name and private object, eventfds their counter, timerfds their settings and
//! time left, signalfds their mask, epolls how the walk of their items went, sockets
//! their `struct sock` (unix: peer and bound name; inet: addresses and ports). A kind's
//! fields are read only for that kind, and only if userspace found them in this kernel's
//! BTF (`Config::kinds`); without them the kind is sent with its name tail and userspace
//! reads its fdinfo (epoll, timerfd, signalfd) or lists it as opaque.
//!
//! In `crd_task_walk` the file pointer comes out of the fd array as a plain number, so
//! nothing past it can be loaded directly: the fields of the file, inode, superblock,
//! pipe and socket are copied a struct's span at a time (one `bpf_probe_read_kernel`
//! each, [`Windows`]), the rest field by field as on 5.10. [`fd_record`] serves both
//! paths with the same code, so the records are the same. Still, skipping the task_file
//! iterator's work per fd (~100 ns) more than pays for the copies (docs/performance.md).
//!
//! **No silent loss**: when the ring buffer is full the program returns 1. The kernel then
//! ends the current `read()` of the iterator and retries the same (task, fd) on the next
//! `read()`, after userspace has drained the ring. Nothing is ever dropped. (An epoll's
//! walk cut short this way starts over; its item records carry their index, so the
//! second attempt's supersede the first's, and userspace sizes the walk's bound so that
//! one whole walk fits in the ring.) `crd_task_walk` remembers the fd its walk stopped at
//! and resumes there ([`walk`]). (Userspace
//! logs each such pause; the programs themselves log only failed reads, with aya-log:
//! every log statement is code the verifier walks at every load.)
#![no_std]
#![no_main]

mod anon;
mod floor;
mod walk;

use aya_ebpf::{
    helpers::generated::{bpf_skc_to_unix_sock, bpf_sock_from_file},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use aya_log_ebpf::warn;
use crd_common::{
    AF_INET, AF_INET6, AF_UNIX, ANON_INODE_FS_MAGIC, COMM_LEN, Config, EventfdTail, FD_CLOEXEC, FdRecord,
    FdWith, HUGETLBFS_MAGIC, KIND_EVENTFD, KIND_NAMED, KIND_SHMEM, KIND_SOCKET, KIND_SOCKET_TYPED, SK_STATE_LISTEN, SOCK_STREAM,
    MAX_PIPE_BUFS_WALKED, NAME_LEN, NamedTail, Offsets, PIPE_QUEUE_TRUNCATED, PipeTail, RECORD_FD,
    RECORD_TASK, SOCKFS_MAGIC, STAT_COUNT, STAT_READ_FAILED, STAT_RING_FULL, STAT_SUBMITTED, SocketTail,
    TAIL_EVENTFD, TAIL_NAMED, TAIL_NONE, TAIL_PIPE, TAIL_SOCKET, TMPFS_MAGIC, TaskRecord, WINDOW_BYTES,
    WINDOW_COUNT, WINDOW_FILE, WINDOW_INODE, WINDOW_PIPE, WINDOW_SB, WINDOW_SOCK, WINDOW_SOCK_TYPE,
    WINDOW_UNIX, Window,
};

/// Set by userspace before load (`EbpfLoader::set_global`); zero here only as a
/// placeholder. Lives in `.rodata`, which aya freezes.
#[unsafe(no_mangle)]
static CRD_CONFIG: Config = Config::ZERO;

/// Records for userspace. Its size can be overridden at load time.
#[map]
#[allow(non_upper_case_globals)]
static crd_events: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// The thread-group ids to report (key: tgid; value unused).
#[map]
#[allow(non_upper_case_globals)]
static crd_tgids: HashMap<u32, u8> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// `BPF_F_NO_PREALLOC`: allocate entries on insert; preallocating 65,536 of them would
/// cost every load several milliseconds for the handful of processes a checkpoint names.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Counters (`STAT_*`) that let userspace prove nothing was lost.
#[map]
#[allow(non_upper_case_globals)]
static crd_stats: Array<u64> = Array::with_max_entries(STAT_COUNT, 0);

/// The close-on-exec bitmap word last read on this CPU: the iterator visits a table's
/// fds in ascending order, so one copy serves 64 fds.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CloexecWord {
    /// The bitmap (`fdt->close_on_exec`) the word was read from; 0: nothing cached.
    bitmap: u64,
    /// Index of the word in the bitmap.
    index: u32,
    _pad: u32,
    bits: u64,
}

#[map]
#[allow(non_upper_case_globals)]
static crd_cloexec: PerCpuArray<CloexecWord> = PerCpuArray::with_max_entries(1, 0);

/// `struct bpf_iter_meta`.
#[repr(C)]
pub struct IterMeta {
    seq: u64,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__task`: every member is an 8-byte `__bpf_md_ptr`.
#[repr(C)]
pub struct TaskCtx {
    meta: *const IterMeta,
    task: *const u8,
}

/// `struct bpf_iter__task_file`.
#[repr(C)]
pub struct TaskFileCtx {
    meta: *const IterMeta,
    task: *const u8,
    fd: u32,
    _pad: u32,
    file: *const u8,
}

const S_IFMT: u32 = 0o170000;
const S_IFIFO: u32 = 0o010000;
const S_IFREG: u32 = 0o100000;
const S_IFSOCK: u32 = 0o140000;

#[inline(always)]
fn config() -> &'static Offsets {
    // SAFETY: CRD_CONFIG is a valid static; the volatile read stops the compiler from
    // folding the placeholder zeros, so the loaded (frozen) values are used.
    unsafe { &*core::ptr::read_volatile(&&raw const CRD_CONFIG.offsets) }
}

/// A scalar of the frozen configuration.
#[inline(always)]
fn setting(field: *const u32) -> u32 {
    // SAFETY: `field` points into CRD_CONFIG (a valid static); as in `config`.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn match_all() -> bool {
    setting(&raw const CRD_CONFIG.match_all) != 0
}

/// Whether this kernel has the fields of the kind behind `bit` (`KIND_*`).
#[inline(always)]
fn kind_enabled(bit: u32) -> bool {
    setting(&raw const CRD_CONFIG.kinds) & bit != 0
}

#[inline(always)]
fn bump(stat: u32) {
    if let Some(counter) = crd_stats.get_ptr_mut(stat) {
        // SAFETY: the pointer comes from a successful map lookup; crd runs one iteration
        // of its own maps at a time, so nothing else writes the counter concurrently.
        unsafe { *counter += 1 };
    }
}

/// Reads kernel memory at `base + offset`, counting failures without branching.
///
/// Every read of a program goes through one `Reader`; the program checks `failed` once
/// at the end. No branch per read keeps the verifier's work linear, which older kernels
/// (6.1) need: they give up at 1M processed instructions.
struct Reader {
    failed: u64,
}

impl Reader {
    #[inline(always)]
    fn get<T: Copy>(&mut self, base: u64, offset: u32) -> T {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: bpf_probe_read_kernel checks the address itself; it fills every byte
        // of the destination, with the data or, on failure, with zeros (and returns a
        // negative errno).
        let ret = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                value.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
                (base + offset as u64) as *const core::ffi::c_void,
            )
        };
        self.failed |= (ret as u64) >> 63;
        // SAFETY: fully written above; only integers and byte arrays are read, for
        // which any bytes are a valid value.
        unsafe { value.assume_init() }
    }

    /// Copies the NUL-terminated string at `at` (at most `N - 1` bytes, NUL-padded):
    /// unlike a fixed-size copy, never reads past the string's end.
    #[inline(always)]
    fn get_str<const N: usize>(&mut self, at: u64) -> [u8; N] {
        let mut value = [0u8; N];
        // SAFETY: bpf_probe_read_kernel_str checks the address itself and writes at most
        // N bytes into the buffer, which holds N.
        let ret = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
                value.as_mut_ptr().cast(),
                N as u32,
                at as *const core::ffi::c_void,
            )
        };
        self.failed |= (ret as u64) >> 63;
        value
    }

    /// Copies `len` bytes (at most `N`) from `at` into `dst`.
    #[inline(always)]
    fn copy<const N: usize>(&mut self, dst: &mut [u8; N], at: u64, len: u32) {
        // Clamped where the verifier sees it: the helper's size must be provably within
        // the destination.
        let len = if len > N as u32 { N as u32 } else { len };
        // SAFETY: bpf_probe_read_kernel checks the source address itself and writes at
        // most `len` <= N bytes into `dst`, which holds N.
        let ret = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                dst.as_mut_ptr().cast(),
                len,
                at as *const core::ffi::c_void,
            )
        };
        self.failed |= (ret as u64) >> 63;
    }

    /// Counts this program run in `crd_stats` if any read failed.
    #[inline(always)]
    fn report(&self) -> bool {
        if self.failed != 0 {
            bump(STAT_READ_FAILED);
            return true;
        }
        false
    }
}

/// Loads the field at `base + offset` directly.
///
/// `base` must be a BTF-typed kernel pointer (the iterator's `task` or `file`, or a
/// pointer field loaded from one this way), and `offset` a frozen `.rodata` constant:
/// the verifier then checks the load against the kernel's BTF (a field of that size at
/// that offset) and emits a load that yields 0 instead of faulting. A NULL `base` is
/// tolerated the same way.
#[inline(always)]
fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: see above: the verifier only accepts this load when BTF says a `T`-sized
    // field lives there, and the JIT makes a bad address read as 0, never fault.
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// The thread group of `task` if userspace asked for it.
#[inline(always)]
fn wanted(task: *const u8, off: &Offsets) -> Option<u32> {
    if task.is_null() {
        return None;
    }
    let tgid: u32 = load(task, off.task_tgid);
    (match_all() || crd_tgids.get_ptr(tgid).is_some()).then_some(tgid)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub extern "C" fn crd_task(ctx: *const TaskCtx) -> i32 {
    // SAFETY: the kernel passes a valid context; `task` is NULL on the final call.
    let task = unsafe { (*ctx).task };
    let off = config();
    let Some(tgid) = wanted(task, off) else { return 0 };
    let parent: *const u8 = load(task, off.task_real_parent);
    let mut r = Reader { failed: 0 };
    let record = TaskRecord {
        kind: RECORD_TASK,
        pid: load(task, off.task_pid),
        tgid,
        parent_tgid: load(parent, off.task_tgid),
        files: load::<*const u8>(task, off.task_files) as u64,
        // An array: BTF-checked loads are one scalar each, so this one is copied.
        comm: r.get::<[u8; COMM_LEN]>(task as u64, off.task_comm),
    };
    if r.report() {
        warn!(ctx, "crd_task: a kernel read failed for thread {} of {}", record.pid, tgid);
    }
    emit(record)
}

/// The fd program for kernels with `bpf_loop` (5.17+): walks epolls of up to
/// [`Config::epoll_max_items`](crd_common::Config) items.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn crd_task_file(ctx: *const TaskFileCtx) -> i32 {
    task_file::<true>(ctx)
}

/// The fd program for kernels without `bpf_loop` (5.10-5.16), which reject a program
/// that merely names a callback: walks epolls of up to
/// [`EPOLL_BOUNDED_ITEMS`](crd_common::EPOLL_BOUNDED_ITEMS) items.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn crd_task_file_bounded(ctx: *const TaskFileCtx) -> i32 {
    task_file::<false>(ctx)
}

/// One fd's record. `LOOP`: walk epolls with `bpf_loop` (see [`anon`]).
#[inline(always)]
fn task_file<const LOOP: bool>(ctx: *const TaskFileCtx) -> i32 {
    // SAFETY: the kernel passes a valid context; `task` and `file` are NULL on the
    // final call.
    let (task, fd, file) = unsafe { ((*ctx).task, (*ctx).fd, (*ctx).file) };
    let off = config();
    let Some(tgid) = wanted(task, off) else { return 0 };
    if file.is_null() {
        return 0;
    }
    let files: *const u8 = load(task, off.task_files);
    let mut r = Reader { failed: 0 };
    let cloexec = close_on_exec(&mut r, files, fd, off);
    let table = Table { tgid, pid: load(task, off.task_pid), files: files as u64 };
    fd_record::<LOOP, false>(&mut r, Windows::NONE, table, fd, file, cloexec, ctx)
}

/// The fd table a record belongs to, as [`FdRecord`] names it.
#[derive(Clone, Copy)]
struct Table {
    tgid: u32,
    pid: u32,
    files: u64,
}

/// Sends the record of fd `fd` of `table`, open on `file`; returns 1 if the ring was full
/// (the caller retries this fd later), else 0.
///
/// `WALK = false`: `file` is the task_file iterator's BTF-typed pointer, and every field
/// of the file, inode, superblock and pipe is a direct load. `WALK = true` (from
/// [`walk::crd_task_walk`]): `file` was copied out of the fd array, a plain number to the
/// verifier, so every field is copied, those of the common structs from the spans of
/// `windows` (one copy per struct), and nothing is logged (`ctx` is NULL); the kinds'
/// reads are the same code either way, so the records are the same.
#[inline(always)]
fn fd_record<const LOOP: bool, const WALK: bool>(
    r: &mut Reader,
    windows: Windows,
    table: Table,
    fd: u32,
    file: *const u8,
    cloexec: bool,
    ctx: *const TaskFileCtx,
) -> i32 {
    let off = config();
    let Table { tgid, pid, files } = table;
    let sock = if WALK { core::ptr::null() } else { early_sock(file, off) };
    windows.fill(r, WINDOW_FILE, file);
    let inode: *const u8 = field::<_, WALK>(r, windows, WINDOW_FILE, file, off.file_f_inode);
    windows.fill(r, WINDOW_INODE, inode);
    let sb: *const u8 = field::<_, WALK>(r, windows, WINDOW_INODE, inode, off.inode_i_sb);
    windows.fill(r, WINDOW_SB, sb);
    let i_mode = field::<u16, WALK>(r, windows, WINDOW_INODE, inode, off.inode_i_mode) as u32;
    let sb_magic: u64 = field::<_, WALK>(r, windows, WINDOW_SB, sb, off.sb_s_magic);
    let mut common = FdRecord {
        kind: RECORD_FD,
        fd,
        tgid,
        pid,
        files,
        file: file as u64,
        inode: inode as u64,
        pos: field::<_, WALK>(r, windows, WINDOW_FILE, file, off.file_f_pos),
        // The task_file iterator holds a reference to the file while its program runs,
        // which its records count (and userspace takes off); the walk holds none, so it
        // counts that one in: the records are the same.
        file_refs: field::<i64, WALK>(r, windows, WINDOW_FILE, file, off.file_f_ref) + WALK as i64,
        ino: field::<_, WALK>(r, windows, WINDOW_INODE, inode, off.inode_i_ino),
        size: field::<_, WALK>(r, windows, WINDOW_INODE, inode, off.inode_i_size),
        sb_magic,
        f_flags: field::<_, WALK>(r, windows, WINDOW_FILE, file, off.file_f_flags),
        f_mode: field::<_, WALK>(r, windows, WINDOW_FILE, file, off.file_f_mode),
        i_mode,
        s_dev: field::<_, WALK>(r, windows, WINDOW_SB, sb, off.sb_s_dev),
        i_rdev: field::<_, WALK>(r, windows, WINDOW_INODE, inode, off.inode_i_rdev),
        flags: 0,
        tail: TAIL_NONE,
        _pad: 0,
    };
    if cloexec {
        common.flags |= FD_CLOEXEC;
    }
    // Each kind's tail: only the fields of that kind, read only for that kind.
    let pushed = if i_mode & S_IFMT == S_IFSOCK && sb_magic == SOCKFS_MAGIC && kind_enabled(KIND_SOCKET) {
        // Only sockfs: a socket file bound in another filesystem, opened with O_PATH,
        // has no `struct socket` behind it.
        common.tail = TAIL_SOCKET;
        emit_socket::<WALK>(r, windows, common, file, sock, off, ctx)
    } else if i_mode & S_IFMT == S_IFIFO {
        // `i_pipe` shares a union with `i_cdev`, `i_link` and `i_dir_seq`: it means a
        // pipe only when the inode is a FIFO.
        common.tail = TAIL_PIPE;
        let pipe: *const u8 = field::<_, WALK>(r, windows, WINDOW_INODE, inode, off.inode_i_pipe);
        windows.fill(r, WINDOW_PIPE, pipe);
        let tail = pipe_tail::<WALK>(r, windows, pipe, off);
        report(r, ctx, tgid, fd);
        emit(FdWith { common, tail })
    } else if kind_enabled(KIND_NAMED) && is_named(sb_magic, i_mode) {
        let named = named_tail::<WALK>(r, windows, file, inode, sb_magic, off);
        if sb_magic == ANON_INODE_FS_MAGIC && kind_enabled(KIND_EVENTFD) && is_eventfd(&named.name) {
            common.tail = TAIL_EVENTFD;
            let tail = eventfd_tail(r, named, off);
            report(r, ctx, tgid, fd);
            emit(FdWith { common, tail })
        } else if let Some(pushed) = (sb_magic == ANON_INODE_FS_MAGIC)
            .then(|| anon::emit_anon::<LOOP>(r, common, named, off, ctx))
            .flatten()
        {
            pushed
        } else {
            common.tail = TAIL_NAMED;
            report(r, ctx, tgid, fd);
            emit(FdWith { common, tail: named })
        }
    } else {
        report(r, ctx, tgid, fd);
        emit(common)
    };
    pushed
}

/// Where [`fd_record`] with `WALK` finds the spans of the structs it copies whole
/// ([`Config::windows`](crd_common::Config)): the slot of `crd_windows`.
#[derive(Clone, Copy)]
struct Windows {
    slot: *mut [[u8; WINDOW_BYTES as usize]; WINDOW_COUNT],
}

impl Windows {
    /// For the direct-load path, which copies nothing.
    const NONE: Self = Self { slot: core::ptr::null_mut() };

    /// The span of `which` of the config.
    #[inline(always)]
    fn span(which: usize) -> Window {
        // SAFETY: CRD_CONFIG is a valid static; `which` < WINDOW_COUNT at every call
        // (a constant); as in `config`.
        unsafe { core::ptr::read_volatile(&raw const CRD_CONFIG.windows[which]) }
    }

    /// Copies the span of struct `which` at `base` into its slot (zeros for a NULL
    /// `base`, as a direct load through NULL would read).
    #[inline(always)]
    fn fill(self, r: &mut Reader, which: usize, base: *const u8) {
        if self.slot.is_null() {
            return;
        }
        let span = Self::span(which);
        // SAFETY: `slot` is the map value `crd_windows` gave (see `crd_task_walk`);
        // `which` < WINDOW_COUNT.
        let dst = unsafe { &mut (*self.slot)[which] };
        if base.is_null() {
            *dst = [0; WINDOW_BYTES as usize];
            return;
        }
        r.copy(dst, base as u64 + span.start as u64, span.len);
    }
}

/// The field of struct `which` (`WINDOW_*`, or [`NO_WINDOW`]) at `base + offset`: with
/// `WALK`, from the copied span if it holds the field, else copied alone (0 for a NULL
/// `base`); without, a direct load.
#[inline(always)]
fn field<T: Copy, const WALK: bool>(r: &mut Reader, windows: Windows, which: usize, base: *const u8, offset: u32) -> T {
    if !WALK {
        return load(base, offset);
    }
    let size = core::mem::size_of::<T>() as u32;
    if which < WINDOW_COUNT && !windows.slot.is_null() {
        let span = Windows::span(which);
        if offset >= span.start && offset + size <= span.start + span.len && span.len <= WINDOW_BYTES {
            // SAFETY: the slot holds WINDOW_BYTES bytes per struct, and the span's
            // bytes from `offset - start` hold the field (checked just above); an
            // unaligned read of an integer or pointer, any bytes of which are a value.
            return unsafe {
                core::ptr::read_unaligned(
                    (*windows.slot)[which].as_ptr().add((offset - span.start) as usize).cast::<T>(),
                )
            };
        }
    }
    if base.is_null() {
        // SAFETY: only integers and pointers are read, for which zero is a value.
        return unsafe { core::mem::zeroed() };
    }
    r.get(base as u64, offset)
}

/// [`field`] of a struct no window spans.
const NO_WINDOW: usize = usize::MAX;

/// Counts (and logs) a failed kernel read of this program run.
#[inline(always)]
fn report(r: &Reader, ctx: *const TaskFileCtx, tgid: u32, fd: u32) {
    // No `ctx` (the walk's callback): counted only; the count voids the harvest anyway.
    if r.report() && !ctx.is_null() {
        warn!(ctx, "crd_task_file: a kernel read failed for pid {} fd {}", tgid, fd);
    }
}

/// Files whose name says what they are: anon-inode files (`[eventfd]`, `[eventpoll]`...)
/// and regular files on shmem (a memfd is `memfd:NAME`).
#[inline(always)]
fn is_named(sb_magic: u64, i_mode: u32) -> bool {
    sb_magic == ANON_INODE_FS_MAGIC
        || (i_mode & S_IFMT == S_IFREG && (sb_magic == TMPFS_MAGIC || sb_magic == HUGETLBFS_MAGIC))
}

#[inline(always)]
fn is_eventfd(name: &[u8; NAME_LEN]) -> bool {
    name[..9] == *b"[eventfd]" && name[9] == 0
}

/// The name, private object and (for shmem) seals of an anon or shmem file.
#[inline(always)]
fn named_tail<const WALK: bool>(
    r: &mut Reader,
    windows: Windows,
    file: *const u8,
    inode: *const u8,
    sb_magic: u64,
    off: &Offsets,
) -> NamedTail {
    let dentry: *const u8 = field::<_, WALK>(r, windows, WINDOW_FILE, file, off.file_dentry);
    // `const unsigned char *`: BTF types the pointer, not the bytes, so they are copied.
    let name = field::<*const u8, WALK>(r, windows, NO_WINDOW, dentry, off.dentry_name) as u64;
    let mut tail = NamedTail {
        private_data: field::<*const u8, WALK>(r, windows, WINDOW_FILE, file, off.file_private_data) as u64,
        name: r.get_str(name),
        seals: 0,
        _pad: 0,
    };
    if sb_magic != ANON_INODE_FS_MAGIC && kind_enabled(KIND_SHMEM) {
        // The inode is embedded in its `shmem_inode_info` (container_of): BTF cannot
        // type a step backwards from it, so the seals are copied.
        let info = (inode as u64).wrapping_sub(off.shmem_vfs_inode as u64);
        tail.seals = r.get(info, off.shmem_seals);
    }
    tail
}

/// An eventfd's counter and flags, from its `eventfd_ctx` (`private_data`, untyped).
#[inline(always)]
fn eventfd_tail(r: &mut Reader, named: NamedTail, off: &Offsets) -> EventfdTail {
    EventfdTail {
        named,
        count: r.get(named.private_data, off.eventfd_count),
        flags: r.get(named.private_data, off.eventfd_flags),
        _pad: 0,
    }
}

/// Pushes a socket's record, its tail filled in place in the ring buffer: at 184 bytes,
/// a tail built on the stack and copied would take a good part of the program's 512.
/// The one place sockets are emitted, so the verifier walks these reads once.
#[inline(always)]
fn emit_socket<const WALK: bool>(
    r: &mut Reader,
    windows: Windows,
    common: FdRecord,
    file: *const u8,
    sock: *const u8,
    off: &Offsets,
    ctx: *const TaskFileCtx,
) -> i32 {
    let Some(mut entry) = crd_events.reserve::<FdWith<SocketTail>>(0) else {
        bump(STAT_RING_FULL);
        return 1;
    };
    let slot = entry.as_mut_ptr();
    // SAFETY: `slot` points to the reserved, 8-aligned record, all of it ours until
    // submit. The tail's fields before the name are zeroed as 8-byte words, and the
    // name is left as it is (its bytes past `name_len` are unspecified): written as a
    // whole `SocketTail`, the 108-byte, 4-aligned name compiles to a byte-at-a-time loop
    // of ~500 instructions that every socket's record would run.
    let record = unsafe {
        core::ptr::write(&raw mut (*slot).common, common);
        let words = (&raw mut (*slot).tail).cast::<u64>();
        for i in 0..SOCKET_FIELD_WORDS {
            core::ptr::write_volatile(words.add(i), 0);
        }
        (*slot).tail.name_len = 0;
        &mut *slot
    };
    if !WALK && kind_enabled(KIND_SOCKET_TYPED) {
        typed_socket_tail(r, &mut record.tail, sock, off);
    } else {
        socket_tail::<WALK>(r, windows, &mut record.tail, file, off);
    }
    report(r, ctx, common.tgid, common.fd);
    entry.submit(0);
    bump(STAT_SUBMITTED);
    0
}

/// [`SocketTail`]'s fields before `name_len` and `name`, in 8-byte words.
const SOCKET_FIELD_WORDS: usize = core::mem::offset_of!(SocketTail, name_len) / 8;
const _: () = assert!(core::mem::offset_of!(SocketTail, name_len) % 8 == 0);

/// A socket file's `struct sock` (NULL for any other file, or where the kernel lacks the
/// typed socket helpers), asked for first thing: the `struct socket` sits on a cache
/// line of its own, and its load depends only on the file (already in cache), so issued
/// before the inode's fields its miss overlaps theirs instead of following them. For any
/// other file it costs one helper call that compares `f_op`.
#[inline(always)]
fn early_sock(file: *const u8, off: &Offsets) -> *const u8 {
    if !kind_enabled(KIND_SOCKET_TYPED) {
        return core::ptr::null();
    }
    // SAFETY: `file` is the iterator's BTF-typed, non-NULL `struct file *`, the helper's
    // one argument; it returns the file's `struct socket` or NULL, and reads nothing else.
    let socket = unsafe { bpf_sock_from_file(file as *mut _) } as *const u8;
    if socket.is_null() {
        return core::ptr::null();
    }
    load(socket, off.socket_sk)
}

/// A socket's `struct sock` and its family's fields, through the BTF-typed pointers
/// `bpf_sock_from_file` and `bpf_skc_to_unix_sock` return (5.11, 5.16): every field of
/// the `socket`, `sock` and `unix_sock` is then a direct load, checked against BTF at
/// load time. Two helper calls replace [`socket_tail`]'s dozen `bpf_probe_read_kernel`
/// calls, which made a socket's record cost twice a pipe's. Only what BTF cannot type
/// is still copied: a bound name (a flexible array). What is left of a socket's cost is
/// cache misses on its `sock`: fields used only by some sockets are read only for them.
///
/// Called only where userspace found both helpers in this kernel's `enum bpf_func_id`
/// (`KIND_SOCKET_TYPED`): on other kernels the branch is dead, and the verifier removes
/// it before it would reject the unknown helpers.
#[inline(always)]
fn typed_socket_tail(r: &mut Reader, tail: &mut SocketTail, sk: *const u8, off: &Offsets) {
    // NULL for a socket being released: its record says no more than TAIL_NONE.
    if sk.is_null() {
        return;
    }
    let family: u16 = load(sk, off.sock_family);
    tail.sock = sk as u64;
    tail.family = family;
    let state: u8 = load(sk, off.sock_state);
    tail.state = state;
    tail.protocol = load(sk, off.sock_protocol);
    tail.shutdown = load(sk, off.sock_shutdown);
    // Meaningful for listeners only (userspace ignores them otherwise), and a cache
    // line of their own: most of a socket's cost is the cache misses on its `sock`.
    if state == SK_STATE_LISTEN {
        tail.backlog = load(sk, off.sock_max_ack_backlog);
        tail.pending = load(sk, off.sock_ack_backlog);
    }
    let sock_type: u16 = load(sk, off.sock_type);
    tail.sock_type = sock_type;
    if family == AF_UNIX && (state == SK_STATE_LISTEN || sock_type != SOCK_STREAM) {
        tail.rqueue = load(sk, off.sock_rqueue_len);
    }
    if family == AF_UNIX {
        // SAFETY: `sk` is a BTF-typed `struct sock *` loaded from the socket; the helper
        // returns it typed as `struct unix_sock *` if it is a full unix socket, else NULL.
        let unix = unsafe { bpf_skc_to_unix_sock(sk as *mut _) } as *const u8;
        if unix.is_null() {
            return;
        }
        // The peer's identity is its address; userspace maps it to the peer's inode.
        tail.peer = load::<*const u8>(unix, off.unix_peer) as u64;
        let addr: *const u8 = load(unix, off.unix_addr);
        if !addr.is_null() {
            let len: u32 = load(addr, off.unix_address_len);
            tail.name_len = len;
            // `sun_path` follows the 2-byte `sun_family` (uapi, fixed); `len` counts both.
            let path = addr as u64 + off.unix_address_name as u64 + 2;
            r.copy(&mut tail.name, path, len.saturating_sub(2));
        }
    } else if family == AF_INET || family == AF_INET6 {
        tail.local_port = load(sk, off.sock_num);
        tail.remote_port = u16::from_be(load(sk, off.sock_dport));
        if family == AF_INET6 {
            // 16-byte arrays: two 8-byte loads each (BTF allows any load inside an
            // array of bytes).
            tail.local_addr = in6_addr(sk, off.sock_v6_rcv_saddr);
            tail.remote_addr = in6_addr(sk, off.sock_v6_daddr);
        } else {
            let local: u32 = load(sk, off.sock_rcv_saddr);
            let remote: u32 = load(sk, off.sock_daddr);
            tail.local_addr[..4].copy_from_slice(&local.to_ne_bytes());
            tail.remote_addr[..4].copy_from_slice(&remote.to_ne_bytes());
        }
    }
}

/// The 16 bytes of the `struct in6_addr` at `base + offset`, with two direct loads.
#[inline(always)]
fn in6_addr(base: *const u8, offset: u32) -> [u8; 16] {
    let high: u64 = load(base, offset);
    let low: u64 = load(base, offset + 8);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_ne_bytes());
    bytes[8..].copy_from_slice(&low.to_ne_bytes());
    bytes
}

/// A socket's `struct sock` and its family's fields, copied field by field: the path
/// for kernels without the typed socket helpers (5.10).
///
/// `file->private_data` is `void *` to BTF, so from the `struct socket` on every field
/// is copied with `bpf_probe_read_kernel` (`bpf_rdonly_cast` would type it, from 6.2
/// on). The family's fields are read only for that family: a `unix_sock` member read
/// from another family's sock would be a pointer into nowhere.
#[inline(always)]
fn socket_tail<const WALK: bool>(
    r: &mut Reader,
    windows: Windows,
    tail: &mut SocketTail,
    file: *const u8,
    off: &Offsets,
) {
    let socket = field::<*const u8, WALK>(r, windows, WINDOW_FILE, file, off.file_socket) as u64;
    if socket == 0 {
        return;
    }
    let sk: u64 = r.get(socket, off.socket_sk);
    // NULL only for a socket being released: its record says no more than TAIL_NONE.
    if sk == 0 {
        return;
    }
    windows.fill(r, WINDOW_SOCK, sk as *const u8);
    windows.fill(r, WINDOW_SOCK_TYPE, sk as *const u8);
    let family: u16 = copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_family);
    tail.sock = sk;
    tail.family = family;
    tail.state = copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_state);
    tail.sock_type = copied::<_, WALK>(r, windows, WINDOW_SOCK_TYPE, sk, off.sock_type);
    tail.protocol = copied::<_, WALK>(r, windows, WINDOW_SOCK_TYPE, sk, off.sock_protocol);
    tail.shutdown = copied::<_, WALK>(r, windows, WINDOW_SOCK_TYPE, sk, off.sock_shutdown);
    if tail.state == SK_STATE_LISTEN {
        tail.backlog = r.get(sk, off.sock_max_ack_backlog);
        tail.pending = r.get(sk, off.sock_ack_backlog);
    }
    if family == AF_UNIX && (tail.state == SK_STATE_LISTEN || tail.sock_type != SOCK_STREAM) {
        tail.rqueue = r.get(sk, off.sock_rqueue_len);
    }
    if family == AF_UNIX {
        // `struct unix_sock` starts with its `struct sock`: the same pointer.
        windows.fill(r, WINDOW_UNIX, sk as *const u8);
        // The peer's identity is its address; userspace maps it to the peer's inode.
        tail.peer = copied::<_, WALK>(r, windows, WINDOW_UNIX, sk, off.unix_peer);
        let addr: u64 = copied::<_, WALK>(r, windows, WINDOW_UNIX, sk, off.unix_addr);
        if addr != 0 {
            let len: u32 = r.get(addr, off.unix_address_len);
            tail.name_len = len;
            // `sun_path` follows the 2-byte `sun_family` (uapi, fixed); `len` counts both.
            let path = addr + off.unix_address_name as u64 + 2;
            r.copy(&mut tail.name, path, len.saturating_sub(2));
        }
    } else if family == AF_INET || family == AF_INET6 {
        tail.local_port = copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_num);
        tail.remote_port = u16::from_be(copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_dport));
        if family == AF_INET6 {
            tail.local_addr = copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_v6_rcv_saddr);
            tail.remote_addr = copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_v6_daddr);
        } else {
            let local: [u8; 4] = copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_rcv_saddr);
            let remote: [u8; 4] = copied::<_, WALK>(r, windows, WINDOW_SOCK, sk, off.sock_daddr);
            tail.local_addr[..4].copy_from_slice(&local);
            tail.remote_addr[..4].copy_from_slice(&remote);
        }
    }
}

/// A field of a socket's `sock` at `base + offset`, copied: with `WALK` from the span of
/// `which` if it holds the field ([`field`]), else alone (the path of kernels without
/// the typed socket helpers, which fills no spans).
#[inline(always)]
fn copied<T: Copy, const WALK: bool>(r: &mut Reader, windows: Windows, which: usize, base: u64, offset: u32) -> T {
    if WALK { field::<T, true>(r, windows, which, base as *const u8, offset) } else { r.get(base, offset) }
}

/// Tests `fd`'s bit in `files->fdt->close_on_exec`, copying the bitmap word only when
/// this CPU's cached one is another.
#[inline(always)]
fn close_on_exec(r: &mut Reader, files: *const u8, fd: u32, off: &Offsets) -> bool {
    let fdt: *const u8 = load(files, off.files_fdt);
    // `unsigned long *`: BTF types the pointer but not what it points to.
    let bitmap = load::<*const u8>(fdt, off.fdtable_close_on_exec) as u64;
    if bitmap == 0 {
        return false;
    }
    let index = fd / 64;
    let bit = 1u64 << (fd % 64);
    let Some(cache) = crd_cloexec.get_ptr_mut(0) else {
        return r.get::<u64>(bitmap, index * 8) & bit != 0;
    };
    // SAFETY: the pointer comes from a successful lookup of this CPU's slot, which only
    // this program touches, and the program does not migrate while it runs.
    let cache = unsafe { &mut *cache };
    if cache.bitmap != bitmap || cache.index != index {
        let bits: u64 = r.get(bitmap, index * 8);
        *cache = CloexecWord { bitmap, index, _pad: 0, bits };
    }
    cache.bits & bit != 0
}

/// The pipe's bookkeeping and, if it holds data, the sum of its occupied buffers'
/// lengths.
#[inline(always)]
fn pipe_tail<const WALK: bool>(r: &mut Reader, windows: Windows, pipe: *const u8, off: &Offsets) -> PipeTail {
    let mut tail = PipeTail {
        pipe: pipe as u64,
        max_usage: field::<_, WALK>(r, windows, WINDOW_PIPE, pipe, off.pipe_max_usage),
        readers: field::<_, WALK>(r, windows, WINDOW_PIPE, pipe, off.pipe_readers),
        writers: field::<_, WALK>(r, windows, WINDOW_PIPE, pipe, off.pipe_writers),
        queued: 0,
        flags: 0,
        _pad: 0,
    };
    let head: u32 = field::<_, WALK>(r, windows, WINDOW_PIPE, pipe, off.pipe_head);
    let tail_index: u32 = field::<_, WALK>(r, windows, WINDOW_PIPE, pipe, off.pipe_tail);
    let ring_size: u32 = field::<_, WALK>(r, windows, WINDOW_PIPE, pipe, off.pipe_ring_size);
    let bufs = field::<*const u8, WALK>(r, windows, WINDOW_PIPE, pipe, off.pipe_bufs) as u64;
    let used = head.wrapping_sub(tail_index);
    // An empty pipe (the common case) needs no walk: 0 bytes queued.
    if pipe.is_null() || used == 0 || ring_size == 0 || bufs == 0 {
        return tail;
    }
    let mask = ring_size - 1;
    let buffer_size = setting(&raw const CRD_CONFIG.pipe_buffer_size) as u64;
    let mut queued: u32 = 0;
    // Branch-free on purpose: a fixed count of slots, each read whether in use or not
    // (every slot below ring_size is allocated) and counted only if in use. A loop that
    // breaks on `used` or branches on each read's result makes older verifiers (6.1)
    // walk every path and give up at 1M instructions.
    for i in 0..MAX_PIPE_BUFS_WALKED {
        let slot = (tail_index.wrapping_add(i) & mask) as u64;
        let len_at = bufs + slot * buffer_size + off.pipe_buffer_len as u64;
        let len: u32 = r.get(len_at, 0);
        let in_use = (i.wrapping_sub(used) >> 31) & 1; // 1 when i < used
        queued = queued.wrapping_add(len.wrapping_mul(in_use));
    }
    if used > MAX_PIPE_BUFS_WALKED {
        tail.flags |= PIPE_QUEUE_TRUNCATED;
    }
    tail.queued = queued;
    tail
}

/// Pushes one record; on a full ring, pauses the iteration (return 1) so the same
/// element is retried after userspace drains the ring.
#[inline(always)]
fn emit<T: Copy + 'static>(record: T) -> i32 {
    match crd_events.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(0);
            bump(STAT_SUBMITTED);
            0
        }
        None => {
            bump(STAT_RING_FULL);
            1
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";
