//! The anon-inode kinds whose state BPF reads from their private object (beyond the
//! eventfd's counter): a timerfd's `timerfd_ctx`, a signalfd's mask, and an epoll's
//! interest list, walked item by item.
//!
//! Everything past `file->private_data` (`void *` to BTF) is copied with
//! `bpf_probe_read_kernel` at offsets from [`crate::config`].
//!
//! **The epoll walk.** `eventpoll::rbr` is a red-black tree of `epitem`s ordered as
//! fdinfo lists them. The program walks it in order (from the cached leftmost node: the
//! successor is the right child's leftmost descendant, or the first ancestor reached
//! from its left child) as a small state machine, one edge per step, so that one step's
//! code serves every iteration: with `bpf_loop` (5.17+) the verifier checks it once, in
//! a callback; without it (5.10-5.16) a loop of [`EPOLL_BOUNDED_ITEMS`] items' worth of
//! steps is checked step by step. The walk's state lives in a per-CPU map slot, never on
//! the stack: its values are then unknown to the verifier, which must check every branch
//! of a step (6.1 checks a callback once, with the caller's stack as it is at the call:
//! constants there would let it prune branches the walk needs later).
//!
//! Each item is one [`EpollItemRecord`], pushed as it is visited, then the epoll's own
//! record says how many were sent. A full ring ends the walk and the program returns 1:
//! the kernel retries the same fd after userspace drains the ring, and the walk starts
//! over, its records superseding the earlier ones by index
//! (`crd-user/src/harvest/bpf.rs`). The walk is read-only and takes no lock (`ep->mtx`
//! guards the tree; items are freed after an RCU grace period, and the iterator runs
//! under `rcu_read_lock`): a checkpoint's targets are frozen, so the tree holds still,
//! but whatever looks torn (a node that is not its parent's child, a failed read, more
//! steps than the items allow) ends the walk as [`EPOLL_WALK_TORN`] and userspace reads
//! fdinfo instead; more items than the bound, [`EPOLL_WALK_TRUNCATED`], likewise.
use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
use crd_common::{
    EPOLL_BOUNDED_ITEMS, EPOLL_STEPS_PER_ITEM, EPOLL_WALK_COMPLETE, EPOLL_WALK_TORN, EPOLL_WALK_TRUNCATED,
    EpollItemRecord, EpollTail, FdRecord, FdWith, KIND_EPOLL, KIND_SIGNALFD, KIND_TIMERFD, NAME_LEN,
    NamedTail, Offsets, RECORD_EPOLL_ITEM, STAT_RING_FULL, STAT_SUBMITTED, SignalfdTail, TAIL_EPOLL,
    TAIL_SIGNALFD, TAIL_TIMERFD, TimerfdTail,
};

use crate::{Reader, TaskFileCtx, bump, config, crd_events, emit, kind_enabled, report, setting};

/// `CLOCK_REALTIME_ALARM`, `CLOCK_BOOTTIME_ALARM`: timerfds on these use the `alarm`
/// member of `timerfd_ctx::t` (`isalarm()` in fs/timerfd.c).
const CLOCK_REALTIME_ALARM: i32 = 8;
const CLOCK_BOOTTIME_ALARM: i32 = 9;

/// A walk's state (see the module documentation).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EpollWalk {
    /// The `rb_node` the walk stands on.
    node: u64,
    /// The `struct eventpoll *`, copied into each item record.
    epoll: u64,
    /// Items sent so far.
    count: u32,
    /// `DOWN`, `VISIT` or `UP`.
    mode: u32,
    /// 0 while walking, then `EPOLL_WALK_*` or [`RING_FULL`].
    status: u32,
    /// Items to send at most.
    max: u32,
}

#[map]
#[allow(non_upper_case_globals)]
static crd_epoll_walk: PerCpuArray<EpollWalk> = PerCpuArray::with_max_entries(1, 0);

/// Going down left children to the leftmost node of a subtree.
const DOWN: u32 = 0;
/// Sending the node's item, then going to its right subtree or up.
const VISIT: u32 = 1;
/// Climbing out of a subtree whose nodes were all sent.
const UP: u32 = 2;
/// [`EpollWalk::status`]: the ring was full (not an `EPOLL_WALK_*`: the walk is retried).
const RING_FULL: u32 = 0xff;

/// The record of an anon file whose kind this module reads; None: not one of them (or
/// its fields are missing on this kernel), the caller sends the name tail.
#[inline(always)]
pub fn emit_anon<const LOOP: bool>(
    r: &mut Reader,
    mut common: FdRecord,
    named: NamedTail,
    off: &Offsets,
    ctx: *const TaskFileCtx,
) -> Option<i32> {
    if kind_enabled(KIND_TIMERFD) && named_as(&named.name, b"[timerfd]") {
        common.tail = TAIL_TIMERFD;
        let tail = timerfd_tail(r, named, off);
        report(r, ctx, common.tgid, common.fd);
        return Some(emit(FdWith { common, tail }));
    }
    if kind_enabled(KIND_SIGNALFD) && named_as(&named.name, b"[signalfd]") {
        common.tail = TAIL_SIGNALFD;
        let tail = SignalfdTail { named, sigmask_inverted: r.get(named.private_data, off.signalfd_sigmask) };
        report(r, ctx, common.tgid, common.fd);
        return Some(emit(FdWith { common, tail }));
    }
    if kind_enabled(KIND_EPOLL) && named_as(&named.name, b"[eventpoll]") {
        report(r, ctx, common.tgid, common.fd);
        return Some(emit_epoll::<LOOP>(common, named, off));
    }
    None
}

/// Whether the dentry name is exactly `want`.
#[inline(always)]
fn named_as<const N: usize>(name: &[u8; NAME_LEN], want: &[u8; N]) -> bool {
    N < NAME_LEN && name[..N] == *want && name[N] == 0
}

/// A timerfd's settings and the time left on its timer, as its fdinfo shows them.
///
/// fdinfo computes the time left as the timer's expiry minus its clock's current time
/// (`base->get_time()`). BPF can read CLOCK_MONOTONIC only (`bpf_ktime_get_ns`), but
/// every hrtimer clock base keeps its offset from CLOCK_MONOTONIC (`offs_real`,
/// `offs_boot`, `offs_tai`: what the hrtimer code itself adds to decide what has
/// expired), so the time on any timer's clock is monotonic time plus its base's offset.
#[inline(always)]
fn timerfd_tail(r: &mut Reader, named: NamedTail, off: &Offsets) -> TimerfdTail {
    let ctx = named.private_data;
    let clockid: i32 = r.get(ctx, off.timerfd_clockid);
    let alarm = clockid == CLOCK_REALTIME_ALARM || clockid == CLOCK_BOOTTIME_ALARM;
    let (expires_at, base_at) = if alarm {
        (off.timerfd_alarm_expires, off.timerfd_alarm_base)
    } else {
        (off.timerfd_tmr_expires, off.timerfd_tmr_base)
    };
    let expires: i64 = r.get(ctx, expires_at);
    let base: u64 = r.get(ctx, base_at);
    // A timer never armed since its last setup has a base too (hrtimer_init sets it);
    // only a torn read leaves none.
    let offset: i64 = if base != 0 { r.get(base, off.hrtimer_base_offset) } else { 0 };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() } as i64;
    let remaining = expires.wrapping_sub(offset).wrapping_sub(now);
    TimerfdTail {
        named,
        ticks: r.get(ctx, off.timerfd_ticks),
        interval_ns: r.get(ctx, off.timerfd_tintv),
        // Disarmed (an expiry of 0) or expired: 0, as fdinfo says.
        remaining_ns: if remaining < 0 { 0 } else { remaining },
        clockid,
        settime_flags: r.get(ctx, off.timerfd_settime_flags),
        expired: r.get(ctx, off.timerfd_expired),
    }
}

/// Walks the epoll's items (each sent as a record), then sends the epoll's own record.
/// Returns 1 (retry this fd) if the ring filled on the way.
#[inline(always)]
fn emit_epoll<const LOOP: bool>(mut common: FdRecord, named: NamedTail, off: &Offsets) -> i32 {
    let (walk, items) = walk::<LOOP>(named.private_data, off);
    if walk == RING_FULL {
        return 1;
    }
    common.tail = TAIL_EPOLL;
    emit(FdWith { common, tail: EpollTail { named, items, walk } })
}

/// The walk's outcome (`EPOLL_WALK_*` or [`RING_FULL`]) and the items it sent.
#[inline(always)]
fn walk<const LOOP: bool>(epoll: u64, off: &Offsets) -> (u32, u32) {
    let Some(state) = crd_epoll_walk.get_ptr_mut(0) else {
        return (EPOLL_WALK_TORN, 0);
    };
    let mut r = Reader { failed: 0 };
    let leftmost: u64 = r.get(epoll, off.eventpoll_leftmost);
    if r.failed != 0 {
        return (EPOLL_WALK_TORN, 0);
    }
    if leftmost == 0 {
        return (EPOLL_WALK_COMPLETE, 0);
    }
    let configured = setting(&raw const crate::CRD_CONFIG.epoll_max_items);
    let max = if LOOP || configured < EPOLL_BOUNDED_ITEMS { configured } else { EPOLL_BOUNDED_ITEMS };
    let steps = max * EPOLL_STEPS_PER_ITEM + 8;
    let start = EpollWalk { node: leftmost, epoll, count: 0, mode: VISIT, status: 0, max };
    // SAFETY: the pointer comes from a successful lookup of this CPU's slot, which only
    // this program touches, and the program does not migrate while it runs.
    unsafe { core::ptr::write_volatile(state, start) };
    if LOOP {
        // SAFETY: bpf_loop calls `walk_step` at most `steps` times with a NULL context;
        // the callback finds the state in the map itself.
        unsafe {
            aya_ebpf::helpers::generated::bpf_loop(
                steps,
                walk_step as *mut core::ffi::c_void,
                core::ptr::null_mut(),
                0,
            )
        };
    } else {
        for _ in 0..EPOLL_BOUNDED_ITEMS * EPOLL_STEPS_PER_ITEM + 8 {
            // SAFETY: as above.
            if !step(unsafe { &mut *state }, off) {
                break;
            }
        }
    }
    // SAFETY: as above.
    let done = unsafe { core::ptr::read_volatile(state) };
    match done.status {
        0 if done.count >= max => (EPOLL_WALK_TRUNCATED, done.count),
        // Out of steps before out of items: the tree is not what it seemed.
        0 => (EPOLL_WALK_TORN, done.count),
        status => (status, done.count),
    }
}

/// `bpf_loop`'s callback: one step of the walk; 1 ends the loop.
#[inline(never)]
extern "C" fn walk_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(state) = crd_epoll_walk.get_ptr_mut(0) else { return 1 };
    // SAFETY: as in `walk`: this CPU's slot, touched by this program only.
    if step(unsafe { &mut *state }, config()) { 0 } else { 1 }
}

/// One edge of the in-order walk (or one item sent). False: the walk is over, its
/// outcome in `status`.
///
/// Every field of the state is read and written volatile: kept in registers, the
/// verifier would know their values in the loop without `bpf_loop` and check one path
/// per count of items sent so far, which grows with the square of the bound.
#[inline(always)]
fn step(state: &mut EpollWalk, off: &Offsets) -> bool {
    let mut r = Reader { failed: 0 };
    let node = get(&state.node);
    let mode = get(&state.mode);
    let (next, next_mode, status) = if mode == VISIT {
        let count = get(&state.count);
        if count >= get(&state.max) {
            (node, mode, EPOLL_WALK_TRUNCATED)
        } else if !emit_item(&mut r, node, count, get(&state.epoll), off) {
            (node, mode, RING_FULL)
        } else {
            set(&mut state.count, count + 1);
            let right: u64 = r.get(node, off.rb_right);
            if right != 0 { (right, DOWN, 0) } else { (node, UP, 0) }
        }
    } else if mode == DOWN {
        let left: u64 = r.get(node, off.rb_left);
        if left != 0 { (left, DOWN, 0) } else { (node, VISIT, 0) }
    } else {
        // The parent shares its word with the node's colour (the low bits).
        let parent = r.get::<u64>(node, off.rb_parent_color) & !3;
        if parent == 0 {
            (node, mode, EPOLL_WALK_COMPLETE)
        } else if r.get::<u64>(parent, off.rb_left) == node {
            (parent, VISIT, 0)
        } else if r.get::<u64>(parent, off.rb_right) == node {
            (parent, UP, 0)
        } else {
            (node, mode, EPOLL_WALK_TORN)
        }
    };
    let status = if r.failed != 0 && status != RING_FULL { EPOLL_WALK_TORN } else { status };
    set(&mut state.node, next);
    set(&mut state.mode, next_mode);
    set(&mut state.status, status);
    status == 0
}

/// Reads a field of the walk's state (see [`step`] for why volatile).
#[inline(always)]
fn get<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is valid and aligned for reads.
    unsafe { core::ptr::read_volatile(field) }
}

/// Writes a field of the walk's state (see [`step`] for why volatile).
#[inline(always)]
fn set<T: Copy>(field: &mut T, value: T) {
    // SAFETY: a mutable reference is valid and aligned for writes.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// Sends the item of `node` (its `epitem::rbn`) as record number `index`. False: the
/// ring is full.
#[inline(always)]
fn emit_item(r: &mut Reader, node: u64, index: u32, epoll: u64, off: &Offsets) -> bool {
    let Some(mut entry) = crd_events.reserve::<EpollItemRecord>(0) else {
        bump(STAT_RING_FULL);
        return false;
    };
    let item = node.wrapping_sub(off.epitem_rbn as u64);
    let file: u64 = r.get(item, off.epitem_file);
    let inode: u64 = r.get(file, off.file_f_inode);
    let sb: u64 = r.get(inode, off.inode_i_sb);
    entry.write(EpollItemRecord {
        kind: RECORD_EPOLL_ITEM,
        index,
        epoll,
        file,
        data: r.get(item, off.epitem_data),
        file_refs: r.get(file, off.file_f_ref),
        ino: r.get(inode, off.inode_i_ino),
        fd: r.get(item, off.epitem_fd),
        events: r.get(item, off.epitem_events),
        s_dev: r.get(sb, off.sb_s_dev),
        _pad: 0,
    });
    entry.submit(0);
    bump(STAT_SUBMITTED);
    true
}
