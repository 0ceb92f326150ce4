//! Device nodes (character and block): reopened by path at restore. A block device is
//! moved to its offset; a character device has none worth restoring. Terminals are
//! their own kind (`terminal`), recognised before this one.
use super::{Identity, regular::open_by_path};

pub struct CharDevice;
pub struct BlockDevice;

stateless_kind!(CharDevice, "chr",
    has_path: true, same_inode: true, identity: Identity::Inode,
    recognise: |r| r.file_type() == libc::S_IFCHR,
    refusal: None,
    open: |args| open_by_path(args, "chr", false),
);

stateless_kind!(BlockDevice, "blk",
    has_path: true, same_inode: true, identity: Identity::Inode,
    recognise: |r| r.file_type() == libc::S_IFBLK,
    refusal: None,
    open: |args| open_by_path(args, "blk", true),
);
