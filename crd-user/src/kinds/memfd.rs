//! memfd: an anonymous file in memory (`memfd_create`), named `memfd:NAME`, with
//! contents, a size, seals (`F_GET_SEALS`) and, since 6.3, executable bits.
//!
//! - Recognised as a regular file on tmpfs or hugetlbfs whose dentry is named
//!   `memfd:...` (the BPF tail carries the name and the seals; the /proc harvester reads
//!   the `/memfd:NAME (deleted)` link, and `statfs` and `F_GET_SEALS` on a copy).
//! - Saved while frozen: the seals, and the contents, read with `pread` on a
//!   `pidfd_getfd` copy (so the target's offset never moves). Contents are *streamed*:
//!   the saved state holds the copy's fd and the image encoder reads it a chunk at a
//!   time, so a 64 MiB memfd never sits in crd's memory twice.
//! - Restore: `memfd_create(NAME, MFD_ALLOW_SEALING [| MFD_HUGETLB])`, the contents,
//!   the size, the mode (exec bits), then the seals (last: they forbid the rest), and
//!   the offset. A second description of the same memfd is reopened through
//!   `/proc/self/fd/N` with its own access.
use std::{
    fmt,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::FileExt,
    },
    sync::Arc,
};

use nix::{
    fcntl::{self, FcntlArg, OFlag, SealFlag},
    sys::{
        memfd::{MFdFlags, memfd_create},
        stat::{Mode, fchmod},
    },
    unistd,
};
use serde::{Deserialize, Serialize};

use super::{FileKind, Handle, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Reach, Recognise, pipe};
use crate::sys::{self, SyscallError};

pub struct Memfd;

/// What a harvest reads of a memfd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemfdLive {
    pub size: u64,
    /// F_SEAL_* bits, where read.
    pub seals: Option<u32>,
    pub hugetlb: bool,
}

/// What an image holds of a memfd. Its name is the object's path (`/memfd:NAME
/// (deleted)`), as every named object's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemfdState {
    pub size: u64,
    pub seals: u32,
    pub hugetlb: bool,
    pub contents: Contents,
}

impl FileKind for Memfd {
    const NAME: &'static str = "memfd";
    type Live = MemfdLive;
    type Saved = MemfdState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFREG
            && match r.fs_magic {
                Some(crd_common::TMPFS_MAGIC | crd_common::HUGETLBFS_MAGIC) => {
                    r.name.is_some_and(|n| n.starts_with("memfd:"))
                }
                // /proc: the link says it (a memfd is never linked into a directory).
                None => r.link.is_some_and(|l| l.starts_with("/memfd:") && l.ends_with(" (deleted)")),
                Some(_) => false,
            }
    }

    fn from_bpf(record: &crd_common::FdRecord, tail: &[u8]) -> Option<MemfdLive> {
        let t: crd_common::NamedTail = super::tail(tail)?;
        Some(MemfdLive {
            size: record.size.max(0) as u64,
            seals: Some(t.seals),
            hugetlb: record.sb_magic == crd_common::HUGETLBFS_MAGIC,
        })
    }

    fn from_proc(slot: &ProcSlot<'_>) -> MemfdLive {
        // /proc shows no seals: ask a copy of the fd (best effort; `ls` freezes nothing).
        let seals = sys::pidfd_open(crate::types::Pid(slot.tgid.0))
            .and_then(|pidfd| sys::pidfd_getfd(pidfd.as_fd(), slot.fd))
            .ok()
            .and_then(|copy| fcntl::fcntl(copy.as_fd(), FcntlArg::F_GET_SEALS).ok())
            .map(|s| s as u32);
        let hugetlb = nix::sys::statfs::statfs(format!("/proc/{}/fd/{}", slot.tgid, slot.fd).as_str())
            .is_ok_and(|s| s.filesystem_type().0 as u64 == crd_common::HUGETLBFS_MAGIC);
        MemfdLive { size: slot.size, seals, hugetlb }
    }

    fn sketch(live: &MemfdLive) -> MemfdState {
        MemfdState {
            size: live.size,
            seals: live.seals.unwrap_or(0),
            hugetlb: live.hugetlb,
            contents: Contents::default(),
        }
    }

    fn save(live: &MemfdLive, reach: &Reach<'_>) -> Result<MemfdState, KindError> {
        let copy = sys::pidfd_getfd(reach.pidfd, reach.fd)?;
        let seals = fcntl::fcntl(copy.as_fd(), FcntlArg::F_GET_SEALS)
            .map_err(|e| KindError::errno("fcntl(F_GET_SEALS)", e))? as u32;
        let size =
            nix::sys::stat::fstat(copy.as_fd()).map_err(|e| KindError::errno("fstat", e))?.st_size as u64;
        Ok(MemfdState { size, seals, hugetlb: live.hugetlb, contents: Contents::held(copy, size) })
    }

    fn streams(saved: &MemfdState) -> bool {
        matches!(saved.contents, Contents::Held { .. })
    }

    fn detail(saved: &MemfdState) -> Option<String> {
        let mut s = format!("{} bytes", saved.size);
        if saved.seals != 0 {
            s.push_str(" seals=");
            s.push_str(&seal_names(saved.seals));
        }
        if saved.hugetlb {
            s.push_str(" hugetlb");
        }
        Some(s)
    }

    fn open(saved: &MemfdState, args: &OpenArgs<'_>, store: &mut ObjectStore) -> Result<Opened, KindError> {
        if !args.first {
            return reopen(store, args);
        }
        let name = memfd_name(args.path()?);
        let name =
            std::ffi::CString::new(name).map_err(|_| KindError::Other("a memfd name holds a NUL".into()))?;
        let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        if saved.hugetlb {
            flags |= MFdFlags::MFD_HUGETLB;
        }
        let memfd = memfd_create(name.as_c_str(), flags).map_err(|e| KindError::errno("memfd_create", e))?;
        saved.contents.write_to(&memfd)?;
        unistd::ftruncate(memfd.as_fd(), saved.size as i64).map_err(|e| KindError::errno("ftruncate", e))?;
        fchmod(memfd.as_fd(), Mode::from_bits_truncate(args.mode & 0o7777))
            .map_err(|e| KindError::errno("fchmod", e))?;
        if saved.seals != 0 {
            fcntl::fcntl(
                memfd.as_fd(),
                FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(saved.seals as i32)),
            )
            .map_err(|e| KindError::errno("fcntl(F_ADD_SEALS)", e))?;
        }
        if args.access.read && args.access.write {
            seek(&memfd, args.pos)?;
            store.set_handle(args.object, Handle::Held(memfd.as_raw_fd()));
            return Ok(Opened { fd: memfd, fresh: false });
        }
        // Another access than memfd_create's O_RDWR: a description of its own.
        store.set_handle(args.object, Handle::Owned(memfd));
        reopen(store, args)
    }

    fn same(a: &MemfdState, b: &MemfdState) -> Result<(), String> {
        if (a.size, a.seals, a.hugetlb) != (b.size, b.seals, b.hugetlb) {
            return Err(format!(
                "memfd size/seals/hugetlb {}/{:#x}/{} vs {}/{:#x}/{}",
                a.size, a.seals, a.hugetlb, b.size, b.seals, b.hugetlb
            ));
        }
        if a.contents != b.contents {
            return Err("memfd contents differ".into());
        }
        Ok(())
    }
}

/// `NAME` of a `/memfd:NAME (deleted)` link.
fn memfd_name(path: &str) -> &str {
    let name = path.strip_prefix("/memfd:").unwrap_or(path);
    name.strip_suffix(" (deleted)").unwrap_or(name)
}

fn seek(fd: &OwnedFd, pos: i64) -> Result<(), KindError> {
    if pos != 0 {
        unistd::lseek(fd.as_fd(), pos, unistd::Whence::SeekSet).map_err(|e| KindError::errno("lseek", e))?;
    }
    Ok(())
}

fn reopen(store: &ObjectStore, args: &OpenArgs<'_>) -> Result<Opened, KindError> {
    let handle = store
        .handle(args.object)
        .ok_or_else(|| KindError::Other(format!("the image refers to {} before saving it", args.object)))?;
    let path = format!("/proc/self/fd/{handle}");
    let flags = pipe::access_flags(args.access) | OFlag::O_CLOEXEC;
    let fd = fcntl::open(path.as_str(), flags, Mode::empty())
        .map_err(|e| KindError::errno("open(/proc/self/fd/N)", e))?;
    seek(&fd, args.pos)?;
    Ok(Opened { fd, fresh: false })
}

/// `F_SEAL_*` names, as `ls` shows them.
fn seal_names(seals: u32) -> String {
    let names = [
        (libc::F_SEAL_SEAL, "seal"),
        (libc::F_SEAL_SHRINK, "shrink"),
        (libc::F_SEAL_GROW, "grow"),
        (libc::F_SEAL_WRITE, "write"),
        (libc::F_SEAL_FUTURE_WRITE, "future_write"),
        (0x20, "exec"), // F_SEAL_EXEC (6.3)
    ];
    let mut out: Vec<&str> =
        names.iter().filter(|(bit, _)| seals & *bit as u32 != 0).map(|(_, name)| *name).collect();
    let known = names.iter().fold(0u32, |acc, (bit, _)| acc | *bit as u32);
    let rest = format!("{:#x}", seals & !known);
    if seals & !known != 0 {
        out.push(&rest);
    }
    out.join(",")
}

/// A memfd's bytes: in the image, a sequence of chunks; at checkpoint time, a copy of
/// the target's fd read a chunk at a time while the image is encoded.
#[derive(Clone, Default)]
pub enum Contents {
    /// Decoded from an image (or empty).
    #[default]
    Empty,
    Bytes(Vec<u8>),
    /// The first `len` bytes of this file, read when encoded.
    Held {
        file: Arc<std::fs::File>,
        len: u64,
    },
}

/// Encoding streams this many bytes at a time.
const CHUNK: usize = 1 << 20;

impl Contents {
    fn held(fd: OwnedFd, len: u64) -> Self {
        Contents::Held { file: Arc::new(std::fs::File::from(fd)), len }
    }

    pub fn len(&self) -> u64 {
        match self {
            Contents::Empty => 0,
            Contents::Bytes(b) => b.len() as u64,
            Contents::Held { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `each` with every chunk, in order.
    fn for_each_chunk(&self, mut each: impl FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
        match self {
            Contents::Empty => Ok(()),
            Contents::Bytes(bytes) => bytes.chunks(CHUNK).try_for_each(each),
            Contents::Held { file, len } => {
                let mut buf = vec![0u8; CHUNK.min(*len as usize)];
                let mut at = 0u64;
                while at < *len {
                    let want = CHUNK.min((*len - at) as usize);
                    file.read_exact_at(&mut buf[..want], at)
                        .map_err(|e| format!("reading a memfd at {at}: {e} (it shrank while saved?)"))?;
                    each(&buf[..want])?;
                    at += want as u64;
                }
                Ok(())
            }
        }
    }

    /// Every byte in memory (tests, comparisons).
    pub fn to_vec(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(self.len() as usize);
        self.for_each_chunk(|c| {
            out.extend_from_slice(c);
            Ok(())
        })?;
        Ok(out)
    }

    fn write_to(&self, fd: &OwnedFd) -> Result<(), KindError> {
        let file = fd.as_fd().try_clone_to_owned().map_err(|e| SyscallError { call: "dup", source: e })?;
        let file = std::fs::File::from(file);
        let mut at = 0u64;
        self.for_each_chunk(|chunk| {
            file.write_all_at(chunk, at).map_err(|e| format!("write: {e}"))?;
            at += chunk.len() as u64;
            Ok(())
        })
        .map_err(KindError::Other)
    }
}

impl PartialEq for Contents {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.to_vec().ok() == other.to_vec().ok()
    }
}

impl Eq for Contents {}

impl fmt::Debug for Contents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Contents({} bytes)", self.len())
    }
}

/// One chunk, encoded as a byte string.
struct Chunk<'a>(&'a [u8]);

impl Serialize for Chunk<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl Serialize for Contents {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let chunks = self.len().div_ceil(CHUNK as u64) as usize;
        let mut seq = serializer.serialize_seq(Some(chunks))?;
        let mut failed = None;
        let walked = self.for_each_chunk(|chunk| {
            seq.serialize_element(&Chunk(chunk)).map_err(|e| {
                let text = e.to_string();
                failed = Some(e);
                text
            })
        });
        if let Some(e) = failed {
            return Err(e);
        }
        walked.map_err(S::Error::custom)?;
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Contents {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Appends one chunk to the bytes decoded so far (no second copy of the whole).
        struct AppendChunk<'a>(&'a mut Vec<u8>);
        impl<'de> serde::de::DeserializeSeed<'de> for AppendChunk<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
                deserializer.deserialize_bytes(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for AppendChunk<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chunk of bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<(), E> {
                self.0.extend_from_slice(v);
                Ok(())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while let Some(b) = seq.next_element::<u8>()? {
                    self.0.push(b);
                }
                Ok(())
            }
        }
        struct Chunks;
        impl<'de> serde::de::Visitor<'de> for Chunks {
            type Value = Contents;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("chunks of bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Contents, A::Error> {
                let mut all = Vec::new();
                while seq.next_element_seed(AppendChunk(&mut all))?.is_some() {}
                Ok(if all.is_empty() { Contents::Empty } else { Contents::Bytes(all) })
            }
        }
        deserializer.deserialize_seq(Chunks)
    }
}
