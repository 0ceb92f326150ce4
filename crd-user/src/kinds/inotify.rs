//! inotify: a group of watches, each on one inode, with the events queued for reading.
//!
//! - Recognised by its anon-inode name `inotify`; its object is the `fsnotify_group`
//!   (`file->private_data`).
//! - State: each watch's descriptor, mask and inode, and the inode as a path crd can
//!   reopen. fdinfo gives each watch as `inotify wd:N ino:I sdev:D mask:M
//!   ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:HEX`; BPF does not walk the
//!   group's marks, so a BPF harvest reads the fd's fdinfo too
//!   ([`FileKind::fdinfo_pending`]). The file handle is opened with `open_by_handle_at`
//!   (CAP_DAC_READ_SEARCH) through a mount of the filesystem `sdev` names, found in the
//!   target's `/proc/PID/mountinfo`, and its path read back from `/proc/self/fd`, as CRIU
//!   does.
//! - Restore: `inotify_init1(IN_CLOEXEC)`, then for each watch in wd order
//!   `INOTIFY_IOC_SETNEXTWD` (CONFIG_CHECKPOINT_RESTORE) so the watch gets its old wd,
//!   and `inotify_add_watch(path, mask | IN_DONT_FOLLOW)` (the path is the watched inode
//!   itself, never a link to follow). IN_NONBLOCK is the description's O_NONBLOCK.
//! - Not kept: events queued and not yet read. Reading them would take them from the
//!   target, so they cannot be copied; `FIONREAD` on a `pidfd_getfd` copy tells how many
//!   bytes wait, which `ls` shows (`queued=N`) and the checkpoint warns about. The image
//!   does not hold the count: a restored inotify starts with an empty queue;
//!   a watch whose inode has no path any more (deleted) is refused at restore, and a path
//!   that no longer exists at restore fails it, naming the path.
use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use serde::{Deserialize, Serialize};

use super::{FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Reach, Recognise};
use crate::{
    sys::{self, SyscallError},
    types::Tgid,
};

pub struct Inotify;

/// `INOTIFY_IOC_SETNEXTWD`: `_IOW('I', 0, __u32)` (include/uapi/linux/inotify.h).
const INOTIFY_IOC_SETNEXTWD: libc::Ioctl = 0x4004_4900_u32 as libc::Ioctl;

/// One watch as the kernel shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub wd: i32,
    pub ino: u64,
    /// The filesystem's device, in the kernel's encoding (major << 20 | minor).
    pub sdev: u32,
    pub mask: u32,
    pub ignored_mask: u32,
    /// Where the watched inode is, as crd found it through its file handle (None: it
    /// could not, e.g. the inode was deleted).
    pub path: Option<String>,
}

/// What a harvest reads of an inotify: None until its fdinfo is read (BPF).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InotifyLive {
    pub watches: Option<Vec<Watch>>,
    /// Bytes of events queued and not read (FIONREAD on a copy of the fd; None: the
    /// copy could not be taken).
    pub queued: Option<usize>,
}

/// What an image holds of an inotify.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyState {
    /// By wd.
    pub watches: Vec<Watch>,
    /// Bytes of events queued at harvest time, for `ls`: not in the image, since
    /// restore cannot queue them again (see the module doc).
    #[serde(skip)]
    pub queued: Option<usize>,
}

impl FileKind for Inotify {
    const NAME: &'static str = "inotify";
    const IDENTITY: Identity = Identity::Private;
    type Live = InotifyLive;
    type Saved = InotifyState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC) && r.name == Some("inotify")
    }

    fn from_bpf(_record: &crd_common::FdRecord, _tail: &[u8]) -> Option<InotifyLive> {
        Some(InotifyLive { watches: None, queued: None })
    }

    fn from_proc(slot: &ProcSlot<'_>) -> InotifyLive {
        let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", slot.tgid.0)).unwrap_or_default();
        let mut watches: Vec<Watch> =
            slot.fdinfo.lines().filter_map(|l| parse_watch(l, slot.tgid, &mounts)).collect();
        watches.sort_by_key(|w| w.wd);
        // Best effort, as `ls` freezes nothing: a process that is gone or not ours to
        // reach shows no count.
        let queued = sys::pidfd_open(crate::types::Pid(slot.tgid.0))
            .and_then(|pidfd| sys::pidfd_getfd(pidfd.as_fd(), slot.fd))
            .and_then(sys::pipe_queued)
            .ok();
        InotifyLive { watches: Some(watches), queued }
    }

    fn fdinfo_pending(live: &InotifyLive) -> bool {
        live.watches.is_none()
    }

    fn sketch(live: &InotifyLive) -> InotifyState {
        InotifyState { watches: live.watches.clone().unwrap_or_default(), queued: live.queued }
    }

    fn save(live: &InotifyLive, reach: &Reach<'_>) -> Result<InotifyState, KindError> {
        let copy = sys::pidfd_getfd(reach.pidfd, reach.fd)?;
        let queued = sys::pipe_queued(&copy)?;
        if queued != 0 {
            log::warn!(
                "PID {} fd {} (inotify): {queued} bytes of events queued and not read are not saved",
                reach.tgid,
                reach.fd
            );
        }
        Ok(InotifyState { queued: Some(queued), ..Self::sketch(live) })
    }

    fn detail(saved: &InotifyState) -> Option<String> {
        let watches: Vec<String> = saved
            .watches
            .iter()
            .map(|w| {
                let path = w.path.clone().unwrap_or_else(|| format!("(ino {} unreachable)", w.ino));
                format!("wd={} {path} {}", w.wd, mask_names(w.mask))
            })
            .collect();
        let watches = if watches.is_empty() { "no watches".into() } else { watches.join(", ") };
        Some(match saved.queued {
            Some(n) if n > 0 => format!("{watches} queued={n}"),
            _ => watches,
        })
    }

    fn refusal(saved: &InotifyState) -> Option<String> {
        let lost: Vec<String> = saved
            .watches
            .iter()
            .filter(|w| w.path.is_none())
            .map(|w| format!("wd={} (ino {})", w.wd, w.ino))
            .collect();
        (!lost.is_empty()).then(|| {
            format!("the inode of watch {} had no path at checkpoint time (deleted?)", lost.join(", "))
        })
    }

    fn open(
        saved: &InotifyState,
        args: &OpenArgs<'_>,
        _store: &mut ObjectStore,
    ) -> Result<Opened, KindError> {
        if let Some(why) = Self::refusal(saved) {
            return Err(KindError::Other(why));
        }
        if !args.first {
            return Err(KindError::Other(
                "a second open file description of one inotify cannot be made (an inotify cannot be reopened)".into(),
            ));
        }
        // SAFETY: plain syscall with an integer argument.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(SyscallError::last("inotify_init1").into());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        for w in &saved.watches {
            let path = w.path.as_deref().ok_or(KindError::NoPath)?;
            let cpath =
                CString::new(path).map_err(|_| KindError::Other(format!("{path:?} holds a NUL byte")))?;
            // Without CONFIG_CHECKPOINT_RESTORE this fails (ENOTTY): the wd check below
            // then says whether the kernel's own numbering happened to agree.
            let next = w.wd as u32;
            // SAFETY: the ioctl reads one u32 argument, passed by value as the kernel's
            // inotify_ioctl expects (`arg` is the number itself).
            unsafe { libc::ioctl(fd.as_raw_fd(), INOTIFY_IOC_SETNEXTWD, next as libc::c_ulong) };
            // SAFETY: `cpath` is a NUL-terminated string alive for the call.
            let wd = unsafe {
                libc::inotify_add_watch(fd.as_raw_fd(), cpath.as_ptr(), w.mask | libc::IN_DONT_FOLLOW)
            };
            if wd < 0 {
                let err = std::io::Error::last_os_error();
                return Err(match err.raw_os_error() {
                    Some(libc::ENOENT) => KindError::Gone(path.to_string()),
                    _ => SyscallError { call: "inotify_add_watch", source: err }.into(),
                });
            }
            if wd != w.wd {
                return Err(KindError::Other(format!(
                    "watch {path} came back as wd {wd}, not {} (a kernel without CONFIG_CHECKPOINT_RESTORE, or two watches on one inode)",
                    w.wd
                )));
            }
        }
        Ok(Opened { fd, fresh: true })
    }

    fn same(a: &InotifyState, b: &InotifyState) -> Result<(), String> {
        let key =
            |s: &InotifyState| s.watches.iter().map(|w| (w.wd, w.mask, w.path.clone())).collect::<Vec<_>>();
        if key(a) != key(b) {
            return Err(format!("inotify watches {:?} vs {:?}", key(a), key(b)));
        }
        Ok(())
    }
}

/// One `inotify wd:...` fdinfo line, its inode found by its file handle.
fn parse_watch(line: &str, tgid: Tgid, mounts: &str) -> Option<Watch> {
    let rest = line.strip_prefix("inotify ")?;
    let field = |name: &str| rest.split_whitespace().find_map(|f| f.strip_prefix(name)?.strip_prefix(':'));
    let hex = |name: &str| field(name).and_then(|v| u64::from_str_radix(v, 16).ok());
    let wd = field("wd")?.parse().ok()?;
    let sdev = hex("sdev")? as u32;
    let handle_type = field("fhandle-type").and_then(|v| i32::from_str_radix(v, 16).ok());
    let handle = field("f_handle").and_then(decode_hex);
    let path = match (handle_type, handle) {
        (Some(t), Some(h)) => resolve(tgid, mounts, sdev, t, &h),
        _ => None,
    };
    Some(Watch {
        wd,
        ino: hex("ino")?,
        sdev,
        mask: hex("mask")? as u32,
        ignored_mask: hex("ignored_mask").unwrap_or(0) as u32,
        path,
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The path of the inode a file handle names, opened through a mount of its filesystem
/// (the kernel's `sdev`) in the target's mount table; a mount of the filesystem's root
/// first, so that directories reconnect to a full path.
fn resolve(tgid: Tgid, mounts: &str, sdev: u32, handle_type: i32, handle: &[u8]) -> Option<String> {
    let dev = format!("{}:{}", sdev >> 20, sdev & 0xf_ffff);
    let mut candidates: Vec<(bool, &str)> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(2) != Some(&dev.as_str()) {
                return None;
            }
            Some((f.get(3) != Some(&"/"), *f.get(4)?))
        })
        .collect();
    candidates.sort();
    candidates.into_iter().find_map(|(_, mount_point)| {
        let mount = std::fs::File::open(format!("/proc/{}/root{}", tgid.0, unescape(mount_point))).ok()?;
        let fd = open_by_handle(&mount, handle_type, handle)?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        let path = path.to_str()?;
        (!path.ends_with(" (deleted)") && path.starts_with('/')).then(|| path.to_string())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = s.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn open_by_handle(mount: &std::fs::File, handle_type: i32, handle: &[u8]) -> Option<OwnedFd> {
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }, in a
    // u32 buffer for its alignment.
    let mut buf = vec![0u32; 2 + handle.len().div_ceil(4)];
    buf[0] = handle.len() as u32;
    buf[1] = handle_type as u32;
    // SAFETY: `buf` has room for `handle.len()` bytes after its two header words; the
    // regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(handle.as_ptr(), buf.as_mut_ptr().add(2).cast::<u8>(), handle.len())
    };
    // SAFETY: `buf` is a valid struct file_handle of `handle.len()` bytes, alive for the
    // call; the kernel only reads it.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            buf.as_mut_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    // SAFETY: a non-negative return is a new fd that nothing else owns.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// `IN_CREATE|IN_DELETE`, as inotify.h names the bits.
fn mask_names(mask: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (libc::IN_ACCESS, "IN_ACCESS"),
        (libc::IN_MODIFY, "IN_MODIFY"),
        (libc::IN_ATTRIB, "IN_ATTRIB"),
        (libc::IN_CLOSE_WRITE, "IN_CLOSE_WRITE"),
        (libc::IN_CLOSE_NOWRITE, "IN_CLOSE_NOWRITE"),
        (libc::IN_OPEN, "IN_OPEN"),
        (libc::IN_MOVED_FROM, "IN_MOVED_FROM"),
        (libc::IN_MOVED_TO, "IN_MOVED_TO"),
        (libc::IN_CREATE, "IN_CREATE"),
        (libc::IN_DELETE, "IN_DELETE"),
        (libc::IN_DELETE_SELF, "IN_DELETE_SELF"),
        (libc::IN_MOVE_SELF, "IN_MOVE_SELF"),
        (libc::IN_EXCL_UNLINK, "IN_EXCL_UNLINK"),
        (libc::IN_ONESHOT, "IN_ONESHOT"),
    ];
    let mut names: Vec<String> =
        NAMES.iter().filter(|(bit, _)| mask & bit != 0).map(|(_, n)| n.to_string()).collect();
    let rest = NAMES.iter().fold(mask, |m, (bit, _)| m & !bit);
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    if names.is_empty() { "0".into() } else { names.join("|") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_line_parses_and_its_mask_reads_as_inotify_h_names_it() {
        let line = "inotify wd:2 ino:3c4a7 sdev:fe00000 mask:300 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000";
        let w = parse_watch(line, Tgid(1), "").expect("a watch");
        assert_eq!((w.wd, w.ino, w.sdev, w.mask, w.path), (2, 0x3c4a7, 0xfe0_0000, 0x300, None));
        assert_eq!(mask_names(w.mask), "IN_CREATE|IN_DELETE");
        assert_eq!(mask_names(0x8000_0002), "IN_MODIFY|IN_ONESHOT");
        assert!(parse_watch("pos: 0", Tgid(1), "").is_none());
        assert_eq!(unescape("/a\\040b"), "/a b");
    }
}
