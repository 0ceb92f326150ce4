//! The BPF harvester: load crd's iterator programs, run them over the asked-for tasks,
//! drain the ring buffer, decode the records.
//!
//! Records are never lost: the programs pause the iteration when the ring is full (see
//! `crd-ebpf`), this loop drains and resumes, and at the end the program's own count of
//! submitted records must equal the count received here, or the harvest is refused.
use std::{
    io::{self, Read},
    mem::size_of,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::Iter,
};
use crd_common::{
    COMM_LEN, EPOLL_MAX_ITEMS, EpollItemRecord, EpollTail, EventfdTail, FD_CLOEXEC, FdRecord, FdWith,
    KIND_BPF_LOOP, KIND_FD_WALK, KIND_ITER_TASK_FILTER, NamedTail, RECORD_EPOLL_ITEM, RECORD_FD, RECORD_TASK,
    STAT_READ_FAILED, STAT_RING_FULL, STAT_SUBMITTED, SignalfdTail, SocketTail, TAIL_EPOLL, TAIL_EVENTFD,
    TAIL_NAMED, TAIL_NONE, TAIL_PIPE, TAIL_SIGNALFD, TAIL_SOCKET, TAIL_TIMERFD, TaskRecord, TimerfdTail,
};

use super::{
    FdInfo, FileInfo, Harvest, HarvestError, HarvestStats, Harvester, LoadOptions, ObjectInfo, Scope, Source,
    TaskInfo,
    offsets::{BtfBytes, KernelBtf, OffsetsError, kernel_btf_path},
};
use crate::{
    kinds::{
        self, Identity, Kind, Live, Recognise,
        epoll::{EpollLive, WalkEnd, Walked},
    },
    privilege::{self, Cap},
    types::{Access, DeviceId, Fd, KernelPtr, Pid, Tgid},
};

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

/// Test hook (testing builds only): `CRD_TEST_CLEAR_KINDS=MASK` clears these `KIND_*`
/// bits of the configuration, as on a kernel whose BTF lacks those fields, so tests run
/// the degraded paths (opaque sockets; a unix peer found without `sk_ino`) here.
#[cfg(feature = "testing")]
pub const CLEAR_KINDS_ENV: &str = "CRD_TEST_CLEAR_KINDS";

/// Test hook (testing builds only): `CRD_TEST_FLOOR_PROGRAMS=1` also loads the floor
/// programs (crd-ebpf's `floor` module) for [`BpfHarvester::time_floor`].
#[cfg(feature = "testing")]
pub const FLOOR_PROGRAMS_ENV: &str = "CRD_TEST_FLOOR_PROGRAMS";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this crd was built without its BPF object: build it with `cargo xtask build` (or use --source procfs)"
    )]
    NoObject,
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    /// The kernel refused the load; `missing` names the capabilities crd lacks, when that
    /// is why (diagnosed here, where the refusal is seen, so no later layer loses it).
    #[error("{}", not_permitted(.detail, .missing.as_deref()))]
    NotPermitted { detail: String, missing: Option<String> },
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
    Interrupted(#[source] crate::interrupt::Interrupted),
}

impl BpfError {
    /// Whether the error says this kernel (or this build) cannot run the BPF harvester,
    /// as opposed to a missing privilege or a failed harvest.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, BpfError::NoObject | BpfError::Offsets(_) | BpfError::Load(_))
    }
}

fn not_permitted(detail: &str, missing: Option<&str>) -> String {
    match missing {
        Some(missing) => {
            format!(
                "cannot load crd's BPF programs: crd lacks {missing}; run it as root, or use --source procfs"
            )
        }
        None => format!(
            "cannot load crd's BPF programs ({detail}): run as root (CAP_BPF and CAP_PERFMON are needed), or use --source procfs"
        ),
    }
}

/// The iterator program `name` of the object.
fn iter_program<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut Iter, BpfError> {
    ebpf.program_mut(name)
        .ok_or_else(|| BpfError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(load_error)
}

fn load_error(e: impl std::error::Error) -> BpfError {
    // aya's messages leave the kernel's answer to the error's sources: say them all.
    let text = crate::error_text::one_line(&e);
    let lower = text.to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        let lacking = privilege::missing(&[Cap::Bpf, Cap::Perfmon]);
        BpfError::NotPermitted {
            detail: text,
            missing: (!lacking.is_empty()).then(|| privilege::list(&lacking)),
        }
    } else {
        BpfError::Load(text)
    }
}

/// The most items of one epoll a walk sends with a ring of `ring_bytes`: all of them, and
/// the epoll's own record, must fit in the ring at once (a walk interrupted by a full
/// ring starts over, on a drained ring).
pub fn epoll_max_items(ring_bytes: u32) -> u32 {
    // A ring record is an 8-byte header and the record, padded to 8 bytes.
    let slot = |bytes: usize| (8 + bytes.next_multiple_of(8)) as u32;
    let epoll_record = slot(size_of::<FdWith<EpollTail>>());
    (ring_bytes.saturating_sub(epoll_record) / slot(size_of::<EpollItemRecord>())).min(EPOLL_MAX_ITEMS)
}

/// Loaded programs; one load can serve several harvests.
pub struct BpfHarvester {
    ebpf: Ebpf,
    /// The programs' own diagnostics (aya-log), forwarded to the `log` crate after
    /// every read of an iterator.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ring: RingBuf<MapData>,
    /// See [`crd_common::Config::file_ref_bias`].
    file_ref_bias: i64,
    /// The fd program loaded and its iterator: the walk from the task iterator, or the
    /// task_file program with `bpf_loop` or without (see [`fd_program`]).
    fd_program: (&'static str, &'static str),
    /// The iterators can be run over one process at a time
    /// ([`crd_common::KIND_ITER_TASK_FILTER`]).
    task_filter: bool,
}

impl BpfHarvester {
    /// Loads the BPF object with this kernel's field offsets. `match_all` makes the
    /// programs ignore the tgid filter.
    pub fn load(match_all: bool, options: &LoadOptions) -> Result<Self, BpfError> {
        #[cfg(feature = "testing")]
        let ring_bytes =
            std::env::var(RING_BYTES_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_RING_BYTES);
        #[cfg(not(feature = "testing"))]
        let ring_bytes = DEFAULT_RING_BYTES;
        Self::load_with_ring(match_all, options, ring_bytes)
    }

    /// As [`load`](Self::load), with a ring buffer of `ring_bytes` (a power of two, at
    /// least a page).
    pub fn load_with_ring(match_all: bool, options: &LoadOptions, ring_bytes: u32) -> Result<Self, BpfError> {
        #[cfg(feature = "testing")]
        let clear = std::env::var(CLEAR_KINDS_ENV).ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        #[cfg(not(feature = "testing"))]
        let clear = 0;
        Self::load_inner(match_all, options, ring_bytes, clear)
    }

    /// As [`load_with_ring`](Self::load_with_ring), with the `KIND_*` bits `clear` cleared
    /// (for the tests: as [`CLEAR_KINDS_ENV`] does, within one process).
    #[cfg(feature = "testing")]
    pub fn load_clearing_kinds(
        match_all: bool,
        options: &LoadOptions,
        ring_bytes: u32,
        clear: u32,
    ) -> Result<Self, BpfError> {
        Self::load_inner(match_all, options, ring_bytes, clear)
    }

    fn load_inner(
        match_all: bool,
        options: &LoadOptions,
        ring_bytes: u32,
        clear: u32,
    ) -> Result<Self, BpfError> {
        if BPF_OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        let started = std::time::Instant::now();
        // aya's loader parses all of the kernel's BTF when created (aya 0.14 has no way
        // to hand it ours), while this thread looks up the few struct offsets and the
        // iterators' attach points with btf-rs, which decodes only the types asked for.
        let bytes = BtfBytes::of_kernel(options.btf.as_deref())?;
        let (loader, found) = std::thread::scope(|scope| {
            let loader = scope.spawn(EbpfLoader::new);
            let found = KernelBtf::from_bytes(&bytes)
                .map_err(|e| match e {
                    // The file read is named: it may be one given with --btf.
                    OffsetsError::Parse(why) => OffsetsError::Parse(format!(
                        "{}: {why}",
                        kernel_btf_path(options.btf.as_deref()).display()
                    )),
                    e => e,
                })
                .and_then(|btf| Ok((btf.config()?, AttachPoints::find(&btf, &["task", "task_file"])?)));
            (loader.join(), found)
        });
        let (mut config, attach) = found?;
        config.match_all = match_all as u32;
        config.epoll_max_items = epoll_max_items(ring_bytes);
        config.kinds &= !clear;
        let mut loader = loader.map_err(|_| BpfError::Load("aya's loader panicked".into()))?;
        log::debug!("load: kernel BTF parsed in {:?}", started.elapsed());
        let mut ebpf = loader
            .override_global("CRD_CONFIG", &config, true)
            // Statements below the userspace log level cost one compare in the kernel.
            .override_global("AYA_LOG_LEVEL", &(log::max_level() as u8), false)
            .map_max_entries("crd_events", ring_bytes)
            .load(BPF_OBJECT)
            .map_err(load_error)?;
        log::debug!("load: object loaded at {:?}", started.elapsed());
        let fd_program = fd_program(&config);
        // Said once per load: the VM matrix's table shows it (kernels before 5.16 report
        // no verifier counts to name it by).
        log::debug!("load: the fd program is {}", fd_program.0);
        for (name, iter_type) in [("crd_task", "task"), fd_program] {
            let program = iter_program(&mut ebpf, name)?;
            program.load(iter_type, &attach.btf).map_err(load_error)?;
            // The verifier's effort: older kernels give up at 1M instructions.
            if let Some(n) = program.info().ok().and_then(|i| i.verified_instruction_count()) {
                log::debug!("{name}: the verifier processed {n} instructions");
            }
        }
        #[cfg(feature = "testing")]
        if std::env::var_os(FLOOR_PROGRAMS_ENV).is_some() {
            for (name, iter_type) in
                [("crd_floor_null", "task_file"), ("crd_floor_emit", "task_file"), ("crd_floor_walk", "task")]
            {
                iter_program(&mut ebpf, name)?.load(iter_type, &attach.btf).map_err(load_error)?;
            }
        }
        log::debug!("load: programs verified at {:?}", started.elapsed());
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let ring = RingBuf::try_from(
            ebpf.take_map("crd_events").ok_or(BpfError::Load("map crd_events missing".into()))?,
        )
        .map_err(load_error)?;
        Ok(Self {
            ebpf,
            logger,
            ring,
            file_ref_bias: config.file_ref_bias as i64,
            fd_program,
            task_filter: config.kinds & KIND_ITER_TASK_FILTER != 0,
        })
    }

    /// The kernel's ids of the programs this harvester loaded (as `bpftool prog show`
    /// lists them).
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf.programs().filter_map(|(_, program)| program.info().ok()).map(|info| info.id()).collect()
    }

    /// Runs both iterators over `scope` and decodes every record.
    pub fn harvest_bpf(
        &mut self,
        scope: Scope<'_>,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(Harvest, HarvestStats), BpfError> {
        #[cfg(feature = "testing")]
        if !crate::test_hooks::hold(HOLD_HARVEST_ENV, interrupted) {
            return Err(BpfError::Interrupted(crate::interrupt::Interrupted));
        }
        if let Scope::Processes(tgids) = scope {
            self.set_filter(tgids)?;
        }
        let mut stats = HarvestStats::default();
        let mut harvest = Harvest::default();
        if let Scope::Processes(tgids) = scope {
            // Best effort: without the room, the records make their own.
            let _ = harvest.fds.try_reserve(open_fds(tgids));
        }
        let before = self.counters()?;
        let mut decoder = Decoder::new(self.file_ref_bias);
        self.clear_walk_resume()?;
        let programs = [("crd_task", "task"), self.fd_program];
        for run in self.runs(scope, &programs) {
            self.run_iterator(run, &mut decoder, &mut harvest, &mut stats, interrupted)?;
        }
        stats.epoll_walks = decoder.epoll_walks;
        stats.epoll_fallbacks = decoder.epoll_fallbacks;
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
        decoder.peers.resolve(&mut harvest);
        let mut harvest = harvest.drop_repeated_tables();
        if let Scope::All = scope {
            // The iterators see every task; list what /proc would (see all_processes).
            harvest.retain_processes(&super::all_processes().into_iter().collect());
        }
        // Sessions come from /proc/PID/stat, once per process (see `model::Session`).
        let mut sessions: std::collections::HashMap<Tgid, crate::model::Session> =
            std::collections::HashMap::new();
        for task in &mut harvest.tasks {
            task.session = *sessions.entry(task.tgid).or_insert_with(|| crate::model::Session::of(task.tgid));
        }
        Ok((harvest, stats))
    }

    /// The thread groups the programs report (`crd_tgids`).
    fn set_filter(&mut self, tgids: &[Tgid]) -> Result<(), BpfError> {
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
        Ok(())
    }

    /// The iterator runs a harvest of `scope` takes: a few processes are iterated each
    /// alone, not every task on the machine (whose fds the programs would skip one by
    /// one); otherwise one run over every task.
    fn runs(&self, scope: Scope<'_>, programs: &[(&'static str, &'static str)]) -> Vec<Run> {
        match scope {
            Scope::Processes(tgids) if self.task_filter && tgids.len() <= PER_PROCESS_ITERATION_MAX => tgids
                .iter()
                .flat_map(|tgid| {
                    programs.iter().map(|&(name, iterator)| Run { name, iterator, pid: Some(tgid.0) })
                })
                .collect(),
            _ => programs.iter().map(|&(name, iterator)| Run { name, iterator, pid: None }).collect(),
        }
    }

    /// The floor of a harvest of `scope`: the fd program run over the same fds as a
    /// harvest visits, with no process asked for, so that it returns at its first check
    /// (the kernel's walk of the fds, a program call and one map look-up each). For the
    /// bench: what a harvest costs per fd before it reads anything. With `crd_task_walk`
    /// (6.2+) the program returns before walking any fd: what is left is a program call
    /// per thread, next to nothing per fd (the walk's own floor, ~15 ns per fd, is
    /// measured with the floor programs, [`time_floor`](Self::time_floor)).
    #[cfg(feature = "testing")]
    pub fn time_visit_only(
        &mut self,
        scope: Scope<'_>,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<std::time::Duration, BpfError> {
        self.set_filter(&[])?;
        let mut stats = HarvestStats::default();
        let mut harvest = Harvest::default();
        let mut decoder = Decoder::new(self.file_ref_bias);
        let started = std::time::Instant::now();
        self.clear_walk_resume()?;
        for run in self.runs(scope, &[self.fd_program]) {
            self.run_iterator(run, &mut decoder, &mut harvest, &mut stats, interrupted)?;
        }
        let elapsed = started.elapsed();
        if !harvest.fds.is_empty() {
            return Err(BpfError::Load(format!(
                "{} fds reported with no process asked for",
                harvest.fds.len()
            )));
        }
        Ok(elapsed)
    }

    /// The time one of the floor programs (crd-ebpf's `floor` module, loaded when
    /// [`FLOOR_PROGRAMS_ENV`] is set) takes over `scope`, with the processes of `scope`
    /// asked for; `mode` is the walk's (see `crd_floor_mode`).
    #[cfg(feature = "testing")]
    pub fn time_floor(
        &mut self,
        program: &'static str,
        iterator: &'static str,
        mode: u32,
        scope: Scope<'_>,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<std::time::Duration, BpfError> {
        if let Scope::Processes(tgids) = scope {
            self.set_filter(tgids)?;
        }
        let mut modes: Array<_, u32> = Array::try_from(
            self.ebpf.map_mut("crd_floor_mode").ok_or(BpfError::Load("map crd_floor_mode missing".into()))?,
        )
        .map_err(load_error)?;
        modes.set(0, mode, 0).map_err(load_error)?;
        let started = std::time::Instant::now();
        for run in self.runs(scope, &[(program, iterator)]) {
            let Some(pid) = run.pid else {
                return Err(BpfError::Load("floors: one process at a time".into()));
            };
            let prog: &mut Iter = self
                .ebpf
                .program_mut(program)
                .ok_or(BpfError::Load("no program".into()))?
                .try_into()
                .map_err(load_error)?;
            let fd = prog.fd().map_err(load_error)?;
            let mut file = crate::sys::bpf_task_iterator(std::os::fd::AsFd::as_fd(fd), pid)
                .map_err(|e| BpfError::Load(e.to_string()))?;
            let mut sink = [0u8; 64];
            loop {
                if interrupted() {
                    return Err(BpfError::Interrupted(crate::interrupt::Interrupted));
                }
                let done = match file.read(&mut sink) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Err(source) => return Err(BpfError::Read { iterator, source }),
                };
                while let Some(item) = self.ring.next() {
                    std::hint::black_box(&*item);
                }
                if done {
                    break;
                }
            }
        }
        Ok(started.elapsed())
    }

    /// The name of the fd program loaded (`crd_task_walk`, `crd_task_file` or
    /// `crd_task_file_bounded`).
    pub fn fd_program_name(&self) -> &'static str {
        self.fd_program.0
    }

    /// Forgets any walk a full ring cut short (see crd-ebpf's `walk`): each harvest
    /// starts every table at its first fd.
    fn clear_walk_resume(&mut self) -> Result<(), BpfError> {
        if self.fd_program.0 != "crd_task_walk" {
            return Ok(());
        }
        let mut resume: Array<_, [u8; 16]> = Array::try_from(
            self.ebpf
                .map_mut("crd_walk_resume")
                .ok_or(BpfError::Load("map crd_walk_resume missing".into()))?,
        )
        .map_err(load_error)?;
        resume.set(0, [0u8; 16], 0).map_err(load_error)
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
        run: Run,
        decoder: &mut Decoder,
        harvest: &mut Harvest,
        stats: &mut HarvestStats,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(), BpfError> {
        let Run { name, iterator, pid } = run;
        let program = iter_program(&mut self.ebpf, name)?;
        let mut file = match pid {
            None => {
                let link_id = program.attach().map_err(load_error)?;
                let link = program.take_link(link_id).map_err(load_error)?;
                link.into_file().map_err(load_error)?
            }
            Some(pid) => {
                let fd = program.fd().map_err(load_error)?;
                match crate::sys::bpf_task_iterator(std::os::fd::AsFd::as_fd(fd), pid) {
                    Ok(file) => file,
                    // Gone since it was asked for: nothing of it to report, as the
                    // unfiltered iterators would not have met it.
                    Err(e) if e.errno() == Some(libc::ESRCH) || e.errno() == Some(libc::ENOENT) => {
                        return Ok(());
                    }
                    Err(e) => return Err(BpfError::Load(format!("{name} over PID {pid}: {e}"))),
                }
            }
        };
        // The programs write nothing to the seq_file: a read() runs the iteration until
        // it ends (0) or the ring fills (EAGAIN, or a short read), then we drain.
        let mut sink = [0u8; 64];
        loop {
            if interrupted() {
                return Err(BpfError::Interrupted(crate::interrupt::Interrupted));
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
                decoder.decode(&item, harvest)?;
            }
            if done {
                return Ok(());
            }
            // The program paused the iteration: the ring was full (drained just now).
            log::debug!("{name}: ring buffer full after {} records; drained, resuming", stats.records);
        }
    }
}

/// How many fds the processes `tgids` hold, as `stat(2)` of `/proc/PID/fd` counts them
/// (its size, since Linux 6.2; 0 before, and for a process gone), so that a harvest
/// makes room for its records once, before they come: growing by doubling copied all of
/// a large harvest's records at each step (in a process holding 18,000 unix sockets, a
/// sixth of their decoding). One `stat` per process; the kernel counts the bits of the
/// fd table's open bitmap.
fn open_fds(tgids: &[Tgid]) -> usize {
    tgids
        .iter()
        .filter_map(|tgid| std::fs::metadata(format!("/proc/{}/fd", tgid.0)).ok())
        .map(|fds| usize::try_from(fds.len()).unwrap_or(0))
        .fold(0, usize::saturating_add)
}

/// At most this many processes are harvested one iterator run each; more are harvested
/// in one run over every task. A run costs two syscalls and a link (tens of
/// microseconds); an unfiltered run costs a visit to each fd on the machine (~100 ns
/// each even when the program skips it).
const PER_PROCESS_ITERATION_MAX: usize = 64;

/// One iterator run: which program, over which process (None: every task).
#[derive(Clone, Copy)]
struct Run {
    name: &'static str,
    iterator: &'static str,
    pid: Option<u32>,
}

impl Harvester for BpfHarvester {
    fn source(&self) -> Source {
        Source::Bpf
    }

    fn harvest(
        &mut self,
        scope: Scope<'_>,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(Harvest, HarvestStats), HarvestError> {
        self.harvest_bpf(scope, interrupted).map_err(|e| match e {
            BpfError::Interrupted(i) => HarvestError::Interrupted(i),
            e => e.into(),
        })
    }
}

/// Decodes one ring buffer record into the typed harvest, on its own: an epoll item
/// record is kept for an fd record that never comes (see [`Decoder`]).
pub fn decode(bytes: &[u8], file_ref_bias: i64, harvest: &mut Harvest) -> Result<(), BpfError> {
    Decoder::new(file_ref_bias).decode(bytes, harvest)
}

/// unix sockets' peers as the BPF records name them, by the peer's `struct sock`
/// ([`SocketTail::peer`]), until the whole harvest is in and each can be mapped to the
/// peer's inode.
///
/// The sockets are only listed while records arrive: the map from `struct sock` to inode
/// is built once, in [`resolve`](Self::resolve), at the size the list says. Built as the
/// records came, it was rehashed at every doubling (the harvest's size is not known
/// before its last record), a sixth of a unix socket's decoding.
///
/// Two sockets that name each other in consecutive unix records (the two ends of a
/// `socketpair()`, whose fds are adjacent, held by one process) are paired as the
/// second arrives, while the first's facts are still in the cache: they never enter
/// [`wanted`](Self::wanted), and a harvest whose peers all came so builds no map.
#[derive(Debug, Default)]
pub struct UnixPeers {
    /// Every harvested unix socket: (its `struct sock`, its inode number).
    sockets: Vec<(u64, u64)>,
    /// (index in `Harvest::fds`, the peer's `struct sock`) of each unix socket with a
    /// peer not yet found.
    wanted: Vec<(usize, u64)>,
    /// The unix socket noted last.
    previous: Option<Noted>,
}

/// A unix socket as [`UnixPeers::note`] saw it.
#[derive(Clone, Copy, Debug)]
struct Noted {
    /// Its index in `Harvest::fds`.
    index: usize,
    /// Its `struct sock` and its peer's (0: none).
    sock: u64,
    peer: u64,
    ino: u64,
    /// Its peer is still wanted: its entry is the last of [`UnixPeers::wanted`].
    wanted: bool,
}

impl UnixPeers {
    /// Notes the unix socket `fds[index]`, as its record says; pairs it with the unix
    /// socket noted before it if they name each other. Only unix sockets: a unix socket's
    /// peer is always another.
    fn note(&mut self, fds: &mut [FdInfo], index: usize, record: &FdRecord, tail: &SocketTail) {
        if tail.family != crd_common::AF_UNIX {
            return;
        }
        let previous = self.previous.take();
        if let Some(p) = previous
            && p.wanted
            && tail.sock != 0
            && p.peer == tail.sock
        {
            // The previous socket's entry is the last (only this function pushes).
            self.wanted.pop();
            set_peer(fds, p.index, Some(record.ino));
        }
        if tail.sock != 0 {
            self.sockets.push((tail.sock, record.ino));
        }
        let mut wanted = false;
        if tail.peer != 0 {
            match previous {
                Some(p) if p.sock != 0 && p.sock == tail.peer => set_peer(fds, index, Some(p.ino)),
                _ => {
                    self.wanted.push((index, tail.peer));
                    wanted = true;
                }
            }
        }
        self.previous = Some(Noted { index, sock: tail.sock, peer: tail.peer, ino: record.ino, wanted });
    }

    /// Gives each unix socket its peer's inode: from the harvest when the peer is one of
    /// its sockets, else from sock_diag (a peer held outside the harvested processes, as
    /// the /proc harvester finds every peer). A peer neither knows (a connection not
    /// yet accepted has no inode) stays unknown.
    pub fn resolve(&self, harvest: &mut Harvest) {
        if self.wanted.is_empty() {
            return;
        }
        let mut inode_of: foldhash::HashMap<u64, u64> =
            foldhash::HashMap::with_capacity_and_hasher(self.sockets.len(), Default::default());
        inode_of.extend(self.sockets.iter().copied());
        let mut diag: Option<super::sockets::Sockets> = None;
        for &(index, peer) in &self.wanted {
            let Some(fd) = harvest.fds.get_mut(index) else { continue };
            let ino = match inode_of.get(&peer) {
                Some(&ino) => Some(ino),
                None => diag
                    .get_or_insert_with(super::sockets::Sockets::new)
                    .facts(Pid(fd.tgid.0), fd.file.object.ino)
                    .and_then(|facts| facts.peer),
            };
            if let Live::Unix(facts) = &mut fd.file.object.live {
                facts.peer = ino;
            }
        }
    }
}

/// Gives the unix socket `fds[index]` its peer's inode.
fn set_peer(fds: &mut [FdInfo], index: usize, ino: Option<u64>) {
    if let Some(FdInfo {
        file: FileInfo { object: ObjectInfo { live: Live::Unix(facts), .. }, .. }, ..
    }) = fds.get_mut(index)
    {
        facts.peer = ino;
    }
}

/// Decodes the records of one harvest, in order: an epoll's items come as records of
/// their own before the epoll's fd record, which says how many belong to it.
pub struct Decoder {
    file_ref_bias: i64,
    /// Item records by epoll (`struct eventpoll *`), by index; a walk restarted after a
    /// full ring overwrites its first attempt's.
    epoll_items: foldhash::HashMap<u64, Vec<Option<EpollItemRecord>>>,
    /// Epolls whose interest list came from BPF's walk.
    pub epoll_walks: u64,
    /// Epolls whose walk fell back to fdinfo.
    pub epoll_fallbacks: u64,
    /// unix sockets' peers, mapped to inodes once the harvest is in.
    pub peers: UnixPeers,
}

impl Decoder {
    pub fn new(file_ref_bias: i64) -> Self {
        Self {
            file_ref_bias,
            epoll_items: Default::default(),
            epoll_walks: 0,
            epoll_fallbacks: 0,
            peers: UnixPeers::default(),
        }
    }

    pub fn decode(&mut self, bytes: &[u8], harvest: &mut Harvest) -> Result<(), BpfError> {
        let tag = bytes.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
        let bad = || BpfError::BadRecord(tag, bytes.len());
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
                let tail = &bytes[size_of::<FdRecord>()..];
                let mut info = fd_info(&r, tail, self.file_ref_bias).ok_or_else(bad)?;
                if let Live::Epoll(live) = &mut info.file.object.live {
                    self.attach(live, &r, tail);
                }
                harvest.fds.push(info);
                if r.tail == TAIL_SOCKET
                    && let Some(socket) = kinds::tail::<SocketTail>(tail)
                {
                    let index = harvest.fds.len() - 1;
                    self.peers.note(&mut harvest.fds, index, &r, &socket);
                }
            }
            RECORD_EPOLL_ITEM => {
                let item: EpollItemRecord = kinds::tail(bytes).ok_or_else(bad)?;
                // The program sends at most EPOLL_MAX_ITEMS per walk: an index past it is
                // not one of its records.
                if item.index >= EPOLL_MAX_ITEMS {
                    return Err(bad());
                }
                let sent = self.epoll_items.entry(item.epoll).or_default();
                let index = item.index as usize;
                if sent.len() <= index {
                    sent.resize(index + 1, None);
                }
                sent[index] = Some(item);
            }
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// Gives an epoll's record the items its walk sent, or marks it for fdinfo.
    fn attach(&mut self, live: &mut EpollLive, r: &FdRecord, tail: &[u8]) {
        let walk: Option<EpollTail> = (r.tail == TAIL_EPOLL).then(|| kinds::tail(tail)).flatten();
        let sent = walk.and_then(|w| self.epoll_items.remove(&w.named.private_data)).unwrap_or_default();
        *live = EpollLive::from_walk(walk.as_ref(), sent, self.file_ref_bias);
        match live.walked {
            Walked::Bpf => self.epoll_walks += 1,
            Walked::FellBack(why) => {
                self.epoll_fallbacks += 1;
                // Expected without the kernel's fields, or on 5.10-5.16 for all but small
                // epolls; worth a word otherwise.
                let level = if matches!(why, WalkEnd::Torn | WalkEnd::Incomplete) {
                    log::Level::Info
                } else {
                    log::Level::Debug
                };
                log::log!(
                    level,
                    "PID {} fd {}: epoll not walked by BPF ({why:?}): reading its fdinfo",
                    r.tgid,
                    r.fd
                );
            }
            Walked::Fdinfo => {}
        }
    }
}

fn task_info(r: &TaskRecord) -> TaskInfo {
    let len = r.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    TaskInfo {
        pid: Pid(r.pid),
        tgid: Tgid(r.tgid),
        parent: Tgid(r.parent_tgid),
        comm: String::from_utf8_lossy(&r.comm[..len]).into_owned(),
        fd_table: KernelPtr(r.files),
        // Filled from /proc once the harvest is decoded (see `model::Session`).
        session: crate::model::Session::default(),
    }
}

/// The iterator holds one reference to the file while the program runs.
const ITERATOR_FILE_REFS: i64 = 1;

/// The common record and its tail, through the kind that recognises it. None: the tail
/// is shorter than its tag says.
fn fd_info(r: &FdRecord, tail: &[u8], file_ref_bias: i64) -> Option<FdInfo> {
    let named: Option<NamedTail> = match r.tail {
        TAIL_NAMED => Some(kinds::tail::<NamedTail>(tail)?),
        TAIL_EVENTFD => Some(kinds::tail::<EventfdTail>(tail)?.named),
        TAIL_EPOLL => Some(kinds::tail::<EpollTail>(tail)?.named),
        TAIL_TIMERFD => Some(kinds::tail::<TimerfdTail>(tail)?.named),
        TAIL_SIGNALFD => Some(kinds::tail::<SignalfdTail>(tail)?.named),
        TAIL_NONE | TAIL_PIPE | TAIL_SOCKET => None,
        _ => return None,
    };
    let name = named.map(|n| kinds::name_of(&n.name));
    let rdev = DeviceId::from_kernel(r.i_rdev);
    let family = match r.tail {
        TAIL_SOCKET => Some(kinds::tail::<SocketTail>(tail)?.family),
        _ => None,
    };
    let recognise = Recognise {
        mode: r.i_mode,
        fs_magic: Some(r.sb_magic),
        name: name.as_deref(),
        rdev,
        link: None,
        family,
    };
    let kind = Kind::recognise(&recognise);
    // A kind whose tail is missing (its fields are not in this kernel's BTF) is opaque;
    // a socket the unix or inet kind does not take (a raw or SCTP inet socket) is still
    // a socket, listed by family and type.
    let live = Live::from_bpf(kind, r, tail).or_else(|| {
        let fallback = if r.sb_magic == crd_common::ANON_INODE_FS_MAGIC {
            Kind::Anon
        } else if r.i_mode & libc::S_IFMT == libc::S_IFSOCK {
            Kind::Socket
        } else {
            Kind::Other
        };
        Live::from_bpf(fallback, r, tail)
    })?;
    let id = match live.identity() {
        Identity::Private => named.map(|n| n.private_data).filter(|&p| p != 0).unwrap_or(r.file),
        Identity::Inode => r.inode,
    };
    Some(FdInfo {
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
            object: ObjectInfo {
                id: KernelPtr(id),
                ino: r.ino,
                mode: r.i_mode,
                dev: DeviceId::from_kernel(r.s_dev),
                rdev,
                live,
            },
        },
    })
}

/// The fd program to load and its iterator: from 6.2 on ([`KIND_FD_WALK`]), the walk of
/// each fd table in one run of the task iterator's program, which spares the task_file
/// iterator's cost per fd; before, the task_file program. A kernel without bpf_loop
/// refuses a program that names a callback, even one it would never call, so the object
/// has a task_file program without it.
pub fn fd_program(config: &crd_common::Config) -> (&'static str, &'static str) {
    if config.kinds & KIND_FD_WALK != 0 && config.kinds & KIND_BPF_LOOP != 0 {
        ("crd_task_walk", "task")
    } else if config.kinds & KIND_BPF_LOOP != 0 {
        ("crd_task_file", "task_file")
    } else {
        ("crd_task_file_bounded", "task_file")
    }
}

/// The iterators' attach points, as a [`Btf`] for aya's [`Iter::load`], which looks each
/// up by name (`bpf_iter_<type>`) and loads the program against its id. Done by aya, that
/// would take the kernel's whole BTF parsed a second time (its loader parses one copy
/// and keeps it private): btf-rs finds the ids in the mapped BTF, and this `Btf` holds
/// just those functions, each at its kernel id. A BTF type id is the type's index, so
/// unnamed functions fill the ids before them.
struct AttachPoints {
    btf: Btf,
}

impl AttachPoints {
    fn find(kernel: &KernelBtf, iter_types: &[&str]) -> Result<Self, OffsetsError> {
        use aya_obj::btf::{BtfType, Func, FuncLinkage};
        let mut found: Vec<(u32, String)> = iter_types
            .iter()
            .map(|t| {
                let name = format!("bpf_iter_{t}");
                kernel.function_id(&name).map(|id| (id, name))
            })
            .collect::<Result<_, _>>()?;
        found.sort();
        found.dedup();
        let mut btf = Btf::new();
        // `Btf::new` holds type 0 (void).
        let mut next = 1;
        for (id, name) in found {
            while next < id {
                next = btf.add_type(BtfType::Func(Func::new(0, 0, FuncLinkage::Static))) + 1;
            }
            let name_offset = btf.add_string(&name);
            let added = btf.add_type(BtfType::Func(Func::new(name_offset, 0, FuncLinkage::Static)));
            if added != id {
                return Err(OffsetsError::Parse(format!("{name}: BTF id {id}, placed at {added}")));
            }
            next = added + 1;
        }
        Ok(Self { btf })
    }
}

#[cfg(test)]
mod tests {
    use crd_common::NAME_LEN;

    use super::*;
    use crate::{
        kinds::socket::UnixName,
        types::{DeviceId, KernelPtr},
    };

    fn bytes<T: Copy>(record: &T) -> Vec<u8> {
        // SAFETY: the records are plain old data; reading their bytes is always valid.
        unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn named(name: &str, private_data: u64) -> NamedTail {
        let mut tail = NamedTail { private_data, ..Default::default() };
        tail.name[..name.len().min(NAME_LEN)].copy_from_slice(name.as_bytes());
        tail
    }

    fn anon_record(tail: u32) -> FdRecord {
        FdRecord {
            kind: RECORD_FD,
            fd: 3,
            tgid: 10,
            file: 0xf00,
            inode: 0x1d0,
            i_mode: libc::S_IFREG | 0o600,
            sb_magic: crd_common::ANON_INODE_FS_MAGIC,
            tail,
            ..Default::default()
        }
    }

    fn decoded(record: &[u8]) -> Result<FdInfo, BpfError> {
        let mut harvest = Harvest::default();
        decode(record, 1, &mut harvest)?;
        Ok(harvest.fds.remove(0))
    }

    #[test]
    fn an_eventfd_tail_decodes_to_an_eventfd_keyed_by_its_context() {
        let tail = EventfdTail { named: named("[eventfd]", 0xc7c), count: 7, flags: 1, _pad: 0 };
        let f = decoded(&bytes(&FdWith { common: anon_record(TAIL_EVENTFD), tail })).unwrap();
        assert_eq!(f.file.object.kind(), Kind::Eventfd);
        assert_eq!(f.file.object.id, KernelPtr(0xc7c), "the eventfd_ctx, not the shared anon inode");
        let Live::Eventfd(live) = &f.file.object.live else { panic!() };
        assert_eq!((live.count, live.semaphore), (7, Some(true)));
    }

    #[test]
    fn an_eventfd_without_its_fields_is_an_opaque_anon_file() {
        // This kernel's BTF lacked eventfd_ctx: the program sent the name tail only.
        let f = decoded(&bytes(&FdWith { common: anon_record(TAIL_NAMED), tail: named("[eventfd]", 0xc7c) }))
            .unwrap();
        assert_eq!(f.file.object.kind(), Kind::Anon);
        assert_eq!(f.file.object.id, KernelPtr(0xc7c));
    }

    fn item(epoll: u64, index: u32, fd: u32) -> EpollItemRecord {
        EpollItemRecord {
            kind: RECORD_EPOLL_ITEM,
            index,
            epoll,
            file: 0xf11e_0000 + fd as u64,
            data: 0xdead_0000_0000_0000 | fd as u64,
            file_refs: 1,
            ino: 100 + fd as u64,
            fd,
            events: libc::EPOLLIN as u32,
            s_dev: 0xd,
            _pad: 0,
        }
    }

    fn epoll_record(items: u32, walk: u32) -> Vec<u8> {
        let mut common = anon_record(TAIL_EPOLL);
        common.fd = 7;
        bytes(&FdWith { common, tail: EpollTail { named: named("[eventpoll]", 0xe9), items, walk } })
    }

    fn epoll_live(harvest: &Harvest) -> EpollLive {
        match &harvest.fds.last().unwrap().file.object.live {
            Live::Epoll(live) => live.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_epolls_items_come_before_it_and_a_restarted_walk_supersedes_the_first() {
        let mut decoder = Decoder::new(1);
        let mut harvest = Harvest::default();
        // A first attempt cut short by a full ring (items 0 and 1 of what was then the
        // tree), then the whole walk again.
        for record in
            [item(0xe9, 0, 9), item(0xe9, 1, 9), item(0xe9, 0, 4), item(0xe9, 1, 5), item(0xe9, 2, 6)]
        {
            decoder.decode(&bytes(&record), &mut harvest).unwrap();
        }
        // Another epoll's item, not this one's.
        decoder.decode(&bytes(&item(0xe8, 0, 3)), &mut harvest).unwrap();
        decoder.decode(&epoll_record(3, crd_common::EPOLL_WALK_COMPLETE), &mut harvest).unwrap();
        let live = epoll_live(&harvest);
        assert_eq!(live.walked, Walked::Bpf);
        let items = live.items.unwrap();
        assert_eq!(items.iter().map(|i| i.watch.tfd).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(items[0].watch.data, 0xdead_0000_0000_0004);
        assert_eq!(items[0].file.unwrap().id, KernelPtr(0xf11e_0004));
        assert_eq!((items[0].ino, items[0].dev), (104, DeviceId::from_kernel(0xd)));
        assert_eq!(harvest.fds.last().unwrap().file.object.id, KernelPtr(0xe9), "the eventpoll");
        assert_eq!((decoder.epoll_walks, decoder.epoll_fallbacks), (1, 0));
        // A second fd of the same epoll: its items are sent again.
        decoder.decode(&epoll_record(3, crd_common::EPOLL_WALK_COMPLETE), &mut harvest).unwrap();
        assert_eq!(epoll_live(&harvest).walked, Walked::FellBack(WalkEnd::Incomplete), "none came again");
    }

    #[test]
    fn a_walk_that_did_not_finish_leaves_the_epoll_to_fdinfo() {
        for (walk, end) in [
            (crd_common::EPOLL_WALK_TRUNCATED, WalkEnd::Truncated),
            (crd_common::EPOLL_WALK_TORN, WalkEnd::Torn),
            (99, WalkEnd::Incomplete),
        ] {
            let mut decoder = Decoder::new(1);
            let mut harvest = Harvest::default();
            decoder.decode(&bytes(&item(0xe9, 0, 4)), &mut harvest).unwrap();
            decoder.decode(&epoll_record(1, walk), &mut harvest).unwrap();
            let live = epoll_live(&harvest);
            assert_eq!((live.walked, live.items), (Walked::FellBack(end), None));
            assert_eq!(decoder.epoll_fallbacks, 1);
        }
        // Fewer items than the record says.
        let mut harvest = Harvest::default();
        decode(&epoll_record(2, crd_common::EPOLL_WALK_COMPLETE), 1, &mut harvest).unwrap();
        assert_eq!(epoll_live(&harvest).walked, Walked::FellBack(WalkEnd::Incomplete));
        // No walk at all (the kernel's BTF lacks the fields): the name tail only.
        let mut harvest = Harvest::default();
        decode(
            &bytes(&FdWith { common: anon_record(TAIL_NAMED), tail: named("[eventpoll]", 0xe9) }),
            1,
            &mut harvest,
        )
        .unwrap();
        assert_eq!(epoll_live(&harvest).walked, Walked::FellBack(WalkEnd::NoFields));
        // An item index past what any walk sends is no record of crd's.
        let mut far = item(0xe9, EPOLL_MAX_ITEMS, 4);
        assert!(matches!(
            decode(&bytes(&far), 1, &mut harvest),
            Err(BpfError::BadRecord(RECORD_EPOLL_ITEM, _))
        ));
        far.index = 0;
        assert!(decode(&bytes(&far)[..20], 1, &mut harvest).is_err(), "cut short");
    }

    #[test]
    fn timerfd_and_signalfd_tails_decode_without_fdinfo() {
        // PID 10 fd 3 is not this process's: reading fdinfo would fail (opaque).
        let tail = TimerfdTail {
            named: named("[timerfd]", 0x71),
            ticks: 2,
            interval_ns: 50_000_000,
            remaining_ns: 20_000_000,
            clockid: libc::CLOCK_BOOTTIME,
            settime_flags: 1,
            expired: 0,
        };
        let f = decoded(&bytes(&FdWith { common: anon_record(TAIL_TIMERFD), tail })).unwrap();
        assert_eq!(f.file.object.id, KernelPtr(0x71));
        let Live::Timerfd(live) = &f.file.object.live else { panic!("{:?}", f.file.object.live) };
        assert_eq!(
            (live.clock, live.ticks, live.settime_flags, live.remaining_ns, live.interval_ns),
            (libc::CLOCK_BOOTTIME, 2, 1, 20_000_000, 50_000_000)
        );
        // The kernel stores the mask inverted (SIGKILL and SIGSTOP set).
        let wanted = 1u64 << (libc::SIGINT - 1);
        let stored = !wanted;
        let tail = SignalfdTail { named: named("[signalfd]", 0x51), sigmask_inverted: stored };
        let f = decoded(&bytes(&FdWith { common: anon_record(TAIL_SIGNALFD), tail })).unwrap();
        assert_eq!(
            f.file.object.live,
            Live::Signalfd(crate::kinds::signalfd::SignalfdState { mask: wanted })
        );
    }

    #[test]
    fn an_epoll_walk_fits_the_ring_it_is_sized_for() {
        assert_eq!(epoll_max_items(1 << 20), EPOLL_MAX_ITEMS);
        let small = epoll_max_items(4096);
        assert!((40..100).contains(&small), "{small}");
        let slot = |bytes: usize| 8 + bytes.next_multiple_of(8);
        let needed =
            small as usize * slot(size_of::<EpollItemRecord>()) + slot(size_of::<FdWith<EpollTail>>());
        assert!(needed <= 4096, "{needed}");
        assert_eq!(epoll_max_items(64), 0);
    }

    fn socket_record(tail: u32) -> FdRecord {
        FdRecord {
            kind: RECORD_FD,
            fd: 4,
            tgid: 10,
            file: 0xf00,
            inode: 0x50c,
            ino: 4242,
            i_mode: libc::S_IFSOCK | 0o777,
            sb_magic: crd_common::SOCKFS_MAGIC,
            tail,
            ..Default::default()
        }
    }

    fn socket_tail(family: i32, sock_type: i32, protocol: i32, state: u8) -> SocketTail {
        SocketTail {
            sock: 0x5000,
            family: family as u16,
            sock_type: sock_type as u16,
            protocol: protocol as u16,
            state,
            ..Default::default()
        }
    }

    /// The name and detail `ls` shows for a decoded fd.
    fn shown(f: &FdInfo) -> (Option<String>, Option<String>) {
        let saved = f.file.object.live.sketch();
        (saved.name(), saved.detail())
    }

    #[test]
    fn a_unix_socket_tail_decodes_to_a_unix_socket_with_its_peer_and_name() {
        let mut tail = socket_tail(libc::AF_UNIX, libc::SOCK_STREAM, 0, 1);
        tail.rqueue = 2;
        let path = b"/run/app.sock\0";
        tail.name[..path.len()].copy_from_slice(path);
        tail.name_len = (2 + path.len()) as u32;
        // Its peer, inode 4243, names this one by its `struct sock`, and this one the
        // peer by its: once both are in, each gets the other's inode.
        tail.peer = 0x6000;
        let peer_tail = SocketTail {
            sock: 0x6000,
            peer: tail.sock,
            ..socket_tail(libc::AF_UNIX, libc::SOCK_STREAM, 0, 1)
        };
        let peer_record = FdRecord { fd: 5, ino: 4243, inode: 0x60c, ..socket_record(TAIL_SOCKET) };
        let mut harvest = Harvest::default();
        let mut decoder = Decoder::new(1);
        decoder.decode(&bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail }), &mut harvest).unwrap();
        let Live::Unix(before) = &harvest.fds[0].file.object.live else { panic!() };
        assert_eq!(before.peer, None, "a record alone does not know its peer's inode");
        decoder.decode(&bytes(&FdWith { common: peer_record, tail: peer_tail }), &mut harvest).unwrap();
        decoder.peers.resolve(&mut harvest);
        let Live::Unix(other) = &harvest.fds[1].file.object.live else { panic!() };
        assert_eq!(other.peer, Some(4242));
        let f = harvest.fds.remove(0);
        assert_eq!(f.file.object.kind(), Kind::Unix);
        assert_eq!(f.file.object.id, KernelPtr(0x50c), "a socket is its inode");
        let Live::Unix(facts) = &f.file.object.live else { panic!() };
        assert_eq!(facts.peer, Some(4243));
        assert_eq!(facts.name, UnixName::Path(b"/run/app.sock".to_vec()));
        assert_eq!(
            shown(&f),
            (Some("/run/app.sock".into()), Some("type=STREAM (CONNECTED) ->INO=4243".into()))
        );

        // An abstract name: a leading NUL, exactly `name_len - 2` bytes, NULs included.
        let mut tail = socket_tail(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, 10);
        tail.name[..5].copy_from_slice(b"\0ab\0c");
        tail.name_len = 2 + 5;
        tail.backlog = 16;
        let f = decoded(&bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail })).unwrap();
        assert_eq!(shown(&f), (Some("@ab@c".into()), Some("type=SEQPACKET (LISTEN) backlog 16".into())));
    }

    /// A unix socket record: fd, inode number, its `struct sock` and its peer's.
    fn unix_socket(fd: u32, ino: u64, sock: u64, peer: u64) -> Vec<u8> {
        let common = FdRecord { fd, ino, inode: 0x1000 + ino, ..socket_record(TAIL_SOCKET) };
        let tail = SocketTail { sock, peer, ..socket_tail(libc::AF_UNIX, libc::SOCK_STREAM, 0, 1) };
        bytes(&FdWith { common, tail })
    }

    fn peers_of(harvest: &Harvest) -> Vec<(u32, Option<u64>)> {
        harvest
            .fds
            .iter()
            .map(|f| match &f.file.object.live {
                Live::Unix(facts) => (f.fd.0, facts.peer),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn unix_peers_in_consecutive_records_pair_at_once_and_the_others_when_the_harvest_is_in() {
        let mut harvest = Harvest::default();
        let mut decoder = Decoder::new(1);
        for record in [
            // A socketpair's ends, one after the other: paired as the second arrives.
            unix_socket(3, 103, 0xa3, 0xa4),
            unix_socket(4, 104, 0xa4, 0xa3),
            // A pair with an unconnected socket between its ends.
            unix_socket(5, 105, 0xa5, 0xa7),
            unix_socket(6, 106, 0xa6, 0),
            unix_socket(7, 107, 0xa7, 0xa5),
            // Consecutive, but only the first names the second: a datagram socket
            // connected to one that names another (fd 3, paired above).
            unix_socket(8, 108, 0xa8, 0xa9),
            unix_socket(9, 109, 0xa9, 0xa3),
            // A peer that is no harvested socket (nor, here, any sock_diag knows).
            unix_socket(10, 110, 0xaa, 0xdead),
        ] {
            decoder.decode(&record, &mut harvest).unwrap();
        }
        assert_eq!(
            peers_of(&harvest),
            vec![
                (3, Some(104)),
                (4, Some(103)),
                (5, None),
                (6, None),
                (7, None),
                (8, Some(109)),
                (9, None),
                (10, None)
            ],
            "only consecutive records are paired as they come"
        );
        assert_eq!(
            decoder.peers.wanted.iter().map(|&(i, _)| harvest.fds[i].fd.0).collect::<Vec<_>>(),
            [5, 7, 9, 10]
        );
        decoder.peers.resolve(&mut harvest);
        assert_eq!(
            peers_of(&harvest),
            vec![
                (3, Some(104)),
                (4, Some(103)),
                (5, Some(107)),
                (6, None),
                (7, Some(105)),
                (8, Some(109)),
                (9, Some(103)),
                (10, None)
            ]
        );
    }

    #[test]
    fn a_tcp_socket_tail_decodes_to_an_inet_socket_named_as_lsof_names_it() {
        let mut tail = socket_tail(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP, 1);
        tail.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        tail.remote_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        (tail.local_port, tail.remote_port) = (8080, 51234);
        let f = decoded(&bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail })).unwrap();
        assert_eq!(f.file.object.kind(), Kind::Inet);
        assert_eq!(shown(&f).0.as_deref(), Some("TCP 127.0.0.1:8080->10.0.0.2:51234 (ESTABLISHED)"));

        let mut tail = socket_tail(libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP, 10);
        tail.local_port = 443;
        (tail.backlog, tail.pending) = (128, 3);
        let f = decoded(&bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail })).unwrap();
        assert_eq!(shown(&f), (Some("TCP *:443 (LISTEN)".into()), Some("IPv6 backlog 128 pending 3".into())));
    }

    #[test]
    fn sockets_of_other_families_or_without_a_tail_stay_sockets() {
        let netlink = socket_tail(libc::AF_NETLINK, libc::SOCK_RAW, 0, 7);
        let f = decoded(&bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail: netlink })).unwrap();
        assert_eq!(
            (f.file.object.kind(), shown(&f).1.as_deref()),
            (Kind::Socket, Some("netlink raw protocol 0"))
        );
        // An inet socket neither TCP nor UDP (ping, raw, SCTP) is listed by family.
        let ping = socket_tail(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP, 7);
        let f = decoded(&bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail: ping })).unwrap();
        assert_eq!(
            (f.file.object.kind(), shown(&f).1.as_deref()),
            (Kind::Socket, Some("IPv4 dgram protocol 1"))
        );
        // This kernel's BTF lacked a socket field: the program sent no tail.
        let f = decoded(&bytes(&socket_record(TAIL_NONE))).unwrap();
        assert_eq!((f.file.object.kind(), shown(&f).1), (Kind::Socket, None));
        // A socket tail cut short is a bad record, not a guess.
        let mut short = bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail: netlink });
        short.truncate(size_of::<FdRecord>() + 16);
        assert!(matches!(decoded(&short), Err(BpfError::BadRecord(RECORD_FD, _))));
    }

    #[test]
    fn a_tail_shorter_than_its_tag_is_a_bad_record() {
        let mut record = bytes(&FdWith { common: anon_record(TAIL_EVENTFD), tail: named("[eventfd]", 1) });
        record.truncate(size_of::<FdRecord>() + 8);
        assert!(matches!(decoded(&record), Err(BpfError::BadRecord(RECORD_FD, _))));
        let unknown_tail = bytes(&anon_record(99));
        assert!(matches!(decoded(&unknown_tail), Err(BpfError::BadRecord(..))));
    }

    /// The socket records of the `record_decode` fuzz target's seed corpus: every family
    /// and state the decoder tells apart, a name as long as the tail holds, and a
    /// `name_len` far past it. `CRD_WRITE_FUZZ_SEEDS=1` (re)writes them.
    fn socket_seeds() -> Vec<(&'static str, Vec<u8>, Kind)> {
        let record = |tail: SocketTail| bytes(&FdWith { common: socket_record(TAIL_SOCKET), tail });
        let mut pair = socket_tail(libc::AF_UNIX, libc::SOCK_STREAM, 0, 1);
        (pair.peer, pair.rqueue) = (4243, 3);
        let mut listener = socket_tail(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, 10);
        listener.name = [b'x'; crd_common::UNIX_PATH_LEN];
        listener.name[0] = 0;
        listener.name_len = 2 + crd_common::UNIX_PATH_LEN as u32;
        (listener.backlog, listener.rqueue) = (16, 2);
        let mut overlong = socket_tail(libc::AF_UNIX, libc::SOCK_DGRAM, 0, 7);
        overlong.name_len = u32::MAX;
        let mut tcp = socket_tail(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP, 1);
        tcp.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        tcp.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        (tcp.local_port, tcp.remote_port) = (8080, 51234);
        let mut tcp6 = socket_tail(libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP, 10);
        (tcp6.local_port, tcp6.backlog, tcp6.pending) = (443, 128, 3);
        let mut udp = socket_tail(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP, 7);
        (udp.local_port, udp.rqueue) = (53, 1);
        vec![
            ("socket_unix_pair", record(pair), Kind::Unix),
            ("socket_unix_listener", record(listener), Kind::Unix),
            ("socket_unix_overlong_name", record(overlong), Kind::Unix),
            ("socket_tcp", record(tcp), Kind::Inet),
            ("socket_tcp6_listener", record(tcp6), Kind::Inet),
            ("socket_udp", record(udp), Kind::Inet),
            ("socket_netlink", record(socket_tail(libc::AF_NETLINK, libc::SOCK_RAW, 0, 7)), Kind::Socket),
            ("socket_without_tail", bytes(&socket_record(TAIL_NONE)), Kind::Socket),
        ]
    }

    /// Each seed decodes to its kind, and is the file committed under its name in the
    /// fuzz corpus (`CRD_WRITE_FUZZ_SEEDS=1` writes them).
    fn assert_seeds_decode_and_are_committed(seeds: Vec<(&str, Vec<u8>, Kind)>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/record_decode");
        let write = std::env::var_os("CRD_WRITE_FUZZ_SEEDS").is_some();
        // The VM matrix's guests see the test binaries, not the source tree: there the
        // seeds are only decoded.
        let have_corpus = dir.is_dir();
        for (name, record, kind) in seeds {
            assert_eq!(decoded(&record).unwrap().file.object.kind(), kind, "{name}");
            if !have_corpus {
                continue;
            }
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &record).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == record,
                "{} is not the record this test builds: rerun it with CRD_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
    }

    #[test]
    fn the_socket_fuzz_seeds_are_committed_and_decode_to_their_kinds() {
        assert_seeds_decode_and_are_committed(socket_seeds());
    }

    /// The records of the other kinds for the `record_decode` seed corpus: an eventfd, a
    /// memfd with seals, and the anon files whose state comes from fdinfo (epoll,
    /// inotify, pidfd; timerfd and signalfd, of a process that does not exist, so they
    /// decode as opaque anon files wherever the test runs). `CRD_WRITE_FUZZ_SEEDS=1`
    /// (re)writes them.
    fn kind_seeds() -> Vec<(&'static str, Vec<u8>, Kind)> {
        let named_record = |name: &str, private: u64| {
            bytes(&FdWith { common: anon_record(TAIL_NAMED), tail: named(name, private) })
        };
        let eventfd = EventfdTail { named: named("[eventfd]", 0xe7), count: u64::MAX - 1, flags: 1, _pad: 0 };
        let mut memfd = named("memfd:seed", 0x3e3);
        memfd.seals = (libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL) as u32;
        let mut memfd_record = anon_record(TAIL_NAMED);
        (memfd_record.sb_magic, memfd_record.size) = (crd_common::TMPFS_MAGIC, 4096);
        let mut gone = anon_record(TAIL_NAMED);
        gone.tgid = u32::MAX;
        let gone_record = |name: &str| bytes(&FdWith { common: gone, tail: named(name, 0x71) });
        vec![
            (
                "anon_eventfd",
                bytes(&FdWith { common: anon_record(TAIL_EVENTFD), tail: eventfd }),
                Kind::Eventfd,
            ),
            ("anon_memfd", bytes(&FdWith { common: memfd_record, tail: memfd }), Kind::Memfd),
            ("anon_epoll", named_record("[eventpoll]", 0xe9), Kind::Epoll),
            ("anon_inotify", named_record("inotify", 0x1f), Kind::Inotify),
            ("anon_pidfd", named_record("[pidfd]", 0x9d), Kind::Pidfd),
            ("anon_timerfd_gone", gone_record("[timerfd]"), Kind::Anon),
            ("anon_signalfd_gone", gone_record("[signalfd]"), Kind::Anon),
        ]
    }

    #[test]
    fn the_kind_fuzz_seeds_are_committed_and_decode_to_their_kinds() {
        assert_seeds_decode_and_are_committed(kind_seeds());
    }
}
