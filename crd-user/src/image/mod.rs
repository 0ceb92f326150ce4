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
//! Format 2 saves each object as (kind name, the kind's state), so a new kind appends a
//! kind and an image holding a kind this crd does not know is refused by name. Format 1
//! (pipes as a side field of every inode) still decodes, through [`v1`].
//!
//! The fixed prefix lets a reader reject a file that is not an image, is from a newer
//! crd, is truncated or is corrupt, each with its own message, before decoding anything.
//! Images are written atomically (temporary file in the target directory, fsync,
//! rename) with mode 0600: a crash or Ctrl-C never leaves a partial image behind. The
//! body is encoded straight into the temporary file, the CRC computed on the way, and
//! the length and CRC filled into the prefix last.
//!
//! Decoding allocates at most [`alloc_bound`]`(body length)` whatever the length fields
//! inside the body claim: bincode's limit is set to a small multiple of the body's real
//! length (so a string or byte vector claiming 2^60 bytes is refused before anything is
//! allocated), and serde caps the preallocation of any other sequence at 1 MiB.
use std::{
    fs,
    io::{self, BufWriter, Read, Seek, SeekFrom, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::{
    graph::Graph,
    kinds::decoding::{self, UNKNOWN_KIND, UNKNOWN_KIND_END},
};

mod v1;

pub const MAGIC: [u8; 8] = *b"CRDIMAGE";
/// Bumped on any incompatible change to [`ImageBody`].
pub const FORMAT_VERSION: u32 = 5;
/// The oldest format this crd still reads.
pub const OLDEST_VERSION: u32 = 1;
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
    #[error(
        "{path}: image format v{found} is not supported (this crd reads v{OLDEST_VERSION} to v{FORMAT_VERSION})"
    )]
    Unsupported { path: String, found: u32 },
    #[error("{path}: {detail} (the image was made by a newer crd?); use a crd that knows it")]
    UnknownKind { path: String, detail: String },
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
    #[error(
        "{path}: refusing an image that others can write (mode {mode:04o}): it may have been altered; chmod 600 {path}"
    )]
    Writable { path: String, mode: u32 },
}

/// Which harvester read the image's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Bpf,
    Procfs,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Bpf => "bpf",
            Source::Procfs => "procfs",
        })
    }
}

impl From<crate::harvest::Source> for Source {
    fn from(source: crate::harvest::Source) -> Self {
        match source {
            crate::harvest::Source::Procfs => Source::Procfs,
            // `auto` is resolved before a harvest; an image never says it.
            crate::harvest::Source::Bpf | crate::harvest::Source::Auto => Source::Bpf,
        }
    }
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

/// The body encoding (decoding adds a limit, which does not change the format).
fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// At most this many bytes are claimed by bincode per byte of body: every primitive
/// claims its in-memory size (8 for a u64 that a varint stores in 1 byte), a string or
/// byte vector its length.
const CLAIM_PER_BODY_BYTE: u64 = 16;
/// The smallest decode limit (tiny bodies still decode).
const MIN_LIMIT_LOG2: u32 = 12;

/// What decoding a body of `body_len` bytes may allocate at most, in bytes: bincode's
/// limit (at most 4 × [`CLAIM_PER_BODY_BYTE`] × `body_len`, rounded to a power of four)
/// plus serde's 1 MiB cap on the preallocation of each nested sequence (an image
/// nests four: tasks, fds, pipe data, strings) and the decoded values themselves
/// (bounded by the same claims).
pub fn alloc_bound(body_len: u64) -> u64 {
    2 * limit_for(body_len) + 4 * (1 << 20)
}

fn limit_for(body_len: u64) -> u64 {
    let wanted = body_len.saturating_mul(CLAIM_PER_BODY_BYTE).max(1 << MIN_LIMIT_LOG2);
    // Limits come in powers of four (the limit is a const generic: one decoder each).
    let log2 = 64 - (wanted - 1).leading_zeros();
    1u64 << (log2.div_ceil(2) * 2)
}

/// Encodes an image to bytes.
pub fn encode(body: &ImageBody) -> Result<Vec<u8>, ImageError> {
    let mut out = vec![0u8; PREFIX_LEN];
    let mut sink = CrcWriter::new(&mut out);
    bincode::serde::encode_into_std_write(body, &mut sink, config())
        .map_err(|e| ImageError::Encode(e.to_string()))?;
    let (len, crc) = sink.finish();
    out[..PREFIX_LEN].copy_from_slice(&prefix(len, crc));
    Ok(out)
}

fn prefix(body_len: u64, crc: u32) -> [u8; PREFIX_LEN] {
    prefix_of(FORMAT_VERSION, body_len, crc)
}

fn prefix_of(version: u32, body_len: u64, crc: u32) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&version.to_le_bytes());
    p[12..20].copy_from_slice(&body_len.to_le_bytes());
    p[20..24].copy_from_slice(&crc.to_le_bytes());
    p
}

/// A writer that counts and checksums what passes through it.
struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> CrcWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, hasher: crc32fast::Hasher::new(), len: 0 }
    }

    /// The body length and CRC.
    fn finish(self) -> (u64, u32) {
        (self.len, self.hasher.finalize())
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decodes `payload` with a bincode limit of `LIMIT` bytes.
fn decode_limited<const LIMIT: usize, T: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(payload, bincode::config::standard().with_limit::<LIMIT>())
}

/// Decodes `payload` with the smallest limit that fits its length.
fn decode_body<T: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    macro_rules! by_limit {
        ($($log2:literal)*) => {
            match limit_for(payload.len() as u64) {
                $(l if l <= 1 << $log2 => decode_limited::<{ 1usize << $log2 }, T>(payload),)*
                _ => decode_limited::<{ usize::MAX }, T>(payload),
            }
        };
    }
    // MIN_LIMIT_LOG2 ..= log2(CLAIM_PER_BODY_BYTE × MAX_BODY), in steps of two.
    by_limit!(12 14 16 18 20 22 24 26 28 30 32 34 36)
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
    if version < OLDEST_VERSION {
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
    decoding::set_format(version);
    let decoded = if version == 1 {
        decode_body::<v1::ImageBody>(payload).map(|(body, used)| (body.upgrade(), used))
    } else {
        decode_body::<ImageBody>(payload)
    };
    let (body, used) = decoded.map_err(|e| {
        let detail = one_line(&e);
        let unknown = detail.find(UNKNOWN_KIND).map(|at| &detail[at + UNKNOWN_KIND.len()..]);
        match unknown.map(|rest| rest.split(UNKNOWN_KIND_END).next().unwrap_or(rest)) {
            Some(message) => ImageError::UnknownKind { path: path.clone(), detail: message.to_string() },
            None => ImageError::Decode { path: path.clone(), detail },
        }
    })?;
    if used != payload.len() {
        return Err(ImageError::Decode {
            path,
            detail: format!("{} unused bytes after the graph", payload.len() - used),
        });
    }
    Ok(body)
}

/// A decode error's message on one line (serde's custom messages may hold newlines).
fn one_line(e: &bincode::error::DecodeError) -> String {
    let text = e.to_string();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads and checks an image file.
pub fn read(path: &Path) -> Result<ImageBody, ImageError> {
    let name = path.display().to_string();
    let bytes = fs::read(path).map_err(|source| ImageError::Read { path: name.clone(), source })?;
    decode(&bytes, &name)
}

/// Reads an image to restore from: as [`read`], but an image that anyone but its owner
/// may write is refused (someone could have planted fds or data in it). The mode is
/// checked on the opened file, so it is the file that is read.
pub fn read_private(path: &Path) -> Result<ImageBody, ImageError> {
    let name = path.display().to_string();
    let err = |source| ImageError::Read { path: name.clone(), source };
    let mut file = fs::File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ImageError::Writable { path: name, mode });
    }
    // Never trust the size for more than a hint: read what is there.
    let mut bytes = Vec::with_capacity(meta.size().min(MAX_BODY + PREFIX_LEN as u64) as usize);
    file.read_to_end(&mut bytes).map_err(err)?;
    decode(&bytes, &name)
}

/// Writes an image atomically with mode 0600: nothing appears at `path` unless the
/// whole image was written and synced. The body is encoded straight into the file.
pub fn write(path: &Path, body: &ImageBody) -> Result<(), ImageError> {
    let name = path.display().to_string();
    let err = |source| ImageError::Write { path: name.clone(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates the file with mode 0600 and removes it if we fail or are
    // interrupted before `persist`.
    let mut tmp = tempfile::Builder::new().prefix(".crd-image-").tempfile_in(dir).map_err(err)?;
    let file = tmp.as_file_mut();
    // The prefix is written last, once the length and CRC are known.
    file.write_all(&[0u8; PREFIX_LEN]).map_err(err)?;
    // Buffered before the checksum: bincode writes each field on its own, and the CRC
    // then runs over whole buffers (its fast path needs 64 bytes at a time), not over
    // each field's few bytes (a fifth of writing a checkpoint of 9,000 pipes).
    let mut sink = BufWriter::with_capacity(256 * 1024, CrcWriter::new(&mut *file));
    bincode::serde::encode_into_std_write(body, &mut sink, config()).map_err(|e| match e {
        bincode::error::EncodeError::Io { inner, .. } => err(inner),
        e => ImageError::Encode(e.to_string()),
    })?;
    let (len, crc) = sink.into_inner().map_err(|e| err(e.into_error()))?.finish();
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    file.write_all(&prefix(len, crc)).map_err(err)?;
    file.sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        graph::{Encounter, FdSlot, FdTable, FileDesc, Object, Task},
        kinds::{Saved, pipe::PipeState},
        types::{Access, DeviceId, Fd, ObjRef, Pid, Tgid},
    };

    fn sample() -> ImageBody {
        let object = Object {
            ino: 42,
            mode: libc::S_IFIFO | 0o600,
            dev: DeviceId { major: 0, minor: 14 },
            rdev: DeviceId { major: 0, minor: 0 },
            path: None,
            held_outside: false,
            state: Saved::Pipe(PipeState { capacity: 65536, data: b"hello".to_vec() }),
            tied: Vec::new(),
            carried: Vec::new(),
        };
        let file = FileDesc {
            flags: 0,
            access: Access { read: true, write: false },
            pos: 0,
            held_outside: false,
            object: Encounter::First { objref: ObjRef(3), object: Box::new(object) },
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
                    session: Default::default(),
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

    #[test]
    fn the_streamed_write_gives_the_bytes_encode_gives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.crd");
        let body = sample();
        write(&path, &body).unwrap();
        assert_eq!(fs::read(&path).unwrap(), encode(&body).unwrap());
    }

    #[test]
    fn a_writable_image_is_refused_for_restore() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.crd");
        write(&path, &sample()).unwrap();
        assert!(read_private(&path).is_ok());
        for mode in [0o620, 0o602, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_private(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("mode {mode:04o}")) && err.contains("chmod 600"), "{err}");
            assert_eq!(err.lines().count(), 1);
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_private(&path).is_ok(), "readable by others is fine, writable is not");
    }

    #[test]
    fn decode_limits_grow_with_the_body_in_powers_of_four() {
        assert_eq!(limit_for(0), 1 << 12);
        assert_eq!(limit_for(256), 1 << 12);
        assert_eq!(limit_for(257), 1 << 14);
        assert_eq!(limit_for(MAX_BODY), 1 << 36);
        for len in [1u64, 100, 1000, 65_537, 1 << 20, 3 << 30] {
            let limit = limit_for(len);
            assert!(limit >= len * CLAIM_PER_BODY_BYTE && limit <= (4 * len * CLAIM_PER_BODY_BYTE).max(4096));
        }
    }

    /// A body whose first string (the header's crd_version) claims `claim` bytes.
    fn claiming(claim: u64) -> Vec<u8> {
        let mut body = vec![253u8];
        body.extend_from_slice(&claim.to_le_bytes());
        body.extend_from_slice(b"0.1.0");
        let mut bytes = prefix(body.len() as u64, crc32fast::hash(&body)).to_vec();
        bytes.extend_from_slice(&body);
        bytes
    }

    #[test]
    fn a_length_claiming_more_than_the_body_is_a_one_line_error() {
        for claim in [1 << 20, 1 << 31, 1 << 60, u64::MAX] {
            let err = decode(&claiming(claim), "c.img").unwrap_err();
            assert!(matches!(err, ImageError::Decode { .. }), "{claim}: {err}");
            assert_eq!(err.to_string().lines().count(), 1);
        }
    }

    fn sample_without_time(read_back: ImageBody) -> ImageBody {
        let mut s = sample();
        s.header = read_back.header;
        s
    }
}
