//! The BPF harvester: load crd's iterator programs, run them over the asked-for tasks,
//! drain the ring buffer, decode the records.
//!
//! Records are never lost: the programs pause the iteration when the ring is full (see
//! `crd-ebpf`), this loop drains and resumes, and at the end the program's own count of
//! submitted records must equal the count received here, or the harvest is refused.
use std::{
    io::{self, Read},
    mem::size_of,
    path::Path,
};

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::Iter,
};
use crd_common::{
    COMM_LEN, Config, FD_CLOEXEC, FD_HAS_PIPE, FD_PIPE_QUEUE_TRUNCATED, FdRecord, RECORD_FD, RECORD_TASK,
    STAT_READ_FAILED, STAT_RING_FULL, STAT_SUBMITTED, TaskRecord,
};

use super::{
    FdInfo, FileInfo, Harvest, InodeInfo, InodeKind, PipeInfo, TaskInfo,
    offsets::{BtfBytes, KernelBtf, OffsetsError, kernel_btf_path},
};
use crate::types::{Access, DeviceId, Fd, KernelPtr, Pid, Tgid};

/// The BPF object, built by `cargo xtask build` and embedded by build.rs (empty when the
/// crate was built without it).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/crd.bpf.o"));

/// Default ring buffer size: room for ~2,000 fd records between drains.
pub const DEFAULT_RING_BYTES: u32 = 256 * 1024;

/// Test hook (testing builds only): `CRD_RING_BYTES=4096` forces a tiny ring buffer to
/// exercise the pause-and-drain path.
#[cfg(feature = "testing")]
pub const RING_BYTES_ENV: &str = "CRD_RING_BYTES";

/// Test hook (testing builds only): `CRD_TEST_HOLD_HARVEST_MS=N` waits N ms at the start
/// of each BPF harvest, the programs loaded (and for a checkpoint or graft the targets
/// frozen), so tests can interrupt crd there. Ctrl-C still ends the wait.
#[cfg(feature = "testing")]
pub const HOLD_HARVEST_ENV: &str = "CRD_TEST_HOLD_HARVEST_MS";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this crd was built without its BPF object: build it with `cargo xtask build` (or use --source procfs)"
    )]
    NoObject,
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    #[error(
        "cannot load crd's BPF programs ({0}): run as root (CAP_BPF and CAP_PERFMON are needed), or use --source procfs"
    )]
    NotPermitted(String),
    #[error("cannot load crd's BPF programs: {0}")]
    Load(String),
    #[error("reading the {iterator} iterator failed: {source}")]
    Read { iterator: &'static str, source: io::Error },
    #[error(
        "BPF harvest incomplete: the programs submitted {submitted} records but {received} arrived; no image was written"
    )]
    Lost { submitted: u64, received: u64 },
    #[error("BPF harvest unreliable: {0} kernel reads failed; no image was written")]
    ReadFailed(u64),
    #[error("malformed record from the BPF programs (tag {0}, {1} bytes)")]
    BadRecord(u32, usize),
    #[error("interrupted")]
    Interrupted(#[source] crate::Interrupted),
}

impl BpfError {
    /// Whether the error says this kernel (or this build) cannot run the BPF harvester,
    /// as opposed to a missing privilege or a failed harvest.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, BpfError::NoObject | BpfError::Offsets(_) | BpfError::Load(_))
    }
}

/// Loads the harvester `source` asks for: returns the source actually used and the
/// loaded programs (None for /proc). `match_all`, `btf`: see [`BpfHarvester::load`].
pub fn harvester_for(
    source: super::Source,
    match_all: bool,
    btf: Option<&Path>,
) -> Result<(super::Source, Option<BpfHarvester>), BpfError> {
    use super::Source;
    match source {
        Source::Procfs => Ok((Source::Procfs, None)),
        Source::Bpf => Ok((Source::Bpf, Some(BpfHarvester::load(match_all, btf)?))),
        Source::Auto => match BpfHarvester::load(match_all, btf) {
            Ok(harvester) => Ok((Source::Bpf, Some(harvester))),
            Err(e) if e.is_unsupported() => {
                log::warn!("the BPF harvester cannot run here ({e}); reading /proc instead");
                Ok((Source::Procfs, None))
            }
            Err(e) => Err(e),
        },
    }
}

fn load_error(e: impl std::error::Error) -> BpfError {
    // aya's messages leave the kernel's answer to the error's sources: say them all.
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    let lower = text.to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        BpfError::NotPermitted(text)
    } else {
        BpfError::Load(text)
    }
}

/// What to harvest.
pub enum Scope<'a> {
    /// These processes only (a tgid filter map in the kernel).
    Processes(&'a [Tgid]),
    /// Every process on the machine.
    All,
}

/// Counters a harvest leaves behind, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HarvestStats {
    pub records: u64,
    /// Times the ring filled and the iteration was paused to drain it.
    pub ring_full: u64,
    /// `read()` calls on the iterators.
    pub reads: u64,
    /// Time inside those calls: the kernel running the iterators and crd's programs
    /// (the rest of a harvest is draining and decoding in userspace).
    pub kernel_time: std::time::Duration,
}

/// Loaded programs; one load can serve several harvests.
pub struct BpfHarvester {
    ebpf: Ebpf,
    /// The programs' own diagnostics (aya-log), forwarded to the `log` crate after
    /// every read of an iterator.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ring: RingBuf<MapData>,
    /// See [`crd_common::Offsets::file_ref_bias`].
    file_ref_bias: i64,
}

impl BpfHarvester {
    /// Loads the BPF object with this kernel's field offsets. `match_all` makes the
    /// programs ignore the tgid filter; `btf` is the kernel BTF file to read them from
    /// (`--btf`; None: the running kernel's, see [`kernel_btf_path`]).
    pub fn load(match_all: bool, btf: Option<&Path>) -> Result<Self, BpfError> {
        #[cfg(feature = "testing")]
        let ring_bytes =
            std::env::var(RING_BYTES_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_RING_BYTES);
        #[cfg(not(feature = "testing"))]
        let ring_bytes = DEFAULT_RING_BYTES;
        Self::load_with_ring(match_all, ring_bytes, btf)
    }

    /// As [`load`](Self::load), with a ring buffer of `ring_bytes` (a power of two, at
    /// least a page).
    pub fn load_with_ring(match_all: bool, ring_bytes: u32, btf: Option<&Path>) -> Result<Self, BpfError> {
        if BPF_OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        let started = std::time::Instant::now();
        // aya parses all of the kernel's BTF (to find the iterators' attach points) while
        // this thread looks up the few struct offsets: the two take about as long.
        let bytes = BtfBytes::of_kernel(btf)?;
        let btf_path = kernel_btf_path(btf);
        // Three readers of the kernel's BTF, side by side: aya's loader parses it on its
        // own when created (aya 0.14 has no way to hand it ours), `Iter::load` needs a
        // parsed copy to find the iterators' attach points, and crd's offsets come from
        // btf-rs, which decodes only the few structs asked for.
        let (loader, btf, offsets) = std::thread::scope(|scope| {
            let loader = scope.spawn(EbpfLoader::new);
            let btf = Btf::parse(&bytes, Endianness::default())
                .map_err(|e| OffsetsError::Parse(format!("{}: {e}", btf_path.display())));
            let offsets = KernelBtf::from_bytes(&bytes).and_then(|btf| btf.offsets());
            (loader.join(), btf, offsets)
        });
        let (btf, offsets) = (btf?, offsets?);
        let mut loader = loader.map_err(|_| BpfError::Load("aya's loader panicked".into()))?;
        log::debug!("load: kernel BTF parsed in {:?}", started.elapsed());
        let config = Config { offsets, match_all: match_all as u32, _pad: 0 };
        let mut ebpf = loader
            .override_global("CRD_CONFIG", &config, true)
            // Statements below the userspace log level cost one compare in the kernel.
            .override_global("AYA_LOG_LEVEL", &(log::max_level() as u8), false)
            .map_max_entries("crd_events", ring_bytes)
            .load(BPF_OBJECT)
            .map_err(load_error)?;
        log::debug!("load: object loaded at {:?}", started.elapsed());
        for (name, iter_type) in [("crd_task", "task"), ("crd_task_file", "task_file")] {
            let program: &mut Iter = ebpf
                .program_mut(name)
                .ok_or_else(|| BpfError::Load(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(load_error)?;
            program.load(iter_type, &btf).map_err(load_error)?;
            // The verifier's effort: older kernels give up at 1M instructions.
            if let Some(n) = program.info().ok().and_then(|i| i.verified_instruction_count()) {
                log::debug!("{name}: the verifier processed {n} instructions");
            }
        }
        log::debug!("load: programs verified at {:?}", started.elapsed());
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let ring = RingBuf::try_from(
            ebpf.take_map("crd_events").ok_or(BpfError::Load("map crd_events missing".into()))?,
        )
        .map_err(load_error)?;
        Ok(Self { ebpf, logger, ring, file_ref_bias: offsets.file_ref_bias as i64 })
    }

    /// Runs both iterators over `scope` and decodes every record.
    pub fn harvest(
        &mut self,
        scope: Scope<'_>,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(Harvest, HarvestStats), BpfError> {
        #[cfg(feature = "testing")]
        if !crate::test_hooks::hold(HOLD_HARVEST_ENV, interrupted) {
            return Err(BpfError::Interrupted(crate::Interrupted));
        }
        if let Scope::Processes(tgids) = scope {
            let mut filter: HashMap<_, u32, u8> = HashMap::try_from(
                self.ebpf.map_mut("crd_tgids").ok_or(BpfError::Load("map crd_tgids missing".into()))?,
            )
            .map_err(load_error)?;
            let old: Vec<u32> = filter.keys().filter_map(Result::ok).collect();
            for key in old {
                let _ = filter.remove(&key);
            }
            for tgid in tgids {
                filter.insert(tgid.0, 0, 0).map_err(load_error)?;
            }
        }
        let mut stats = HarvestStats::default();
        let mut harvest = Harvest::default();
        let before = self.counters()?;
        for (name, iterator) in [("crd_task", "task"), ("crd_task_file", "task_file")] {
            self.run_iterator(name, iterator, &mut harvest, &mut stats, interrupted)?;
        }
        let after = self.counters()?;
        let submitted = after[STAT_SUBMITTED as usize] - before[STAT_SUBMITTED as usize];
        stats.ring_full = after[STAT_RING_FULL as usize] - before[STAT_RING_FULL as usize];
        let failed = after[STAT_READ_FAILED as usize] - before[STAT_READ_FAILED as usize];
        if submitted != stats.records {
            return Err(BpfError::Lost { submitted, received: stats.records });
        }
        if failed != 0 {
            return Err(BpfError::ReadFailed(failed));
        }
        Ok((harvest.drop_repeated_tables(), stats))
    }

    fn counters(&self) -> Result<[u64; 3], BpfError> {
        let stats: Array<_, u64> = Array::try_from(
            self.ebpf.map("crd_stats").ok_or(BpfError::Load("map crd_stats missing".into()))?,
        )
        .map_err(load_error)?;
        let mut out = [0; 3];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = stats.get(&(i as u32), 0).map_err(load_error)?;
        }
        Ok(out)
    }

    fn run_iterator(
        &mut self,
        name: &str,
        iterator: &'static str,
        harvest: &mut Harvest,
        stats: &mut HarvestStats,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(), BpfError> {
        let program: &mut Iter = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| BpfError::Load(format!("program {name} missing")))?
            .try_into()
            .map_err(load_error)?;
        let link_id = program.attach().map_err(load_error)?;
        let link = program.take_link(link_id).map_err(load_error)?;
        let mut file = link.into_file().map_err(load_error)?;
        // The programs write nothing to the seq_file: a read() runs the iteration until
        // it ends (0) or the ring fills (EAGAIN, or a short read), then we drain.
        let mut sink = [0u8; 64];
        loop {
            if interrupted() {
                return Err(BpfError::Interrupted(crate::Interrupted));
            }
            stats.reads += 1;
            let started = std::time::Instant::now();
            let read = file.read(&mut sink);
            stats.kernel_time += started.elapsed();
            let done = match read {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(source) => return Err(BpfError::Read { iterator, source }),
            };
            if let Some(logger) = self.logger.as_mut() {
                logger.flush();
            }
            while let Some(item) = self.ring.next() {
                stats.records += 1;
                decode(&item, self.file_ref_bias, harvest)?;
            }
            if done {
                return Ok(());
            }
            // The program paused the iteration: the ring was full (drained just now).
            log::debug!("{name}: ring buffer full after {} records; drained, resuming", stats.records);
        }
    }
}

/// Decodes one ring buffer record into the typed harvest.
pub fn decode(bytes: &[u8], file_ref_bias: i64, harvest: &mut Harvest) -> Result<(), BpfError> {
    let tag = bytes.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
    match tag {
        RECORD_TASK if bytes.len() >= size_of::<TaskRecord>() => {
            // SAFETY: the length was checked; TaskRecord is plain old data, valid for
            // any bytes, and read_unaligned needs no alignment.
            let r: TaskRecord = unsafe { bytes.as_ptr().cast::<TaskRecord>().read_unaligned() };
            harvest.tasks.push(task_info(&r));
        }
        RECORD_FD if bytes.len() >= size_of::<FdRecord>() => {
            // SAFETY: as above, for FdRecord.
            let r: FdRecord = unsafe { bytes.as_ptr().cast::<FdRecord>().read_unaligned() };
            harvest.fds.push(fd_info(&r, file_ref_bias));
        }
        _ => return Err(BpfError::BadRecord(tag, bytes.len())),
    }
    Ok(())
}

fn task_info(r: &TaskRecord) -> TaskInfo {
    let len = r.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    TaskInfo {
        pid: Pid(r.pid),
        tgid: Tgid(r.tgid),
        parent: Tgid(r.parent_tgid),
        comm: String::from_utf8_lossy(&r.comm[..len]).into_owned(),
        fd_table: KernelPtr(r.files),
    }
}

/// The kernel's page size: a pipe's capacity is counted in pages.
fn page_size() -> u32 {
    static PAGE_SIZE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u32
    })
}

/// The iterator holds one reference to the file while the program runs.
const ITERATOR_FILE_REFS: i64 = 1;

fn fd_info(r: &FdRecord, file_ref_bias: i64) -> FdInfo {
    let kind = InodeKind::classify(r.i_mode, r.sb_magic);
    let pipe = (r.flags & FD_HAS_PIPE != 0).then_some(PipeInfo {
        id: KernelPtr(r.pipe),
        readers: r.pipe_readers,
        writers: r.pipe_writers,
        queued: (r.flags & FD_PIPE_QUEUE_TRUNCATED == 0).then_some(r.pipe_queued),
        capacity: Some(r.pipe_max_usage.saturating_mul(page_size())),
    });
    FdInfo {
        tgid: Tgid(r.tgid),
        fd_table: KernelPtr(r.files),
        fd: Fd(r.fd),
        close_on_exec: r.flags & FD_CLOEXEC != 0,
        link: None,
        file: FileInfo {
            id: KernelPtr(r.file),
            flags: r.f_flags & !(libc::O_CLOEXEC as u32),
            access: Access::from_fmode(r.f_mode),
            pos: r.pos,
            // Saturating: a damaged record must not overflow (found by `cargo xtask fuzz`).
            refs: r.file_refs.saturating_add(file_ref_bias).saturating_sub(ITERATOR_FILE_REFS).max(0) as u64,
            inode: InodeInfo {
                id: KernelPtr(r.inode),
                kind,
                ino: r.ino,
                mode: r.i_mode,
                dev: DeviceId::from_kernel(r.s_dev),
                rdev: DeviceId::from_kernel(r.i_rdev),
                pipe,
            },
        },
    }
}
