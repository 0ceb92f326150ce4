//! Kernel struct field offsets from the running kernel's BTF.
//!
//! Rust eBPF emits no CO-RE relocations, so crd does in userspace what libbpf would do at
//! load time: look each field up in `/sys/kernel/btf/vmlinux` (through anonymous structs
//! and unions, as the kernel nests many fields) and hand the offsets to the BPF programs
//! as a frozen global. One BPF object then reads the right bytes on every kernel.
use std::path::Path;

use btf_rs::{Backend, Btf, Type};

use super::btf_names::NameIndex;
use crd_common::{
    Config, FieldGroup, KIND_BPF_LOOP, KIND_EPOLL, KIND_EVENTFD, KIND_FD_WALK, KIND_ITER_TASK_FILTER,
    KIND_NAMED, KIND_SHMEM, KIND_SIGNALFD, KIND_SOCKET, KIND_SOCKET_TYPED, KIND_TIMERFD, Offsets,
    WINDOW_BYTES, WINDOW_COUNT, WINDOW_FILE, WINDOW_INODE, WINDOW_PIPE, WINDOW_SB, WINDOW_SOCK,
    WINDOW_SOCK_TYPE, WINDOW_UNIX, Window,
};

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error(
        "kernel BTF gives {structure}.{field} {found} bytes where crd's BPF programs load {expected}: this kernel is not supported by the BPF harvester; use --source procfs"
    )]
    Width { structure: &'static str, field: &'static str, found: u32, expected: u32 },
    #[error("kernel BTF not found at {0}: this kernel lacks CONFIG_DEBUG_INFO_BTF; use --source procfs")]
    NoBtf(String),
    #[error("cannot read the BTF file {0} given with --btf: {1}")]
    BtfFile(String, std::io::Error),
    #[error("cannot parse kernel BTF: {0}")]
    Parse(String),
    #[error("kernel BTF has no function {0}: this kernel has no such BPF iterator; use --source procfs")]
    NoFunction(String),
    #[error(
        "kernel BTF has no struct {0}: this kernel is not supported by the BPF harvester; use --source procfs"
    )]
    NoStruct(&'static str),
    #[error(
        "kernel BTF has no field {1} in struct {0}: this kernel is not supported by the BPF harvester; use --source procfs"
    )]
    NoField(&'static str, &'static str),
    #[error(
        "struct {0} is laid out in a way crd's BPF programs do not read ({1}): this kernel is not supported by the BPF harvester; use --source procfs"
    )]
    Layout(&'static str, String),
}

/// Where the BTF to use lives: `btf` (`crd --btf FILE`, e.g. a BTFHub file for a kernel
/// without `/sys/kernel/btf/vmlinux`, as libbpf's `btf_custom_path`), else the running
/// kernel's. Only an explicit option chooses it: never the environment, since crd runs
/// as root.
pub fn kernel_btf_path(btf: Option<&Path>) -> &Path {
    btf.unwrap_or(Path::new(VMLINUX_BTF))
}

/// The kernel's BTF as bytes, for aya (which needs it to find the iterators' attach
/// points). Mapped where the kernel allows it (6.10+): sysfs hands the 5 MB file out
/// a page per `read()`, ~1,300 calls and ~45 ms; else read.
pub enum BtfBytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for BtfBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            BtfBytes::Mapped(map) => map,
            BtfBytes::Read(bytes) => bytes,
        }
    }
}

impl BtfBytes {
    /// The BTF at [`kernel_btf_path`]`(btf)`.
    pub fn of_kernel(btf: Option<&Path>) -> Result<Self, OffsetsError> {
        let path = kernel_btf_path(btf);
        let missing = |e: std::io::Error| match btf {
            Some(_) => OffsetsError::BtfFile(path.display().to_string(), e),
            None => OffsetsError::NoBtf(path.display().to_string()),
        };
        let file = std::fs::File::open(path).map_err(missing)?;
        // SAFETY: the kernel's BTF never changes while the system runs (and a file named
        // by --btf is the caller's to keep still); the map is private and read-only, the
        // only kind sysfs allows.
        match unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) } {
            Ok(map) => Ok(BtfBytes::Mapped(map)),
            Err(_) => std::fs::read(path).map(BtfBytes::Read).map_err(missing),
        }
    }
}

/// A parsed kernel BTF, for offset look-ups.
pub struct KernelBtf {
    btf: Btf,
    /// The ids of every name crd asks for, found in one pass ([`NameIndex`]); None where
    /// the BTF is not one that pass reads (btf-rs then scans for each name).
    names: Option<NameIndex>,
    /// Structs already looked up: each name look-up scans every type of the kernel's
    /// BTF, and `offsets` asks for a few structs many times.
    structs: std::cell::RefCell<std::collections::HashMap<&'static str, btf_rs::Struct>>,
}

impl KernelBtf {
    /// Parses the running kernel's BTF ([`VMLINUX_BTF`]; another file: [`from_file`](Self::from_file)).
    pub fn from_sys_fs() -> Result<Self, OffsetsError> {
        Self::from_file(kernel_btf_path(None))
    }

    /// From BTF already in memory (see [`BtfBytes`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OffsetsError> {
        let btf = mapped_copy(bytes).map_err(|e| OffsetsError::Parse(e.to_string()))?;
        Ok(Self { btf, names: NameIndex::build(bytes, &looked_up_names()), structs: Default::default() })
    }

    pub fn from_file(path: &Path) -> Result<Self, OffsetsError> {
        if !path.exists() {
            return Err(OffsetsError::NoBtf(path.display().to_string()));
        }
        // Mapping the BTF and decoding only the types asked for is ~10x faster than
        // parsing all of it (0.3 s for vmlinux): from a mapped copy (btf-rs maps files
        // shared, which sysfs refuses).
        let bytes = BtfBytes::of_kernel(Some(path))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            OffsetsError::Parse(why) => OffsetsError::Parse(format!("{}: {why}", path.display())),
            e => e,
        })
    }

    /// The ids of the types named `name`: from the index if it has the name, else by a
    /// scan of every type.
    fn ids_by_name(&self, name: &str) -> Vec<u32> {
        match self.names.as_ref().and_then(|index| index.ids(name)) {
            Some(ids) => ids.to_vec(),
            None => self.btf.resolve_ids_by_name(name).unwrap_or_default(),
        }
    }

    /// The types named `name` (see [`ids_by_name`](Self::ids_by_name)).
    fn types_by_name(&self, name: &str) -> Vec<Type> {
        self.ids_by_name(name).into_iter().filter_map(|id| self.btf.resolve_type_by_id(id).ok()).collect()
    }

    /// The BTF id of the function `name` (a BPF iterator's attach point is the function
    /// `bpf_iter_<type>`).
    pub fn function_id(&self, name: &str) -> Result<u32, OffsetsError> {
        self.ids_by_name(name)
            .into_iter()
            .find(|&id| matches!(self.btf.resolve_type_by_id(id), Ok(Type::Func(_))))
            .ok_or_else(|| OffsetsError::NoFunction(name.to_string()))
    }

    fn structure(&self, name: &'static str) -> Result<btf_rs::Struct, OffsetsError> {
        if let Some(found) = self.structs.borrow().get(name) {
            return Ok(found.clone());
        }
        let found = self
            .types_by_name(name)
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or(OffsetsError::NoStruct(name))?;
        self.structs.borrow_mut().insert(name, found.clone());
        Ok(found)
    }

    /// Byte offset of `field` in struct `name`, searching anonymous members.
    pub fn offset(&self, name: &'static str, field: &'static str) -> Result<u32, OffsetsError> {
        Ok(self.member(name, field)?.0)
    }

    /// Offset and size of the member at `path` (`a.b`: member `b` of the embedded
    /// struct `a`) in struct `name`.
    fn member(&self, name: &'static str, path: &'static str) -> Result<(u32, u32), OffsetsError> {
        let mut s = self.structure(name)?;
        let mut offset = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (here, ty, bitfield) = self.find_member(&s, part).ok_or(OffsetsError::NoField(name, path))?;
            if bitfield {
                // A load reads whole bytes: a bitfield (`sk_shutdown : 2` on old
                // kernels) would come with its neighbours' bits.
                return Err(OffsetsError::Layout(name, format!("{path} is a bitfield")));
            }
            offset += here;
            if parts.peek().is_none() {
                return Ok((offset, self.size_of_type(ty).unwrap_or(0)));
            }
            s = self.aggregate(ty).ok_or(OffsetsError::NoField(name, path))?;
        }
        Err(OffsetsError::NoField(name, path))
    }

    /// `sizeof(struct name)`.
    pub fn size_of(&self, name: &'static str) -> Result<u32, OffsetsError> {
        Ok(self.structure(name)?.size() as u32)
    }

    /// The member named `field` (searching anonymous members): its offset, its type,
    /// and whether it is a bitfield.
    fn find_member(&self, s: &btf_rs::Struct, field: &str) -> Option<(u32, Type, bool)> {
        for member in &s.members {
            let name = self.btf.resolve_name(member).unwrap_or_default();
            let here = member.bit_offset() / 8;
            if name == field {
                let bitfield =
                    member.bitfield_size().is_some_and(|bits| bits != 0) || member.bit_offset() % 8 != 0;
                return Some((here, self.btf.resolve_chained_type(member).ok()?, bitfield));
            }
            if name.is_empty() {
                // An anonymous struct or union: its members live at our offset plus
                // theirs.
                if let Some(inner) =
                    self.btf.resolve_chained_type(member).ok().and_then(|t| self.aggregate(t))
                    && let Some((off, ty, bitfield)) = self.find_member(&inner, field)
                {
                    return Some((here + off, ty, bitfield));
                }
            }
        }
        None
    }

    /// The struct or union behind `ty` (through typedefs and qualifiers).
    fn aggregate(&self, mut ty: Type) -> Option<btf_rs::Struct> {
        loop {
            ty = match ty {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(t) => self.btf.resolve_chained_type(&t).ok()?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(&t).ok()?
                }
                _ => return None,
            };
        }
    }

    /// The size in bytes of `ty`, as a load of it reads.
    fn size_of_type(&self, ty: Type) -> Option<u32> {
        Some(match ty {
            Type::Int(i) => i.size() as u32,
            Type::Ptr(_) => 8,
            Type::Enum(e) => e.size() as u32,
            Type::Enum64(_) => 8,
            Type::Struct(s) | Type::Union(s) => s.size() as u32,
            Type::Array(a) => {
                let element = self.btf.resolve_chained_type(&a).ok()?;
                a.len() as u32 * self.size_of_type(element)?
            }
            Type::Typedef(t) => self.size_of_type(self.btf.resolve_chained_type(&t).ok()?)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                self.size_of_type(self.btf.resolve_chained_type(&t).ok()?)?
            }
            _ => return None,
        })
    }

    /// Resolves every field of [`Offsets::FIELDS`] (checking each load width against
    /// BTF) into the configuration the BPF programs read. A missing core field makes
    /// the BPF harvester unsupported; a missing field of a kind leaves that kind's bit
    /// clear (its fds are then listed as opaque) with a warning.
    pub fn config(&self) -> Result<Config, OffsetsError> {
        let mut config = config_from(
            |structure, path| self.member(structure, path),
            self.size_of("pipe_buffer")?,
            self.has_helpers(TYPED_SOCKET_HELPERS),
        )?;
        if self.has_bpf_loop() {
            config.kinds |= KIND_BPF_LOOP;
        }
        if self.has_task_iter_filter() {
            config.kinds |= KIND_ITER_TASK_FILTER;
        }
        if self.has_fd_walk() {
            config.kinds |= KIND_FD_WALK;
        }
        Ok(config)
    }

    /// Whether the task iterators take a task filter: `union bpf_iter_link_info` has its
    /// `task` member (6.1+).
    pub fn has_task_iter_filter(&self) -> bool {
        self.types_by_name(LINK_INFO).into_iter().any(|t| match t {
            Type::Union(u) => self.find_member(&u, "task").is_some(),
            _ => false,
        })
    }

    /// Whether `crd_task_walk` is the fd program ([`KIND_FD_WALK`]): the kernel has
    /// `bpf_loop` and is 6.2 or later, told by the kfunc `bpf_rdonly_cast` (6.2). Before
    /// 6.2 the task_file program stays: the issue that brought the walk asked for 6.2+,
    /// and the VM matrix checks the task_file path on 5.10 and 6.1.
    pub fn has_fd_walk(&self) -> bool {
        self.has_bpf_loop() && self.function_id("bpf_rdonly_cast").is_ok()
    }

    /// Whether the kernel has the `bpf_loop` helper (5.17+).
    pub fn has_bpf_loop(&self) -> bool {
        self.has_helpers(&["BPF_FUNC_loop"])
    }

    /// Whether this kernel knows every helper in `names` (`enum bpf_func_id`'s
    /// `BPF_FUNC_*` values, as libbpf's `bpf_core_enum_value_exists` would check): the
    /// verifier rejects a call to one it does not know, even where the program would
    /// never make it.
    fn has_helpers(&self, names: &[&str]) -> bool {
        let Some(values) = self.types_by_name(HELPER_IDS).into_iter().find_map(|t| match t {
            Type::Enum(e) => Some(e),
            _ => None,
        }) else {
            return false;
        };
        let known: Vec<String> =
            values.members.iter().filter_map(|m| self.btf.resolve_name(m).ok()).collect();
        names.iter().all(|name| known.iter().any(|k| k == name))
    }
}

/// The union whose members say which iterators take a filter.
const LINK_INFO: &str = "bpf_iter_link_info";
/// The enum of the kernel's helpers.
const HELPER_IDS: &str = "bpf_func_id";

/// Every name crd looks up in the kernel's BTF, for [`NameIndex`]: the structs of
/// [`Offsets::FIELDS`], `pipe_buffer`, the iterators' functions and the feature checks'
/// types.
fn looked_up_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Offsets::FIELDS.iter().map(|f| f.structure).collect();
    names.extend(["pipe_buffer", "bpf_iter_task", "bpf_iter_task_file", LINK_INFO, HELPER_IDS]);
    names.sort_unstable();
    names.dedup();
    names
}

/// The helpers crd's typed socket reads call (see [`KIND_SOCKET_TYPED`]).
const TYPED_SOCKET_HELPERS: &[&str] = &["BPF_FUNC_sock_from_file", "BPF_FUNC_skc_to_unix_sock"];

/// [`KernelBtf::config`] with `member` answering "offset and size of this member path
/// in this struct" (a fake in tests); `typed_socket_helpers`: the kernel has the helpers
/// of [`KIND_SOCKET_TYPED`].
fn config_from(
    member: impl Fn(&'static str, &'static str) -> Result<(u32, u32), OffsetsError>,
    pipe_buffer_size: u32,
    typed_socket_helpers: bool,
) -> Result<Config, OffsetsError> {
    let mut offsets = Offsets::ZERO;
    let mut missing: Vec<(FieldGroup, String)> = Vec::new();
    let mut file_ref_bias = 0;
    let mut resolved_fields: Vec<(&str, u32, u32)> = Vec::new();
    for field in Offsets::FIELDS {
        let resolved = field
            .paths
            .iter()
            .enumerate()
            .find_map(|(i, path)| member(field.structure, path).ok().map(|found| (i, path, found)));
        let Some((index, path, (offset, size))) = resolved else {
            let error = OffsetsError::NoField(field.structure, field.paths[0]);
            if field.group == FieldGroup::Core {
                return Err(error);
            }
            let what = match member(field.structure, field.paths[0]) {
                Err(OffsetsError::Layout(_, why)) => {
                    format!("{}.{} as a whole field ({why})", field.structure, field.paths[0])
                }
                _ => format!("{}.{}", field.structure, field.paths[0]),
            };
            missing.push((field.group, what));
            continue;
        };
        if field.width != 0 && size != field.width {
            let error = OffsetsError::Width {
                structure: field.structure,
                field: path,
                found: size,
                expected: field.width,
            };
            if field.group == FieldGroup::Core {
                return Err(error);
            }
            missing.push((field.group, error.to_string()));
            continue;
        }
        if field.name == "file_f_ref" {
            // `file_ref_t f_ref` (6.13+) counts from zero for one reference.
            file_ref_bias = if index == 0 { 1 } else { 0 };
        }
        if let Some(slot) = offsets.get_mut(field.name) {
            *slot = offset;
        }
        resolved_fields.push((field.name, offset, field.width));
    }
    let mut kinds =
        KIND_NAMED | KIND_EVENTFD | KIND_SHMEM | KIND_SOCKET | KIND_EPOLL | KIND_TIMERFD | KIND_SIGNALFD;
    for (group, what) in &missing {
        let (bit, consequence) = match group {
            FieldGroup::Named => (KIND_NAMED, "anon-inode files and memfds are listed as opaque"),
            FieldGroup::Eventfd => (KIND_EVENTFD, "eventfds are listed as opaque anon files"),
            FieldGroup::Shmem => (KIND_SHMEM, "memfd seals are not read by BPF"),
            FieldGroup::Socket => (KIND_SOCKET, "sockets are listed as opaque sockets"),
            FieldGroup::Epoll => (KIND_EPOLL, "epoll interest lists are read from fdinfo"),
            FieldGroup::Timerfd => (KIND_TIMERFD, "timerfds are read from fdinfo"),
            FieldGroup::Signalfd => (KIND_SIGNALFD, "signalfd masks are read from fdinfo"),
            FieldGroup::Core => continue,
        };
        if kinds & bit != 0 {
            log::warn!("this kernel's BTF lacks {what}: {consequence}");
        }
        kinds &= !bit;
    }
    if kinds & KIND_NAMED == 0 {
        // The eventfd, shmem, epoll, timerfd and signalfd reads start from the name's
        // tail.
        kinds &= !(KIND_EVENTFD | KIND_SHMEM | KIND_EPOLL | KIND_TIMERFD | KIND_SIGNALFD);
    }
    if kinds & KIND_SOCKET != 0 && typed_socket_helpers {
        kinds |= KIND_SOCKET_TYPED;
    }
    let mut windows = [Window::ZERO; WINDOW_COUNT];
    for (which, names) in WINDOW_FIELDS {
        let fields: Vec<(u32, u32)> = resolved_fields
            .iter()
            .filter(|(name, _, _)| names.contains(name))
            .map(|&(_, offset, width)| (offset, width))
            .collect();
        windows[*which] = window(&fields);
    }
    Ok(Config { offsets, pipe_buffer_size, file_ref_bias, kinds, match_all: 0, epoll_max_items: 0, windows })
}

/// The fields of each struct `crd_task_walk` copies as one span ([`Config::windows`]):
/// those every fd's record reads, and a pipe's. (`inode::i_pipe` is left out: only a
/// FIFO's record reads it, and it lies far from the others.)
const WINDOW_FIELDS: &[(usize, &[&str])] = &[
    (
        WINDOW_FILE,
        &[
            "file_f_inode",
            "file_f_flags",
            "file_f_mode",
            "file_f_pos",
            "file_f_ref",
            "file_private_data",
            "file_dentry",
            "file_socket",
        ],
    ),
    (WINDOW_INODE, &["inode_i_mode", "inode_i_ino", "inode_i_size", "inode_i_sb", "inode_i_rdev"]),
    (WINDOW_SB, &["sb_s_magic", "sb_s_dev"]),
    (
        WINDOW_PIPE,
        &[
            "pipe_head",
            "pipe_tail",
            "pipe_ring_size",
            "pipe_max_usage",
            "pipe_readers",
            "pipe_writers",
            "pipe_bufs",
        ],
    ),
    (
        WINDOW_SOCK,
        &[
            "sock_family",
            "sock_state",
            "sock_rcv_saddr",
            "sock_daddr",
            "sock_v6_rcv_saddr",
            "sock_v6_daddr",
            "sock_num",
            "sock_dport",
        ],
    ),
    // Only what every socket's record reads: a listener's backlog and a queue length
    // lie a cache line or more away.
    (WINDOW_SOCK_TYPE, &["sock_type", "sock_protocol", "sock_shutdown"]),
    (WINDOW_UNIX, &["unix_peer", "unix_addr"]),
];

/// The span of at most [`WINDOW_BYTES`] that holds the most of `fields` (offset, width),
/// the shortest of those: it starts at one field and ends with the last it holds, so it
/// never reaches past the struct (a copy past a slab object's end could touch a guard
/// page, which KFENCE would report).
fn window(fields: &[(u32, u32)]) -> Window {
    let mut best = (0, Window::ZERO);
    for &(start, _) in fields {
        let held: Vec<u32> = fields
            .iter()
            .filter(|&&(offset, width)| offset >= start && offset + width <= start + WINDOW_BYTES)
            .map(|&(offset, width)| offset + width)
            .collect();
        let len = held.iter().max().map_or(0, |end| end - start);
        if held.len() > best.0 || (held.len() == best.0 && len < best.1.len) {
            best = (held.len(), Window { start, len });
        }
    }
    best.1
}

/// Copies a BTF file into an anonymous memory file and maps that.
fn mapped_copy(bytes: &[u8]) -> btf_rs::Result<Btf> {
    use std::io::Write;
    let memfd = nix::sys::memfd::memfd_create(c"crd-btf", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(bytes)?;
    // The mapping keeps the memory file alive after `file` is closed.
    Btf::from_file_with_backend(
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)),
        Backend::Mmap,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets the notes recorded on 6.18 by hand; checks the anonymous-member walk
    /// on the kernel this runs on (skipped elsewhere).
    #[test]
    fn offsets_resolve_on_the_running_kernel() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            eprintln!("no kernel BTF here; skipped");
            return;
        };
        let config = btf.config().expect("all fields resolve");
        let off = config.offsets;
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let every = KIND_NAMED | KIND_EVENTFD | KIND_SHMEM | KIND_SOCKET;
        assert_eq!(config.kinds & every, every, "every kind's fields on this kernel");
        // `struct unix_sock` begins with its `struct sock`; `socket_alloc` with its socket.
        assert_eq!(off.sock_family, 16, "sock_common: two addresses, the hash, two ports");
        assert_eq!(off.sock_dport + 2, off.sock_num, "skc_num follows skc_dport in skc_portpair");
        assert_eq!(off.sock_daddr + 4, off.sock_rcv_saddr, "skc_rcv_saddr follows skc_daddr");
        assert!(off.unix_peer > off.sock_rqueue_len, "unix_sock's own members follow its sock");
        // Fields every supported kernel has at a fixed place.
        assert_eq!(off.inode_i_mode, 0);
        assert!(off.task_tgid == off.task_pid + 4, "tgid follows pid in task_struct");
        assert!(config.pipe_buffer_size >= 40);
        assert!(off.inode_i_pipe > off.inode_i_sb);
        if release.starts_with("6.18.") {
            assert_eq!(
                config.kinds & KIND_SOCKET_TYPED,
                KIND_SOCKET_TYPED,
                "6.18 has the typed socket helpers"
            );
            assert_eq!((off.task_pid, off.task_tgid), (1264, 1268));
            assert_eq!((off.file_f_inode, off.file_f_flags, off.file_f_pos), (32, 40, 112));
            assert_eq!(off.inode_i_pipe, 584);
            // As `bpftool btf dump` (raw, not `format c`) gives them on 6.18.
            assert_eq!(off.socket_sk, 24);
            assert_eq!((off.sock_daddr, off.sock_rcv_saddr, off.sock_dport, off.sock_num), (0, 4, 12, 14));
            assert_eq!(
                (off.sock_family, off.sock_state, off.sock_v6_daddr, off.sock_v6_rcv_saddr),
                (16, 18, 56, 72)
            );
            assert_eq!((off.sock_rqueue_len, off.sock_protocol, off.sock_type), (184, 532, 534));
            assert_eq!((off.sock_shutdown, off.sock_ack_backlog, off.sock_max_ack_backlog), (575, 600, 604));
            assert_eq!(
                (off.unix_addr, off.unix_peer, off.unix_address_len, off.unix_address_name),
                (784, 872, 4, 8)
            );
            assert_eq!(config.file_ref_bias, 1);
        }
    }

    /// The running kernel's BTF, with `hide` answering "no such field" (for a struct, or
    /// `struct.path` for one member) and `resize` giving other sizes.
    fn config_with(
        btf: &KernelBtf,
        hide: &dyn Fn(&str) -> bool,
        resize: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Config, OffsetsError> {
        config_from(
            |structure, path| {
                if hide(structure) || hide(&format!("{structure}.{path}")) {
                    return Err(OffsetsError::NoField(structure, path));
                }
                let (offset, size) = btf.member(structure, path)?;
                Ok((offset, resize(path).unwrap_or(size)))
            },
            64,
            btf.has_helpers(TYPED_SOCKET_HELPERS),
        )
    }

    #[test]
    fn a_kind_whose_fields_are_missing_degrades_alone() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        // What `config` gives but the bpf_loop probe, which `config_with` does not make.
        let full = config_with(&btf, &|_| false, &|_| None).unwrap();
        let without_eventfd = config_with(&btf, &|s| s == "eventfd_ctx", &|_| None).expect("still loads");
        assert_eq!(without_eventfd.kinds, full.kinds & !KIND_EVENTFD, "only eventfds degrade");
        assert_eq!(without_eventfd.offsets.task_tgid, full.offsets.task_tgid);
        let without_names = config_with(&btf, &|s| s == "dentry", &|_| None).expect("still loads");
        assert_eq!(
            without_names.kinds,
            full.kinds
                & !(KIND_NAMED | KIND_EVENTFD | KIND_SHMEM | KIND_EPOLL | KIND_TIMERFD | KIND_SIGNALFD),
            "eventfd, shmem, epoll, timerfd and signalfd reads start from the name; sockets do not"
        );
        // A core field missing, or loaded at the wrong width, is no BPF harvester at all.
        assert!(matches!(
            config_with(&btf, &|s| s == "pipe_inode_info", &|_| None),
            Err(OffsetsError::NoField(..))
        ));
        let wide_mode = config_with(&btf, &|_| false, &|path| (path == "i_mode").then_some(4));
        assert!(matches!(wide_mode, Err(OffsetsError::Width { expected: 2, found: 4, .. })), "{wide_mode:?}");
        // A kind's field at the wrong width degrades that kind.
        let wide_count = config_with(&btf, &|_| false, &|path| (path == "count").then_some(4)).unwrap();
        assert_eq!(wide_count.kinds, full.kinds & !KIND_EVENTFD);
    }

    #[test]
    fn epoll_timerfd_and_signalfd_fields_missing_degrade_their_kind_alone() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        let full = config_with(&btf, &|_| false, &|_| None).unwrap();
        for (hidden, bit) in [
            ("eventpoll", KIND_EPOLL),
            ("epitem.ffd.file", KIND_EPOLL),
            ("rb_node", KIND_EPOLL),
            ("timerfd_ctx", KIND_TIMERFD),
            ("timerfd_ctx.t.alarm.timer.base", KIND_TIMERFD),
            ("hrtimer_clock_base", KIND_TIMERFD),
            ("signalfd_ctx", KIND_SIGNALFD),
        ] {
            let config = config_with(&btf, &|what| what == hidden, &|_| None).expect("still loads");
            assert_eq!(config.kinds, full.kinds & !bit, "without {hidden}");
        }
        // `struct epoll_event` is packed on x86-64: the data follows the events at once.
        assert_eq!(full.offsets.epitem_data, full.offsets.epitem_events + 4);
        assert_eq!(full.offsets.epitem_rbn, 0, "the node opens the item (in a union with its rcu head)");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let (major, minor) = release
            .split(['.', '-'])
            .take(2)
            .filter_map(|n| n.parse::<u32>().ok())
            .fold((0, 0), |(a, _), n| if a == 0 { (n, 0) } else { (a, n) });
        assert_eq!(btf.has_bpf_loop(), (major, minor) >= (5, 17), "bpf_loop came in 5.17 ({release})");
    }

    #[test]
    fn sockets_degrade_to_opaque_when_any_of_their_fields_is_missing() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        // What `config` gives but the bpf_loop probe, which `config_with` does not make.
        let full = config_with(&btf, &|_| false, &|_| None).unwrap();
        assert_ne!(full.kinds & KIND_SOCKET, 0);
        let socket_fields: Vec<String> = Offsets::FIELDS
            .iter()
            .filter(|f| f.group == FieldGroup::Socket)
            .map(|f| format!("{}.{}", f.structure, f.paths[0]))
            .collect();
        assert!(socket_fields.len() >= 20, "{socket_fields:?}");
        // Each field alone: only sockets degrade (and the typed reads with them).
        // `file.private_data` is also the Named group's, which it takes along.
        for hidden in socket_fields.iter().filter(|f| *f != "file.private_data") {
            let config = config_with(&btf, &|what| what == hidden, &|_| None).expect("still loads");
            assert_eq!(config.kinds, full.kinds & !(KIND_SOCKET | KIND_SOCKET_TYPED), "without {hidden}");
            assert_eq!(config.offsets.task_tgid, full.offsets.task_tgid);
        }
        // Whole structs (a kernel without unix sockets built in has no `unix_sock`).
        for hidden in ["socket", "unix_sock", "unix_address"] {
            let config = config_with(&btf, &|what| what == hidden, &|_| None).unwrap();
            assert_eq!(config.kinds & KIND_SOCKET, 0, "without struct {hidden}");
        }
        // `sk_shutdown` as a bitfield's whole word (older kernels), or a u32 backlog at 2
        // bytes: loaded at the wrong width, sockets degrade.
        for (path, size) in [("sk_shutdown", 4), ("sk_ack_backlog", 2)] {
            let config = config_with(&btf, &|_| false, &|p| (p == path).then_some(size)).unwrap();
            assert_eq!(config.kinds & KIND_SOCKET, 0, "{path} at {size} bytes");
            assert_eq!(config.kinds & KIND_EVENTFD, full.kinds & KIND_EVENTFD);
        }
    }

    #[test]
    fn socket_fields_resolve_through_anonymous_unions_and_structs() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        // `skc_daddr` sits in an anonymous struct in an anonymous union of `sock_common`,
        // itself the named member `__sk_common` of `sock`.
        let (common, _) = btf.member("sock", "__sk_common").unwrap();
        assert_eq!(common, 0);
        for (field, size) in
            [("skc_daddr", 4), ("skc_rcv_saddr", 4), ("skc_dport", 2), ("skc_num", 2), ("skc_v6_daddr", 16)]
        {
            let (inner, inner_size) = btf.member("sock_common", field).unwrap();
            let path: &'static str = Box::leak(format!("__sk_common.{field}").into_boxed_str());
            assert_eq!(btf.member("sock", path).unwrap(), (common + inner, inner_size), "{field}");
            assert_eq!(inner_size, size, "{field}");
        }
        assert_eq!(btf.member("sock", "sk_receive_queue.qlen").unwrap().1, 4);
        // A flexible array: an address, no size.
        assert_eq!(btf.member("unix_address", "name").unwrap().1, 0);
    }

    #[test]
    fn bitfields_are_refused_as_fields() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        // `unsigned char skc_reuse: 4` (every kernel): a byte load would bring its
        // neighbours' bits along.
        let err = btf.member("sock_common", "skc_reuse").unwrap_err();
        assert!(
            matches!(err, OffsetsError::Layout("sock_common", ref why) if why.contains("bitfield")),
            "{err}"
        );
        // A plain member of a struct that has bitfields still resolves.
        assert_eq!(btf.member("sock_common", "skc_state").unwrap().1, 1);
    }

    #[test]
    fn nested_member_paths_resolve() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        let (f_path, _) = btf.member("file", "f_path").unwrap();
        let (dentry_in_path, size) = btf.member("path", "dentry").unwrap();
        assert_eq!(btf.member("file", "f_path.dentry").unwrap(), (f_path + dentry_in_path, size));
        assert_eq!(size, 8);
    }

    #[test]
    fn a_mapped_copy_gives_the_same_offsets() {
        let Ok(direct) = KernelBtf::from_sys_fs() else { return };
        let bytes = std::fs::read(VMLINUX_BTF).expect("kernel BTF readable");
        let copy = KernelBtf::from_bytes(&bytes).expect("mapped copy");
        assert_eq!(copy.config().unwrap(), direct.config().unwrap());
    }

    #[test]
    fn unknown_fields_are_named_in_the_error() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            return;
        };
        let err = btf.offset("file", "no_such_field").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF has no field no_such_field in struct file: this kernel is not supported by the BPF harvester; use --source procfs"
        );
    }
}
