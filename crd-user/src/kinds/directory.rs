//! Directories: reopened by path at restore, at their offset (a readdir position).
use super::{Identity, regular::open_by_path};

pub struct Directory;

stateless_kind!(Directory, "dir",
    has_path: true, same_inode: true, identity: Identity::Inode,
    recognise: |r| r.file_type() == libc::S_IFDIR,
    refusal: None,
    open: |args| open_by_path(args, "dir", true),
);
