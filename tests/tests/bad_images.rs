//! Bad images: whatever the bytes, decoding never panics, allocates no more than
//! `crd::image::alloc_bound(body length)` whatever the length fields inside claim, and
//! every rejection is a one-line error — from the library and from `crd inspect` and
//! `crd restore`.
//!
//! This test binary counts allocations (per thread) with its own global allocator.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    fs,
    os::unix::fs::PermissionsExt,
};

use crd::{
    Graph,
    graph::{Encounter, FdSlot, FdTable, FileDesc, Object, Task},
    image::{self, Header, ImageBody, ImageError, Source},
    kinds::{Kind, Saved, pipe::PipeState},
    types::{Access, DeviceId, Fd, ObjRef, Pid, Tgid},
};
use crd_tests::crd;

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn track(grow: usize, shrink: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(grow).saturating_sub(shrink);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// const-initialised thread-locals (no allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size(), 0);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size(), 0);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; the caller guarantees ptr came from this allocator.
        unsafe { System.dealloc(ptr, layout) };
        track(0, layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded; the caller guarantees ptr and layout.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size, layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most `f` had allocated at once on this thread, beyond what was live before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

fn body(tasks: usize, pipe_data: &[u8]) -> ImageBody {
    let mut graph = Graph { root: Tgid(7), tasks: Vec::new() };
    for i in 0..tasks {
        let pid = 7 + i as u32;
        let inode = Object {
            ino: 42 + i as u64,
            mode: libc::S_IFIFO | 0o600,
            dev: DeviceId { major: 0, minor: 14 },
            rdev: DeviceId { major: 0, minor: 0 },
            path: None,
            held_outside: false,
            state: Saved::Pipe(PipeState { capacity: 65536, data: pipe_data.to_vec() }),
            tied: Vec::new(),
            carried: Vec::new(),
        };
        let base = 1 + 3 * i as u32;
        let file = FileDesc {
            flags: 0,
            access: Access { read: true, write: false },
            pos: 0,
            held_outside: false,
            object: Encounter::First { objref: ObjRef(base + 2), object: Box::new(inode) },
        };
        graph.tasks.push(Task {
            pid: Pid(pid),
            tgid: Tgid(pid),
            parent: Tgid(if i == 0 { 1 } else { 7 }),
            comm: "c".into(),
            session: Default::default(),
            fd_table: Encounter::First {
                objref: ObjRef(base),
                object: FdTable {
                    fds: vec![
                        FdSlot {
                            fd: Fd(3),
                            close_on_exec: false,
                            file: Encounter::First { objref: ObjRef(base + 1), object: file },
                        },
                        FdSlot { fd: Fd(4), close_on_exec: true, file: Encounter::Again(ObjRef(base + 1)) },
                    ],
                },
            },
        });
    }
    let header = Header {
        crd_version: "V".into(),
        kernel_release: "K".into(),
        created: 0,
        source: Source::Bpf,
        tree: false,
    };
    ImageBody { header, graph }
}

/// A bincode varint claiming `n`.
fn varint(n: u64) -> Vec<u8> {
    let mut v = vec![253u8];
    v.extend_from_slice(&n.to_le_bytes());
    v
}

/// `bytes` with the length prefix and CRC made right again for a changed body.
fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = (bytes.len() - 24) as u64;
    bytes[12..20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast_hash(&bytes[24..]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// CRC-32 (IEEE), bitwise: the tests need no extra dependency.
fn crc32fast_hash(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// `image` with the length byte(s) at `at` (a one-byte varint) replaced by `claim`.
fn claiming(image: &[u8], at: usize, claim: u64) -> Vec<u8> {
    let mut bytes = image[..at].to_vec();
    bytes.extend_from_slice(&varint(claim));
    bytes.extend_from_slice(&image[at + 1..]);
    resealed(bytes)
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).expect("marker in the encoding")
}

fn assert_bounded_rejection(bytes: &[u8], what: &str) {
    let (result, peak) = peak_of(|| image::decode(bytes, "crafted.img"));
    let bound = image::alloc_bound((bytes.len() - 24) as u64);
    assert!(peak as u64 <= bound, "{what}: decoding allocated {peak} bytes, over the bound {bound}");
    let err = result.expect_err(what);
    assert!(matches!(err, ImageError::Decode { .. }), "{what}: {err}");
    assert_eq!(err.to_string().lines().count(), 1, "{what}: {err}");
}

#[test]
fn length_fields_claiming_huge_sizes_allocate_only_a_bounded_amount() {
    let good = image::encode(&body(1, b"hello")).unwrap();
    assert!(image::decode(&good, "good").is_ok());
    let body_start = 24;
    // Header { crd_version: "V", kernel_release: "K", created: 0, source: 0, tree: 0 },
    // then Graph { root: 7, tasks: len, ... }.
    let header = [1, b'V', 1, b'K', 0, 0, 0, 7];
    assert_eq!(good[body_start..body_start + 8], header);
    let string_len = body_start;
    let tasks_len = body_start + 8;
    // Task { pid 7, tgid 7, parent 1, comm "c", First { objref 1, FdTable { fds: len } } }
    let fds_len = find(&good, &[7, 7, 1, 1, b'c', 0, 1, 2]) + 7;
    let data_len = find(&good, b"\x05hello");
    for claim in [1 << 20, 1 << 31, 1 << 40, 1 << 60, u64::MAX] {
        assert_bounded_rejection(&claiming(&good, string_len, claim), &format!("a string of {claim}"));
        assert_bounded_rejection(&claiming(&good, tasks_len, claim), &format!("{claim} tasks"));
        assert_bounded_rejection(&claiming(&good, fds_len, claim), &format!("{claim} fds"));
        assert_bounded_rejection(&claiming(&good, data_len, claim), &format!("{claim} queued bytes"));
    }
}

#[test]
fn real_images_decode_within_the_bound() {
    for (tasks, data) in [(1, 0), (50, 10), (3, 300_000)] {
        let bytes = image::encode(&body(tasks, &vec![7u8; data])).unwrap();
        let (result, peak) = peak_of(|| image::decode(&bytes, "big.img"));
        result.unwrap();
        let bound = image::alloc_bound((bytes.len() - 24) as u64);
        assert!(peak as u64 <= bound, "{tasks} tasks: {peak} > {bound}");
    }
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_damage_behind_a_valid_checksum_never_panics_or_overallocates() {
    let good = image::encode(&body(4, b"queued bytes")).unwrap();
    let mut rng = Rng(0x5eed_c0de);
    for round in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = 24 + (rng.next() as usize) % (bytes.len() - 24);
            match rng.next() % 4 {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes[at] = [251, 252, 253, 254, 255][(rng.next() % 5) as usize],
                2 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, rng.next() as u8),
            }
        }
        let bytes = resealed(bytes);
        let (result, peak) = peak_of(|| image::decode(&bytes, "fuzzed.img"));
        let bound = image::alloc_bound((bytes.len() - 24) as u64);
        assert!(peak as u64 <= bound, "round {round}: {peak} > {bound}");
        if let Err(e) = result {
            assert_eq!(e.to_string().lines().count(), 1, "round {round}: {e}");
        }
    }
}

#[test]
fn the_command_line_rejects_each_bad_header_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = image::encode(&body(1, b"hello")).unwrap();
    let with = |at: usize, field: &[u8]| {
        let mut b = good.clone();
        b[at..at + field.len()].copy_from_slice(field);
        b
    };
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("empty", Vec::new(), "not a crd image (bad magic)".into()),
        ("wrong-magic", with(0, b"CRDIMAGX"), "not a crd image (bad magic)".into()),
        ("half-prefix", good[..14].to_vec(), "truncated image (14 bytes; expected 24)".into()),
        (
            "newer",
            with(8, &(image::FORMAT_VERSION + 1).to_le_bytes()),
            format!("image format v{} is newer than this crd supports", image::FORMAT_VERSION + 1),
        ),
        ("older", with(8, &0u32.to_le_bytes()), "image format v0 is not supported".into()),
        (
            "oversize",
            with(12, &(image::MAX_BODY + 1).to_le_bytes()),
            format!("image body of {} bytes exceeds the", image::MAX_BODY + 1),
        ),
        ("long-body", with(12, &1000u64.to_le_bytes()), "truncated image".into()),
        ("short-body", with(12, &1u64.to_le_bytes()), "bytes of trailing garbage".into()),
        ("bit-flip", with(30, &[good[30] ^ 0x40]), "image is corrupt (checksum mismatch)".into()),
        ("huge-claim", claiming(&good, 24 + 8, 1 << 60), "image is corrupt (".into()),
    ];
    for (name, bytes, message) in cases {
        let path = dir.path().join(name);
        fs::write(&path, &bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        for command in ["inspect", "restore"] {
            let out = crd(&[command, path.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command} {name}: {err}");
            assert_eq!(err.lines().count(), 1, "{command} {name}: {err}");
            assert!(err.starts_with(&format!("crd: {}: ", path.display())), "{command} {name}: {err}");
            assert!(err.contains(&message), "{command} {name}: {err}");
            assert!(out.stdout.is_empty(), "{command} {name}: no partial output");
        }
    }
}

/// The `image_decode` fuzz target's seed with one object of every kind crd saves state
/// for: epolls (one watching the others, one watching an epoll), timers relative and
/// absolute, a signalfd, an inotify, pidfds, a socketpair with data and an eventfd in
/// flight, a TCP listener, a pipe with data, a memfd, a fanotify group.
const KINDS_SEED: &str = "kinds.img";

/// The kinds [`KINDS_SEED`] must hold.
const SEED_KINDS: [Kind; 13] = [
    Kind::Pipe,
    Kind::Eventfd,
    Kind::Memfd,
    Kind::Epoll,
    Kind::Timerfd,
    Kind::Signalfd,
    Kind::Inotify,
    Kind::Pidfd,
    Kind::Unix,
    Kind::Inet,
    Kind::Regular,
    Kind::CharDevice,
    Kind::Fanotify,
];

/// The image [`KINDS_SEED`] is: a checkpoint of a fixture with every kind.
fn kinds_image() -> ImageBody {
    let scratch = tempfile::tempdir().unwrap();
    let watched = scratch.path().display().to_string();
    let inotify = format!("inotify:13:300:{watched}");
    let file = format!("open:19:rwc:{watched}/seed");
    let fanotify = format!("fanotify:18:10:28:{watched}/seed");
    #[rustfmt::skip]
    let steps = [
        "pipe:3:4", "write:4:queued", "socketpair:5:6", "fill:5:100", "eventfd:7:3:s",
        "memfd:8:seed:64:s", "timerfd:9:monotonic:3600000:1500:", "timerfd:10:realtime:3600000:0:ac",
        "signalfd:11:USR1,USR2", "pidfd:12", &inotify, "tcplisten:14", "epoll:15", "epoll:16",
        "epollctl:15:3:80000001:0xdead000000000003", "epollctl:15:5:2001:5", "epollctl:15:7:1:0xffffffffffffffff",
        "epollctl:15:9:1:9", "epollctl:15:10:40000001:10", "epollctl:15:11:1:11", "epollctl:15:12:1:12",
        "epollctl:15:13:1:13", "epollctl:15:14:10000001:14", "epollctl:16:15:1:0x10",
        "sendfd:6:7", &file, &fanotify, "open:20:r:/dev/null", "fork", "pidfd:17:p",
    ];
    let fixture = crd_tests::spawn(&steps, 2);
    crd_tests::checkpoint(fixture.root(), true, crd::Source::Bpf)
}

fn kinds_of(body: &ImageBody) -> std::collections::BTreeSet<Kind> {
    body.graph.index().objects.values().map(|o| o.state.kind()).collect()
}

#[test]
fn the_image_fuzz_seed_of_every_kind_is_committed_and_holds_them() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/image_decode");
    let seed = dir.join(KINDS_SEED);
    if std::env::var_os("CRD_WRITE_FUZZ_SEEDS").is_some() {
        crd_tests::require_root!();
        let body = kinds_image();
        assert!(kinds_of(&body).is_superset(&SEED_KINDS.into()), "{:?}", kinds_of(&body));
        fs::write(&seed, image::encode(&body).unwrap()).unwrap();
    }
    // The VM matrix's guests see the test binaries, not the source tree.
    if !dir.is_dir() {
        return;
    }
    let committed = fs::read(&seed).unwrap_or_else(|e| {
        panic!("{}: {e}: rerun this test as root with CRD_WRITE_FUZZ_SEEDS=1", seed.display())
    });
    let body = image::decode(&committed, KINDS_SEED).expect("the seed decodes");
    let missing: Vec<&Kind> = SEED_KINDS.iter().filter(|k| !kinds_of(&body).contains(k)).collect();
    assert!(missing.is_empty(), "{} lacks {missing:?}: rerun with CRD_WRITE_FUZZ_SEEDS=1", seed.display());
}
