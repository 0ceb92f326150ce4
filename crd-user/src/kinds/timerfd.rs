//! timerfd: a kernel timer (`struct timerfd_ctx`) on one clock, read as a count of
//! expirations.
//!
//! - Recognised by its anon-inode name `[timerfd]`; its object is the `timerfd_ctx`
//!   (`file->private_data`), as an eventfd's is its `eventfd_ctx`.
//! - The BPF harvester reads `timerfd_ctx` itself ([`crd_common::TimerfdTail`]: clock,
//!   ticks, settime flags, interval, and the time left: the hrtimer's expiry minus its
//!   clock's current time, which BPF gets as CLOCK_MONOTONIC plus the clock base's
//!   offset, the sum the hrtimer code itself compares expiries with). The /proc harvester
//!   reads fdinfo (`clockid:`, `ticks:`, `settime flags:`, `it_value: (s, ns)`,
//!   `it_interval: (s, ns)`), which the kernel computes the same way. Where this
//!   kernel's BTF lacks a field BPF reads, the BPF harvester reads fdinfo too.
//! - `save` (targets frozen) reads again, through a `pidfd_getfd` copy: a
//!   `timerfd_gettime` first, because an interval timer that expired counts only its
//!   first expiration (fdinfo `ticks: 1`, `it_value: (0, 0)`) until someone reads or
//!   asks it: gettime forwards it, adding the missed intervals to the ticks without
//!   consuming them (as the process's own gettime would), then fdinfo shows the true
//!   count and the next expiry. The remaining time keeps running while the target is
//!   frozen.
//! - An absolute timer (TFD_TIMER_ABSTIME) is saved as its deadline on its clock (now +
//!   remaining) and re-armed with TFD_TIMER_ABSTIME, so a CLOCK_REALTIME or
//!   CLOCK_BOOTTIME timer keeps its original deadline across the restore (a
//!   CLOCK_MONOTONIC deadline means the same only within one boot). A relative timer
//!   resumes with the time that remained at checkpoint.
//! - Restore: `timerfd_create(clock, TFD_CLOEXEC)` (a clock the kernel refuses, such as
//!   CLOCK_REALTIME_ALARM without CAP_WAKE_ALARM, is a one-line error), then
//!   `timerfd_settime` with the settime flags, then the unread expirations with
//!   `TFD_IOC_SET_TICKS`, which exists only with CONFIG_CHECKPOINT_RESTORE: without it
//!   the count is lost, with a warning. TFD_NONBLOCK is the description's O_NONBLOCK,
//!   restored with its flags. A timerfd cannot be reopened, so only one description per
//!   object can be made.
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::{FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Reach, Recognise};
use crate::sys::SyscallError;

pub struct Timerfd;

/// `TFD_TIMER_ABSTIME` (include/uapi/linux/timerfd.h).
const TFD_TIMER_ABSTIME: u32 = 1;
/// `TFD_TIMER_CANCEL_ON_SET`.
const TFD_TIMER_CANCEL_ON_SET: u32 = 2;
/// `TFD_IOC_SET_TICKS`: `_IOW('T', 0, __u64)`.
const TFD_IOC_SET_TICKS: libc::Ioctl = ((1u32 << 30) | (8 << 16) | ((b'T' as u32) << 8)) as libc::Ioctl;

const NS: u64 = 1_000_000_000;

/// What fdinfo says of a timerfd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimerfdLive {
    pub clock: i32,
    /// Expirations not yet read (see the module doc: 1 for a lapsed interval timer
    /// until it is read or asked).
    pub ticks: u64,
    /// TFD_TIMER_* given to the last `timerfd_settime`.
    pub settime_flags: u32,
    /// Time to the next expiry (0: disarmed, or expired).
    pub remaining_ns: u64,
    pub interval_ns: u64,
}

/// What an image holds of a timerfd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerfdState {
    /// `CLOCK_*`.
    pub clock: i32,
    /// TFD_TIMER_ABSTIME: `value_ns` is a deadline on the clock.
    pub abstime: bool,
    /// TFD_TIMER_CANCEL_ON_SET (CLOCK_REALTIME with TFD_TIMER_ABSTIME only).
    pub cancel_on_set: bool,
    /// 0: disarmed. A relative timer: the time that remained at checkpoint; an absolute
    /// one: its deadline on the clock.
    pub value_ns: u64,
    /// The time that remained at checkpoint (what `ls` shows).
    pub remaining_ns: u64,
    pub interval_ns: u64,
    /// Expirations not yet read.
    pub ticks: u64,
}

/// The fields of a timerfd's fdinfo; None if it is not one.
pub fn parse_fdinfo(slot: &ProcSlot<'_>) -> Option<TimerfdLive> {
    let pair = |name: &str| -> Option<u64> {
        let v = slot.field(name)?.strip_prefix('(')?.strip_suffix(')')?;
        let (s, ns) = v.split_once(',')?;
        s.trim().parse::<u64>().ok()?.checked_mul(NS)?.checked_add(ns.trim().parse().ok()?)
    };
    Some(TimerfdLive {
        clock: slot.field("clockid")?.parse().ok()?,
        ticks: slot.field("ticks")?.parse().ok()?,
        settime_flags: u32::from_str_radix(slot.field("settime flags")?, 8).ok()?,
        remaining_ns: pair("it_value")?,
        interval_ns: pair("it_interval")?,
    })
}

/// `/proc/TGID/fdinfo/FD` as a [`ProcSlot`] would show it (for the BPF harvester).
pub(crate) fn read_fdinfo(tgid: u32, fd: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{tgid}/fdinfo/{fd}")).ok()
}

fn slot_of<'a>(tgid: u32, fd: u32, fdinfo: &'a str) -> ProcSlot<'a> {
    ProcSlot {
        tgid: crate::types::Tgid(tgid),
        fd: crate::types::Fd(fd),
        fdinfo,
        link: "anon_inode:[timerfd]",
        size: 0,
        rdev: crate::types::DeviceId { major: 0, minor: 0 },
        socket: None,
    }
}

/// The current time on `clock`, in ns.
fn now_on(clock: i32) -> Result<u64, SyscallError> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(SyscallError::last("clock_gettime"));
    }
    Ok(ts.tv_sec as u64 * NS + ts.tv_nsec as u64)
}

fn timespec(ns: u64) -> libc::timespec {
    // `as _`: time_t's width differs between libcs (musl).
    libc::timespec { tv_sec: (ns / NS) as _, tv_nsec: (ns % NS) as _ }
}

/// A clock's name as `<time.h>` spells it, without `CLOCK_`.
pub fn clock_name(clock: i32) -> String {
    match clock {
        libc::CLOCK_REALTIME => "REALTIME".into(),
        libc::CLOCK_MONOTONIC => "MONOTONIC".into(),
        libc::CLOCK_BOOTTIME => "BOOTTIME".into(),
        libc::CLOCK_REALTIME_ALARM => "REALTIME_ALARM".into(),
        libc::CLOCK_BOOTTIME_ALARM => "BOOTTIME_ALARM".into(),
        other => format!("clock{other}"),
    }
}

/// A duration as `ls` shows it: seconds with the ms (`1.500s`).
fn seconds(ns: u64) -> String {
    format!("{}.{:03}s", ns / NS, ns % NS / 1_000_000)
}

impl TimerfdState {
    fn from_live(live: &TimerfdLive) -> Result<Self, SyscallError> {
        let abstime = live.settime_flags & TFD_TIMER_ABSTIME != 0;
        // An armed interval timer that has just expired shows no remaining time (the
        // race `save` narrows): its next expiry is an interval away.
        let remaining = match (live.remaining_ns, live.interval_ns) {
            (0, interval) => interval,
            (remaining, _) => remaining,
        };
        let value_ns = if remaining != 0 && abstime { now_on(live.clock)? + remaining } else { remaining };
        Ok(TimerfdState {
            clock: live.clock,
            abstime,
            cancel_on_set: live.settime_flags & TFD_TIMER_CANCEL_ON_SET != 0,
            value_ns,
            remaining_ns: remaining,
            interval_ns: live.interval_ns,
            ticks: live.ticks,
        })
    }

    fn settime_flags(&self) -> i32 {
        (if self.abstime { libc::TFD_TIMER_ABSTIME } else { 0 })
            | (if self.cancel_on_set { TFD_TIMER_CANCEL_ON_SET as i32 } else { 0 })
    }
}

/// `timerfd_gettime` on `fd`: forwards a lapsed interval timer (see the module doc).
fn gettime(fd: &OwnedFd) -> Result<(), KindError> {
    let mut value = libc::itimerspec { it_interval: timespec(0), it_value: timespec(0) };
    // SAFETY: timerfd_gettime writes one itimerspec to a valid pointer; fd is live.
    if unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut value) } != 0 {
        return Err(SyscallError::last("timerfd_gettime").into());
    }
    Ok(())
}

impl FileKind for Timerfd {
    const NAME: &'static str = "timerfd";
    const IDENTITY: Identity = Identity::Private;
    type Live = TimerfdLive;
    type Saved = TimerfdState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC) && r.name == Some("[timerfd]")
    }

    /// From the timerfd tail; without one (fields missing from this kernel's BTF), from
    /// the fd's fdinfo, None if gone since or unreadable (the fd is then listed as an
    /// opaque anon file).
    fn from_bpf(record: &crd_common::FdRecord, tail: &[u8]) -> Option<TimerfdLive> {
        if record.tail == crd_common::TAIL_TIMERFD {
            let tail: crd_common::TimerfdTail = super::tail(tail)?;
            return Some(TimerfdLive {
                clock: tail.clockid,
                ticks: tail.ticks,
                settime_flags: tail.settime_flags as u32,
                remaining_ns: tail.remaining_ns.max(0) as u64,
                interval_ns: tail.interval_ns.max(0) as u64,
            });
        }
        let fdinfo = read_fdinfo(record.tgid, record.fd)?;
        parse_fdinfo(&slot_of(record.tgid, record.fd, &fdinfo))
    }

    fn from_proc(slot: &ProcSlot<'_>) -> TimerfdLive {
        parse_fdinfo(slot).unwrap_or_default()
    }

    fn sketch(live: &TimerfdLive) -> TimerfdState {
        TimerfdState::from_live(live).unwrap_or_else(|e| {
            // Only `ls` and graft sketch; an image's state comes from `save`, which fails.
            log::warn!(
                "{e}: the deadline of an absolute timer on CLOCK_{} is unknown",
                clock_name(live.clock)
            );
            TimerfdState::from_live(&TimerfdLive { settime_flags: 0, ..live.clone() }).unwrap_or_default()
        })
    }

    fn save(_live: &TimerfdLive, reach: &Reach<'_>) -> Result<TimerfdState, KindError> {
        let copy = crate::sys::pidfd_getfd(reach.pidfd, reach.fd)?;
        let own = std::process::id();
        let mut live = TimerfdLive::default();
        // gettime, then one fdinfo snapshot (read under the timer's lock). If the timer
        // expires between the two, the snapshot shows no remaining time: ask again.
        for _ in 0..3 {
            gettime(&copy)?;
            let fd = copy.as_raw_fd() as u32;
            let fdinfo = read_fdinfo(own, fd).ok_or_else(|| KindError::Gone(format!("fdinfo of fd {fd}")))?;
            live = parse_fdinfo(&slot_of(own, fd, &fdinfo))
                .ok_or_else(|| KindError::Other("its fdinfo is not a timerfd's".into()))?;
            if live.remaining_ns != 0 || live.interval_ns == 0 {
                break;
            }
        }
        Ok(TimerfdState::from_live(&live)?)
    }

    fn detail(saved: &TimerfdState) -> Option<String> {
        let mut out = format!("clock={}", clock_name(saved.clock));
        if saved.value_ns == 0 {
            out.push_str(" disarmed");
        } else {
            out.push_str(&format!(" next={}", seconds(saved.remaining_ns)));
        }
        if saved.interval_ns != 0 {
            out.push_str(&format!(" interval={}", seconds(saved.interval_ns)));
        }
        out.push_str(&format!(" ticks={}", saved.ticks));
        if saved.abstime {
            out.push_str(" abstime");
        }
        if saved.cancel_on_set {
            out.push_str(" cancel-on-set");
        }
        Some(out)
    }

    fn open(
        saved: &TimerfdState,
        args: &OpenArgs<'_>,
        _store: &mut ObjectStore,
    ) -> Result<Opened, KindError> {
        if !args.first {
            return Err(KindError::Other(
                "a second open file description of one timerfd cannot be made (a timerfd cannot be reopened)"
                    .into(),
            ));
        }
        // SAFETY: plain syscall with integer arguments.
        let raw = unsafe { libc::timerfd_create(saved.clock, libc::TFD_CLOEXEC) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            let what_to_do = match e.raw_os_error() {
                Some(libc::EPERM) => "; alarm clocks need CAP_WAKE_ALARM: restore as root",
                Some(libc::EINVAL) => "; this kernel does not have that clock",
                _ => "",
            };
            return Err(KindError::Other(format!(
                "the kernel refuses a timerfd on CLOCK_{}: {e}{what_to_do}",
                clock_name(saved.clock)
            )));
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let value =
            libc::itimerspec { it_interval: timespec(saved.interval_ns), it_value: timespec(saved.value_ns) };
        // SAFETY: fd is live, `value` a valid itimerspec, the old value is not asked for.
        if unsafe {
            libc::timerfd_settime(fd.as_raw_fd(), saved.settime_flags(), &value, std::ptr::null_mut())
        } != 0
        {
            return Err(SyscallError::last("timerfd_settime").into());
        }
        if saved.ticks != 0 {
            // settime cleared the count; an absolute deadline already past has fired
            // since: add what it counted.
            let own = std::process::id();
            let since = read_fdinfo(own, raw as u32)
                .and_then(|info| parse_fdinfo(&slot_of(own, raw as u32, &info)))
                .map_or(0, |l| l.ticks);
            let ticks = saved.ticks.saturating_add(since);
            // SAFETY: TFD_IOC_SET_TICKS reads one u64 from a valid pointer; fd is live.
            if unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } != 0 {
                let e = std::io::Error::last_os_error();
                log::warn!(
                    "this kernel cannot set a timerfd's expiration count (TFD_IOC_SET_TICKS needs CONFIG_CHECKPOINT_RESTORE: {e}): {} unread expirations are lost",
                    saved.ticks
                );
            }
        }
        Ok(Opened { fd, fresh: true })
    }

    /// The timer's settings must match; the remaining time may only have shrunk (it
    /// keeps running) and the unread expirations only grown.
    fn same(a: &TimerfdState, b: &TimerfdState) -> Result<(), String> {
        let settings = |s: &TimerfdState| (s.clock, s.abstime, s.cancel_on_set, s.interval_ns);
        if settings(a) != settings(b) {
            return Err(format!("timerfd {a:?} vs {b:?}"));
        }
        if b.ticks < a.ticks {
            return Err(format!("timerfd ticks {} vs {}", a.ticks, b.ticks));
        }
        let expired = b.ticks > a.ticks;
        if (a.value_ns == 0) != (b.value_ns == 0) && !expired {
            return Err(format!("timerfd armed {} vs {}", a.value_ns != 0, b.value_ns != 0));
        }
        if !a.abstime && b.remaining_ns > a.remaining_ns && !expired {
            return Err(format!("timerfd remaining {} ns vs {} ns", a.remaining_ns, b.remaining_ns));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(fdinfo: &str) -> ProcSlot<'_> {
        slot_of(1, 3, fdinfo)
    }

    #[test]
    fn fdinfo_of_6_18_parses() {
        let info = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\nclockid: 0\nticks: 4\nsettime flags: 03\nit_value: (99, 935692241)\nit_interval: (0, 100000000)\n";
        assert_eq!(
            parse_fdinfo(&slot(info)),
            Some(TimerfdLive {
                clock: 0,
                ticks: 4,
                settime_flags: 3,
                remaining_ns: 99 * NS + 935_692_241,
                interval_ns: 100_000_000
            })
        );
        assert_eq!(parse_fdinfo(&slot("pos:\t0\neventfd-count: 1\n")), None);
    }

    #[test]
    fn detail_names_clock_next_interval_and_ticks() {
        let s = TimerfdState {
            clock: libc::CLOCK_MONOTONIC,
            value_ns: 1_500_000_000,
            remaining_ns: 1_500_000_000,
            interval_ns: 250_000_000,
            ticks: 3,
            ..Default::default()
        };
        assert_eq!(
            Timerfd::detail(&s).as_deref(),
            Some("clock=MONOTONIC next=1.500s interval=0.250s ticks=3")
        );
    }

    #[test]
    fn set_ticks_is_iow_t_0_u64() {
        assert_eq!(TFD_IOC_SET_TICKS, 0x4008_5400);
    }
}
