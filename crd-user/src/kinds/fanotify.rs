//! fanotify: a notification group on mounts, filesystems or inodes (`struct
//! fsnotify_group`), listed with its fdinfo and not recreated yet.
//!
//! - Recognised by its anon-inode name `[fanotify]`; its object is the group
//!   (`file->private_data`), as an inotify's is.
//! - State, from fdinfo (BPF does not walk the group, so a BPF harvest reads the fd's
//!   fdinfo too, as for inotify: [`FileKind::fdinfo_pending`]): `fanotify flags:F
//!   event-flags:E` (the `fanotify_init` flags less FAN_CLOEXEC and FAN_NONBLOCK, which
//!   are the description's own; the open flags of the fds its events carry), and one
//!   line per mark (`fanotify ino:I sdev:D mflags:M mask:M ignored_mask:M ...`, or
//!   `fanotify mnt_id:N ...`, `fanotify sdev:D ...` for a mount or filesystem mark).
//!   `ls` and `inspect` show the flags by name and the marks by count, so a user sees
//!   what the group watches before deciding what to do with it.
//! - Restore refuses it, naming the fd (marks on mounts and filesystems, permission
//!   events answered by the original process: not made yet); `graft` hands the live one
//!   over, as for any kind crd lists but does not make.
use serde::{Deserialize, Serialize};

use super::{
    FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Recognise, not_supported,
};

pub struct Fanotify;

/// What a harvest reads of a fanotify group: None until its fdinfo is read (BPF).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FanotifyLive {
    pub state: Option<FanotifyState>,
}

/// What an image holds of a fanotify group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanotifyState {
    /// fdinfo `fanotify flags:` (FAN_CLASS_*, FAN_REPORT_*, FAN_UNLIMITED_*...).
    pub flags: u32,
    /// fdinfo `event-flags:`: the open flags (O_RDONLY, O_LARGEFILE...) of the fds its
    /// events carry.
    pub event_flags: u32,
    /// Each mark as fdinfo shows it, without its `fanotify ` prefix.
    pub marks: Vec<String>,
}

/// `fanotify_init` flags (include/uapi/linux/fanotify.h) beside the class.
const FLAG_NAMES: &[(u32, &str)] = &[
    (0x10, "FAN_UNLIMITED_QUEUE"),
    (0x20, "FAN_UNLIMITED_MARKS"),
    (0x40, "FAN_ENABLE_AUDIT"),
    (0x80, "FAN_REPORT_PIDFD"),
    (0x100, "FAN_REPORT_TID"),
    (0x200, "FAN_REPORT_FID"),
    (0x400, "FAN_REPORT_DIR_FID"),
    (0x800, "FAN_REPORT_NAME"),
    (0x1000, "FAN_REPORT_TARGET_FID"),
    (0x2000, "FAN_REPORT_FD_ERROR"),
    (0x4000, "FAN_REPORT_MNT"),
];

/// `FAN_CLASS_NOTIF|FAN_REPORT_FID`: the class (bits 2-3), then the other flags by
/// name, then what has no name in hex.
pub fn flag_names(flags: u32) -> String {
    let class = match flags & 0xc {
        0 => "FAN_CLASS_NOTIF",
        0x4 => "FAN_CLASS_CONTENT",
        0x8 => "FAN_CLASS_PRE_CONTENT",
        _ => "FAN_CLASS_0xc",
    };
    let mut names = vec![class.to_string()];
    names.extend(FLAG_NAMES.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| n.to_string()));
    let rest = FLAG_NAMES.iter().fold(flags & !0xc, |f, (bit, _)| f & !bit);
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    names.join("|")
}

/// The group's state from its fdinfo; None if the fdinfo has no `fanotify flags:` line.
pub fn parse_fdinfo(fdinfo: &str) -> Option<FanotifyState> {
    let mut state = None;
    let mut marks = Vec::new();
    for line in fdinfo.lines() {
        let Some(rest) = line.strip_prefix("fanotify ") else { continue };
        if let Some(flags) = rest.strip_prefix("flags:") {
            // fanotify flags:10 event-flags:8000
            let mut words = flags.split_whitespace();
            let flags = u32::from_str_radix(words.next()?, 16).ok()?;
            let event_flags = words
                .next()
                .and_then(|w| w.strip_prefix("event-flags:"))
                .and_then(|e| u32::from_str_radix(e, 16).ok())?;
            state = Some((flags, event_flags));
        } else {
            marks.push(rest.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    let (flags, event_flags) = state?;
    Some(FanotifyState { flags, event_flags, marks })
}

impl FileKind for Fanotify {
    const NAME: &'static str = "fanotify";
    const IDENTITY: Identity = Identity::Private;
    type Live = FanotifyLive;
    type Saved = FanotifyState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC) && r.name == Some("[fanotify]")
    }

    fn from_bpf(_record: &crd_common::FdRecord, _tail: &[u8]) -> Option<FanotifyLive> {
        Some(FanotifyLive { state: None })
    }

    fn from_proc(slot: &ProcSlot<'_>) -> FanotifyLive {
        FanotifyLive { state: Some(parse_fdinfo(slot.fdinfo).unwrap_or_default()) }
    }

    fn fdinfo_pending(live: &FanotifyLive) -> bool {
        live.state.is_none()
    }

    fn sketch(live: &FanotifyLive) -> FanotifyState {
        live.state.clone().unwrap_or_default()
    }

    fn detail(saved: &FanotifyState) -> Option<String> {
        Some(format!(
            "flags={} event-flags={:#o} marks={}",
            flag_names(saved.flags),
            saved.event_flags,
            saved.marks.len()
        ))
    }

    fn refusal(_saved: &FanotifyState) -> Option<String> {
        not_supported("fanotify groups")
    }

    fn open(
        saved: &FanotifyState,
        _args: &OpenArgs<'_>,
        _store: &mut ObjectStore,
    ) -> Result<Opened, KindError> {
        Err(KindError::Other(Self::refusal(saved).unwrap_or_default()))
    }

    fn same(a: &FanotifyState, b: &FanotifyState) -> Result<(), String> {
        if (a.flags, a.event_flags, a.marks.len()) != (b.flags, b.event_flags, b.marks.len()) {
            return Err(format!("fanotify {a:?} vs {b:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fdinfo_of_a_group_with_an_inode_mark_parses_and_names_its_flags() {
        let info = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\n\
                    fanotify flags:210 event-flags:8000\n\
                    fanotify ino:3c4a7 sdev:fe00000 mflags:0 mask:1 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000\n";
        let state = parse_fdinfo(info).expect("a fanotify fdinfo");
        assert_eq!((state.flags, state.event_flags, state.marks.len()), (0x210, 0x8000, 1));
        assert!(state.marks[0].starts_with("ino:3c4a7 sdev:fe00000"), "{:?}", state.marks);
        assert_eq!(
            Fanotify::detail(&state).as_deref(),
            Some("flags=FAN_CLASS_NOTIF|FAN_UNLIMITED_QUEUE|FAN_REPORT_FID event-flags=0o100000 marks=1")
        );
        assert_eq!(flag_names(0x4 | 0x1_0000), "FAN_CLASS_CONTENT|0x10000");
        assert_eq!(parse_fdinfo("pos:\t0\ninotify wd:1 ino:2\n"), None);
    }
}
