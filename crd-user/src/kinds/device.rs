//! Device nodes (character and block): reopened by path at restore. A block device is
//! moved to its offset; a character device has none worth restoring. Terminals are
//! their own kind (`terminal`), recognised before this one.
use super::{
    FileKind, KindError, ObjectStore, OpenArgs, Opened, Recognise,
    regular::{ByPath, open_by_path},
};

pub struct CharDevice;
pub struct BlockDevice;

impl FileKind for CharDevice {
    const NAME: &'static str = "chr";
    const SAME_INODE: bool = true;
    type Live = ();
    type Saved = ByPath;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFCHR
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

    fn open(_saved: &ByPath, args: &OpenArgs<'_>, _store: &mut ObjectStore) -> Result<Opened, KindError> {
        open_by_path(args, Self::NAME, false)
    }

    fn same(_a: &ByPath, _b: &ByPath) -> Result<(), String> {
        Ok(())
    }
}

impl FileKind for BlockDevice {
    const NAME: &'static str = "blk";
    const SAME_INODE: bool = true;
    type Live = ();
    type Saved = ByPath;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFBLK
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

    fn open(_saved: &ByPath, args: &OpenArgs<'_>, _store: &mut ObjectStore) -> Result<Opened, KindError> {
        open_by_path(args, Self::NAME, true)
    }

    fn same(_a: &ByPath, _b: &ByPath) -> Result<(), String> {
        Ok(())
    }
}
