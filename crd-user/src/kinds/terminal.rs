//! Terminals: pty masters (`/dev/ptmx`) and slaves (`/dev/pts/N`).
//!
//! A pty is one object seen from two ends, like a pipe, and a slave reopened by path
//! after its pty is gone fails with EIO. Until crd recreates ptys (termios, window size,
//! queued input, the controlling terminal), a pty end is recognised and refused at
//! restore with a clear message; `ls` and `inspect` show it and `graft` hands it over.
use super::Identity;

pub struct Terminal;

/// Unix98 pty slaves: majors 136–143 (UNIX98_PTY_SLAVE_MAJOR and the next 7).
const PTY_SLAVE_MAJORS: std::ops::RangeInclusive<u32> = 136..=143;
/// `/dev/ptmx` (TTYAUX_MAJOR 5, minor 2), the master side.
const PTMX: (u32, u32) = (5, 2);

stateless_kind!(Terminal, "pty",
    has_path: true, same_inode: false, identity: Identity::Inode,
    recognise: |r| r.file_type() == libc::S_IFCHR
        && (PTY_SLAVE_MAJORS.contains(&r.rdev.major) || (r.rdev.major, r.rdev.minor) == PTMX),
    refusal: Some(
        "a pty end cannot be reopened once its pty is gone, and recreating ptys is not supported yet; `crd graft` hands the live one over"
            .into(),
    ),
    open: |_args| unreachable!("refused"),
);
