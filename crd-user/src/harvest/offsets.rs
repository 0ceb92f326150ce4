//! Kernel struct field offsets from the running kernel's BTF.
//!
//! Rust eBPF emits no CO-RE relocations, so crd does in userspace what libbpf would do at
//! load time: look each field up in `/sys/kernel/btf/vmlinux` (through anonymous structs
//! and unions, as the kernel nests many fields) and hand the offsets to the BPF programs
//! as a frozen global. One BPF object then reads the right bytes on every kernel.
use std::path::Path;

use btf_rs::{Backend, Btf, Type};
use crd_common::Offsets;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("kernel BTF not found at {0}: this kernel lacks CONFIG_DEBUG_INFO_BTF; use --source procfs")]
    NoBtf(String),
    #[error("cannot read the BTF file {0} given with --btf: {1}")]
    BtfFile(String, std::io::Error),
    #[error("cannot parse kernel BTF: {0}")]
    Parse(String),
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
    /// Structs already looked up: each name look-up scans every type of the kernel's
    /// BTF, and `offsets` asks for a few structs many times.
    structs: std::cell::RefCell<std::collections::HashMap<&'static str, btf_rs::Struct>>,
}

impl KernelBtf {
    /// Parses the running kernel's BTF ([`VMLINUX_BTF`]; another file: [`from_file`](Self::from_file)).
    pub fn from_sys_fs() -> Result<Self, OffsetsError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    /// From BTF already in memory (see [`BtfBytes`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OffsetsError> {
        let btf = mapped_copy(bytes).map_err(|e| OffsetsError::Parse(e.to_string()))?;
        Ok(Self { btf, structs: Default::default() })
    }

    pub fn from_file(path: &Path) -> Result<Self, OffsetsError> {
        if !path.exists() {
            return Err(OffsetsError::NoBtf(path.display().to_string()));
        }
        // Mapping the BTF and decoding only the types asked for is ~10x faster than
        // parsing all of it (0.3 s for vmlinux). btf-rs maps files shared, which sysfs
        // refuses: map a copy in memory instead.
        let btf = Btf::from_file_with_backend(path, Backend::Mmap)
            .or_else(|_| std::fs::read(path).map_err(Into::into).and_then(|bytes| mapped_copy(&bytes)))
            .map_err(|e| OffsetsError::Parse(format!("{}: {e}", path.display())))?;
        Ok(Self { btf, structs: Default::default() })
    }

    fn structure(&self, name: &'static str) -> Result<btf_rs::Struct, OffsetsError> {
        if let Some(found) = self.structs.borrow().get(name) {
            return Ok(found.clone());
        }
        let types = self.btf.resolve_types_by_name(name).map_err(|_| OffsetsError::NoStruct(name))?;
        let found = types
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
        let s = self.structure(name)?;
        self.find_member(&s, field).ok_or(OffsetsError::NoField(name, field))
    }

    /// The first of `fields` that exists, with its index (fields get renamed across
    /// kernel versions).
    pub fn offset_of_any(
        &self,
        name: &'static str,
        fields: &[&'static str],
    ) -> Result<(usize, u32), OffsetsError> {
        let s = self.structure(name)?;
        fields
            .iter()
            .enumerate()
            .find_map(|(i, f)| self.find_member(&s, f).map(|off| (i, off)))
            .ok_or(OffsetsError::NoField(name, fields[0]))
    }

    /// `sizeof(struct name)`.
    pub fn size_of(&self, name: &'static str) -> Result<u32, OffsetsError> {
        Ok(self.structure(name)?.size() as u32)
    }

    fn find_member(&self, s: &btf_rs::Struct, field: &str) -> Option<u32> {
        for member in &s.members {
            let name = self.btf.resolve_name(member).unwrap_or_default();
            let here = member.bit_offset() / 8;
            if name == field {
                return Some(here);
            }
            if name.is_empty() {
                // An anonymous struct or union: its members live at our offset plus
                // theirs.
                if let Some(inner) = self.anonymous_aggregate(member)
                    && let Some(off) = self.find_member(&inner, field)
                {
                    return Some(here + off);
                }
            }
        }
        None
    }

    fn anonymous_aggregate(&self, member: &btf_rs::Member) -> Option<btf_rs::Struct> {
        let mut ty = self.btf.resolve_chained_type(member).ok()?;
        loop {
            ty = match ty {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(t) => self.btf.resolve_chained_type(&t).ok()?,
                Type::Const(t) | Type::Volatile(t) => self.btf.resolve_chained_type(&t).ok()?,
                _ => return None,
            };
        }
    }

    /// Every offset the BPF programs need.
    pub fn offsets(&self) -> Result<Offsets, OffsetsError> {
        // 6.13 replaced `atomic_long_t f_count` by `file_ref_t f_ref`, which counts from
        // zero for one reference.
        let (ref_kind, file_f_ref) = self.offset_of_any("file", &["f_ref", "f_count"])?;
        let offsets = Offsets {
            task_pid: self.offset("task_struct", "pid")?,
            task_tgid: self.offset("task_struct", "tgid")?,
            task_real_parent: self.offset("task_struct", "real_parent")?,
            task_comm: self.offset("task_struct", "comm")?,
            task_files: self.offset("task_struct", "files")?,
            files_fdt: self.offset("files_struct", "fdt")?,
            fdtable_close_on_exec: self.offset("fdtable", "close_on_exec")?,
            file_f_flags: self.offset("file", "f_flags")?,
            file_f_mode: self.offset("file", "f_mode")?,
            file_f_pos: self.offset("file", "f_pos")?,
            file_f_inode: self.offset("file", "f_inode")?,
            file_f_ref,
            inode_i_mode: self.offset("inode", "i_mode")?,
            inode_i_ino: self.offset("inode", "i_ino")?,
            inode_i_sb: self.offset("inode", "i_sb")?,
            inode_i_rdev: self.offset("inode", "i_rdev")?,
            inode_i_pipe: self.offset("inode", "i_pipe")?,
            sb_s_magic: self.offset("super_block", "s_magic")?,
            sb_s_dev: self.offset("super_block", "s_dev")?,
            pipe_head: self.offset("pipe_inode_info", "head")?,
            pipe_tail: self.offset("pipe_inode_info", "tail")?,
            pipe_ring_size: self.offset("pipe_inode_info", "ring_size")?,
            pipe_max_usage: self.offset("pipe_inode_info", "max_usage")?,
            pipe_readers: self.offset("pipe_inode_info", "readers")?,
            pipe_writers: self.offset("pipe_inode_info", "writers")?,
            pipe_bufs: self.offset("pipe_inode_info", "bufs")?,
            pipe_buffer_len: self.offset("pipe_buffer", "len")?,
            pipe_buffer_size: self.size_of("pipe_buffer")?,
            file_ref_bias: if ref_kind == 0 { 1 } else { 0 },
        };
        check_pipe_chunk(&offsets)?;
        Ok(offsets)
    }
}

/// The BPF program reads the pipe fields it needs in one copy of
/// [`crd_common::PIPE_CHUNK`] bytes from `head` on: they must all lie inside it.
fn check_pipe_chunk(o: &Offsets) -> Result<(), OffsetsError> {
    let fields = [
        ("tail", o.pipe_tail, 4),
        ("ring_size", o.pipe_ring_size, 4),
        ("readers", o.pipe_readers, 4),
        ("writers", o.pipe_writers, 4),
        ("bufs", o.pipe_bufs, 8),
    ];
    for (name, offset, size) in fields {
        if offset < o.pipe_head || offset - o.pipe_head + size > crd_common::PIPE_CHUNK as u32 {
            return Err(OffsetsError::Layout(
                "pipe_inode_info",
                format!(
                    "{name} at {offset} is not within {} bytes after head at {}",
                    crd_common::PIPE_CHUNK,
                    o.pipe_head
                ),
            ));
        }
    }
    Ok(())
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
        let off = btf.offsets().expect("all fields resolve");
        // Fields every supported kernel has at a fixed place.
        assert_eq!(off.inode_i_mode, 0);
        assert!(off.task_tgid == off.task_pid + 4, "tgid follows pid in task_struct");
        assert!(off.pipe_buffer_size >= 40);
        assert!(off.inode_i_pipe > off.inode_i_sb);
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if release.starts_with("6.18.") {
            assert_eq!((off.task_pid, off.task_tgid), (1264, 1268));
            assert_eq!((off.file_f_inode, off.file_f_flags, off.file_f_pos), (32, 40, 112));
            assert_eq!(off.inode_i_pipe, 584);
            assert_eq!(off.file_ref_bias, 1);
        }
    }

    #[test]
    fn a_mapped_copy_gives_the_same_offsets() {
        let Ok(direct) = KernelBtf::from_sys_fs() else { return };
        let bytes = std::fs::read(VMLINUX_BTF).expect("kernel BTF readable");
        let copy = KernelBtf::from_bytes(&bytes).expect("mapped copy");
        assert_eq!(copy.offsets().unwrap(), direct.offsets().unwrap());
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
