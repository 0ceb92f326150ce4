//! Regular files: reopened by path at restore, with the description's access and flags,
//! at its offset. The image saves no contents: the file is expected where it was (a
//! file that is gone or changed kind is refused by name; another inode at the path is a
//! warning).
use std::os::fd::{AsFd, OwnedFd};

use nix::{
    fcntl::{self, OFlag},
    sys::stat::{Mode, SFlag, fstat},
    unistd,
};
use serde::{Deserialize, Serialize};

use super::{Identity, KindError, OpenArgs, Opened, pipe::access_flags};

pub struct Regular;

/// Nothing beyond what every object records (path, mode, inode): a unit state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByPath;

stateless_kind!(Regular, "file",
    has_path: true, same_inode: true, identity: Identity::Inode,
    recognise: |r| r.file_type() == libc::S_IFREG,
    refusal: None,
    open: |args| open_by_path(args, "file", true),
);

/// Opens a named object by path with the description's access and kept flags, checks it
/// is still the same kind of object, and moves to the offset if `seekable`.
pub(super) fn open_by_path(
    args: &OpenArgs<'_>,
    kind: &'static str,
    seekable: bool,
) -> Result<Opened, KindError> {
    let path = args.path()?;
    // Creation flags described how the file was made, not how to reopen it.
    let kept = OFlag::from_bits_truncate(args.flags as i32)
        & (OFlag::O_APPEND
            | OFlag::O_NONBLOCK
            | OFlag::O_DIRECT
            | OFlag::O_NOATIME
            | OFlag::O_SYNC
            | OFlag::O_DSYNC
            | OFlag::O_DIRECTORY
            | OFlag::O_NOFOLLOW
            | OFlag::O_PATH
            | OFlag::O_LARGEFILE);
    let flags = access_flags(args.access) | kept | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let fd = fcntl::open(path, flags, Mode::empty()).map_err(|e| open_error(path, e))?;
    check_type(&fd, path, args, kind)?;
    if seekable && args.pos != 0 {
        unistd::lseek(fd.as_fd(), args.pos, unistd::Whence::SeekSet)
            .map_err(|e| KindError::errno("lseek", e))?;
    }
    Ok(Opened { fd, fresh: false })
}

pub(super) fn open_error(path: &str, e: nix::Error) -> KindError {
    if e == nix::Error::ENOENT {
        return KindError::Gone(path.to_string());
    }
    KindError::errno("open", e)
}

/// The path must still name the same kind of object.
pub(super) fn check_type(
    fd: &OwnedFd,
    path: &str,
    args: &OpenArgs<'_>,
    kind: &'static str,
) -> Result<(), KindError> {
    let stat = fstat(fd.as_fd()).map_err(|e| KindError::errno("fstat", e))?;
    let found = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    let expected = SFlag::from_bits_truncate(args.mode & SFlag::S_IFMT.bits());
    if found != expected {
        let name = match found {
            SFlag::S_IFREG => "regular file",
            SFlag::S_IFDIR => "directory",
            SFlag::S_IFIFO => "fifo",
            SFlag::S_IFCHR => "character device",
            SFlag::S_IFBLK => "block device",
            SFlag::S_IFSOCK => "socket",
            _ => "different kind of file",
        };
        return Err(KindError::Changed { path: path.to_string(), found: name, expected: kind });
    }
    if found == SFlag::S_IFREG && stat.st_ino != args.ino {
        log::warn!(
            "{path} is another file than at checkpoint time (inode {} became {})",
            args.ino,
            stat.st_ino
        );
    }
    Ok(())
}
