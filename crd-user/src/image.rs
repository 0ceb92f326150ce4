//! Image: graph ⇄ bytes.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset  size  field
//! 0       8     magic "CRDIMAGE"
//! 8       4     format version (FORMAT_VERSION)
//! 12      8     body length in bytes
//! 20      4     CRC-32 (IEEE) of the body
//! 24      ...   body: bincode 2 (standard config) of ImageBody { header, graph }
//! ```
//!
//! The fixed prefix lets a reader reject a file that is not an image, is from a newer
//! crd, is truncated or is corrupt, each with its own message, before decoding anything.
//! Images are written atomically (temporary file in the target directory, fsync,
//! rename) with mode 0600: a crash or Ctrl-C never leaves a partial image behind.
use std::{
    fs,
    io::{self, Write},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::{graph::Graph, harvest::Source};

pub const MAGIC: [u8; 8] = *b"CRDIMAGE";
/// Bumped on any incompatible change to [`ImageBody`].
pub const FORMAT_VERSION: u32 = 1;
const PREFIX_LEN: usize = 24;
/// Decoding refuses bodies larger than this (a bound on what a corrupt length can make
/// crd allocate).
pub const MAX_BODY: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: not a crd image (bad magic)")]
    BadMagic { path: String },
    #[error("{path}: truncated image ({len} bytes; expected {expected})")]
    Truncated { path: String, len: u64, expected: u64 },
    #[error("{path}: image has {extra} bytes of trailing garbage")]
    Trailing { path: String, extra: u64 },
    #[error(
        "{path}: image format v{found} is newer than this crd supports (v{FORMAT_VERSION}); use a newer crd"
    )]
    TooNew { path: String, found: u32 },
    #[error("{path}: image format v{found} is not supported (this crd reads v{FORMAT_VERSION})")]
    Unsupported { path: String, found: u32 },
    #[error("{path}: image body of {len} bytes exceeds the {MAX_BODY}-byte limit")]
    TooLarge { path: String, len: u64 },
    #[error("{path}: image is corrupt (checksum mismatch)")]
    Checksum { path: String },
    #[error("{path}: image is corrupt ({detail})")]
    Decode { path: String, detail: String },
    #[error("cannot encode image: {0}")]
    Encode(String),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
}

/// Who made the image, where and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub crd_version: String,
    /// `uname -r` of the checkpointed machine.
    pub kernel_release: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub source: Source,
    /// Whether descendants were included (`--tree`).
    pub tree: bool,
}

impl Header {
    pub fn now(source: Source, tree: bool) -> Self {
        Self {
            crd_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            source,
            tree,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBody {
    pub header: Header,
    pub graph: Graph,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_BODY as usize }>()
}

/// Encodes an image to bytes.
pub fn encode(body: &ImageBody) -> Result<Vec<u8>, ImageError> {
    let payload =
        bincode::serde::encode_to_vec(body, config()).map_err(|e| ImageError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(PREFIX_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and checks an image. `path` only names the image in errors.
pub fn decode(bytes: &[u8], path: &str) -> Result<ImageBody, ImageError> {
    let path = path.to_string();
    let len = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(if MAGIC.starts_with(bytes) && !bytes.is_empty() {
            ImageError::Truncated { path, len, expected: PREFIX_LEN as u64 }
        } else {
            ImageError::BadMagic { path }
        });
    }
    if bytes.len() < PREFIX_LEN {
        return Err(ImageError::Truncated { path, len, expected: PREFIX_LEN as u64 });
    }
    let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(ImageError::TooNew { path, found: version });
    }
    if version != FORMAT_VERSION {
        return Err(ImageError::Unsupported { path, found: version });
    }
    let mut body_len = [0u8; 8];
    body_len.copy_from_slice(&bytes[12..20]);
    let body_len = u64::from_le_bytes(body_len);
    if body_len > MAX_BODY {
        return Err(ImageError::TooLarge { path, len: body_len });
    }
    let expected = PREFIX_LEN as u64 + body_len;
    if len < expected {
        return Err(ImageError::Truncated { path, len, expected });
    }
    if len > expected {
        return Err(ImageError::Trailing { path, extra: len - expected });
    }
    let payload = &bytes[PREFIX_LEN..];
    if crc32fast::hash(payload) != u32_at(20) {
        return Err(ImageError::Checksum { path });
    }
    let (body, used) = bincode::serde::decode_from_slice::<ImageBody, _>(payload, config())
        .map_err(|e| ImageError::Decode { path: path.clone(), detail: e.to_string() })?;
    if used != payload.len() {
        return Err(ImageError::Decode {
            path,
            detail: format!("{} unused bytes after the graph", payload.len() - used),
        });
    }
    Ok(body)
}

/// Reads and checks an image file.
pub fn read(path: &Path) -> Result<ImageBody, ImageError> {
    let name = path.display().to_string();
    let bytes = fs::read(path).map_err(|source| ImageError::Read { path: name.clone(), source })?;
    decode(&bytes, &name)
}

/// Writes an image atomically with mode 0600: nothing appears at `path` unless the
/// whole image was written and synced.
pub fn write(path: &Path, body: &ImageBody) -> Result<(), ImageError> {
    let bytes = encode(body)?;
    let name = path.display().to_string();
    let err = |source| ImageError::Write { path: name.clone(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates the file with mode 0600 and removes it if we fail or are
    // interrupted before `persist`.
    let mut tmp = tempfile::Builder::new().prefix(".crd-image-").tempfile_in(dir).map_err(err)?;
    tmp.write_all(&bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        graph::{Encounter, FdSlot, FdTable, FileDesc, Inode, Pipe, Task},
        harvest::InodeKind,
        types::{Access, DeviceId, Fd, ObjRef, Pid, Tgid},
    };

    fn sample() -> ImageBody {
        let inode = Inode {
            kind: InodeKind::Pipe,
            ino: 42,
            mode: libc::S_IFIFO | 0o600,
            dev: DeviceId { major: 0, minor: 14 },
            rdev: DeviceId { major: 0, minor: 0 },
            path: None,
            pipe: Some(Pipe { capacity: 65536, data: b"hello".to_vec(), held_outside: false }),
        };
        let file = FileDesc {
            flags: 0,
            access: Access { read: true, write: false },
            pos: 0,
            held_outside: false,
            inode: Encounter::First { objref: ObjRef(3), object: inode },
        };
        ImageBody {
            header: Header::now(Source::Bpf, false),
            graph: Graph {
                root: Tgid(7),
                tasks: vec![Task {
                    pid: Pid(7),
                    tgid: Tgid(7),
                    parent: Tgid(1),
                    comm: "sleep".into(),
                    fd_table: Encounter::First {
                        objref: ObjRef(1),
                        object: FdTable {
                            fds: vec![
                                FdSlot {
                                    fd: Fd(3),
                                    close_on_exec: true,
                                    file: Encounter::First { objref: ObjRef(2), object: file },
                                },
                                FdSlot { fd: Fd(4), close_on_exec: false, file: Encounter::Again(ObjRef(2)) },
                            ],
                        },
                    },
                }],
            },
        }
    }

    #[test]
    fn round_trip_gives_the_same_image() {
        let body = sample();
        let bytes = encode(&body).unwrap();
        assert_eq!(decode(&bytes, "x").unwrap(), body);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = encode(&sample()).unwrap();
        for cut in 0..bytes.len() {
            let err = decode(&bytes[..cut], "img").unwrap_err();
            assert!(
                matches!(err, ImageError::Truncated { .. } | ImageError::BadMagic { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_bit_flip_in_the_body_is_caught() {
        let bytes = encode(&sample()).unwrap();
        for i in PREFIX_LEN..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(matches!(decode(&bad, "img"), Err(ImageError::Checksum { .. })), "byte {i}");
        }
    }

    #[test]
    fn header_damage_has_its_own_message() {
        let bytes = encode(&sample()).unwrap();
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'X';
        assert_eq!(
            decode(&wrong_magic, "a.img").unwrap_err().to_string(),
            "a.img: not a crd image (bad magic)"
        );
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(decode(&newer, "a.img").unwrap_err().to_string().contains("newer than this crd supports"));
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&huge, "a.img"), Err(ImageError::TooLarge { .. })));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing, "a.img"), Err(ImageError::Trailing { extra: 1, .. })));
    }

    #[test]
    fn a_valid_checksum_over_garbage_is_still_rejected() {
        let garbage = vec![0xffu8; 16];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(garbage.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&garbage).to_le_bytes());
        bytes.extend_from_slice(&garbage);
        assert!(matches!(decode(&bytes, "g"), Err(ImageError::Decode { .. })));
    }

    #[test]
    fn write_is_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.crd");
        write(&path, &sample()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&path).unwrap(), sample_without_time(read(&path).unwrap()));
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().filter_map(Result::ok).collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    fn sample_without_time(read_back: ImageBody) -> ImageBody {
        let mut s = sample();
        s.header = read_back.header;
        s
    }
}
