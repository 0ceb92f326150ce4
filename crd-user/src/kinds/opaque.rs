//! Kinds crd lists but does not recreate yet: sockets, anon-inode files other than the
//! kinds that have a module (epoll, timerfd, signalfd, inotify, pidfd...), and anything
//! else (symlinks opened with O_PATH, unknown types). `ls` and `inspect` show them by
//! their /proc name; an image restore refuses them, naming the fd; `graft` hands the
//! live ones over.
use super::{
    FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, Recognise, not_supported, regular::ByPath,
};

pub struct Socket;
pub struct Anon;
pub struct Other;

macro_rules! opaque {
    ($ty:ty, $name:literal, $what:literal, $has_path:literal, $identity:expr, |$r:ident| $recognise:expr) => {
        impl FileKind for $ty {
            const NAME: &'static str = $name;
            const HAS_PATH: bool = $has_path;
            const IDENTITY: Identity = $identity;
            type Live = ();
            type Saved = ByPath;

            fn recognise($r: &Recognise<'_>) -> bool {
                $recognise
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
                not_supported($what)
            }

            fn open(
                saved: &ByPath,
                _args: &OpenArgs<'_>,
                _store: &mut ObjectStore,
            ) -> Result<Opened, KindError> {
                Err(KindError::Other(Self::refusal(saved).unwrap_or_default()))
            }

            fn same(_a: &ByPath, _b: &ByPath) -> Result<(), String> {
                Ok(())
            }
        }
    };
}

opaque!(Socket, "socket", "sockets", false, Identity::Inode, |r| r.file_type() == libc::S_IFSOCK);
// Every anon file sits on one shared inode: its object is its private data.
opaque!(
    Anon,
    "anon",
    "this anon-inode kind (epoll, timerfd, signalfd, inotify...)",
    true,
    Identity::Private,
    |r| r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC)
);
opaque!(Other, "unknown", "this kind of file", true, Identity::Inode, |_r| true);
