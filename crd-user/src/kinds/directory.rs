//! Directories: reopened by path at restore, at their offset (a readdir position).
use super::{
    FileKind, KindError, ObjectStore, OpenArgs, Opened, Recognise,
    regular::{ByPath, open_by_path},
};

pub struct Directory;

impl FileKind for Directory {
    const NAME: &'static str = "dir";
    const SAME_INODE: bool = true;
    type Live = ();
    type Saved = ByPath;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFDIR
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
