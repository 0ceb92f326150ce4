//! Terminals: pty masters (`/dev/ptmx`) and slaves (`/dev/pts/N`).
//!
//! A pty is one object seen from two ends, like a pipe, and a slave reopened by path
//! after its pty is gone fails with EIO. Until crd recreates ptys (termios, window size,
//! queued input, the controlling terminal), a pty end is recognised and refused at
//! restore with a clear message; `ls` and `inspect` show it and `graft` hands it over.
use super::{FileKind, KindError, ObjectStore, OpenArgs, Opened, Recognise, regular::ByPath};

pub struct Terminal;

/// Unix98 pty slaves: majors 136–143 (UNIX98_PTY_SLAVE_MAJOR and the next 7).
const PTY_SLAVE_MAJORS: std::ops::RangeInclusive<u32> = 136..=143;
/// `/dev/ptmx` (TTYAUX_MAJOR 5, minor 2), the master side.
const PTMX: (u32, u32) = (5, 2);

impl FileKind for Terminal {
    const NAME: &'static str = "pty";
    type Live = ();
    type Saved = ByPath;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFCHR
            && (PTY_SLAVE_MAJORS.contains(&r.rdev.major) || (r.rdev.major, r.rdev.minor) == PTMX)
    }

    fn from_bpf(_record: &crd_common::FdRecord, _tail: &[u8]) -> Option<()> {
        Some(())
    }

    fn from_proc(_slot: &super::ProcSlot<'_>) {}

    fn sketch(_live: &()) -> ByPath {
        ByPath
    }

    fn detail(_saved: &ByPath) -> Option<String> {
        None
    }

    fn refusal(_saved: &ByPath) -> Option<String> {
        Some(
            "a pty end cannot be reopened once its pty is gone, and recreating ptys is not supported yet; `crd graft` hands the live one over"
                .into(),
        )
    }

    fn open(saved: &ByPath, _args: &OpenArgs<'_>, _store: &mut ObjectStore) -> Result<Opened, KindError> {
        Err(KindError::Other(Self::refusal(saved).unwrap_or_default()))
    }

    fn same(_a: &ByPath, _b: &ByPath) -> Result<(), String> {
        Ok(())
    }
}
