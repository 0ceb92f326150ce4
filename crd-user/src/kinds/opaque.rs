//! Kinds crd lists but does not recreate yet: anon-inode files other than the
//! kinds that have a module (userfaultfd, io_uring...), and anything
//! else (symlinks opened with O_PATH, unknown types). `ls` and `inspect` show them by
//! their /proc name; an image restore refuses them, naming the fd; `graft` hands the
//! live ones over.
use super::{Identity, not_supported};

pub struct Anon;
pub struct Other;

// Every anon file sits on one shared inode: its object is its private data.
stateless_kind!(Anon, "anon",
    has_path: true, same_inode: false, identity: Identity::Private,
    recognise: |r| r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC),
    refusal: not_supported("this anon-inode kind (userfaultfd, io_uring...)"),
    open: |_args| unreachable!("refused"),
);

stateless_kind!(Other, "unknown",
    has_path: true, same_inode: false, identity: Identity::Inode,
    recognise: |_r| true,
    refusal: not_supported("this kind of file"),
    open: |_args| unreachable!("refused"),
);
