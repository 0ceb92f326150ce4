//! Helpers for crd's integration tests: spawn real process trees, checkpoint them, and
//! look objects up in the resulting graph.
//!
//! These tests need root (ptrace, BPF) and a kernel with BPF iterators; `cargo xtask
//! test` builds the BPF object and the `crd` binary they use first.
use std::{
    fs,
    path::PathBuf,
    process::{Command, Output},
};

use crd::{
    Options, Source,
    fixture::{self, Spawned},
    graph::{FdSlot, FdTable, FileDesc, Graph, GraphIndex, Object},
    image::ImageBody,
    kinds::{Saved, pipe::PipeState},
    types::{Fd, ObjRef, Tgid},
};

/// The `crd` binary under test, a testing build (crd-user's `testing` feature: the
/// fixture, the test hooks): `$CRD_BIN` (set by `cargo xtask test`), else the debug
/// testing build next to this workspace.
pub fn crd_bin() -> PathBuf {
    std::env::var_os("CRD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/testing/debug/crd"))
}

/// The product `crd`, built without the `testing` feature: `$CRD_PRODUCT_BIN` (set by
/// `cargo xtask test`), else the debug build next to this workspace.
pub fn product_bin() -> PathBuf {
    let bin = std::env::var_os("CRD_PRODUCT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/crd"));
    assert!(bin.exists(), "{} missing: run the tests with `cargo xtask test`", bin.display());
    bin
}

/// Starts a fixture tree (see `crd::fixture`) of `processes` processes.
pub fn spawn(steps: &[&str], processes: usize) -> Spawned {
    let bin = crd_bin();
    assert!(bin.exists(), "{} missing: run the tests with `cargo xtask test`", bin.display());
    fixture::spawn(&bin, steps, processes).expect("fixture starts")
}

/// Checkpoints through the library, as `crd checkpoint` does.
pub fn checkpoint(root: u32, tree: bool, source: Source) -> ImageBody {
    crd::checkpoint(Options::new(Tgid(root), tree, source), &|| false)
        .unwrap_or_else(|e| panic!("checkpoint of {root} ({source}): {e}"))
        .body
}

/// Runs the crd binary.
pub fn crd(args: &[&str]) -> Output {
    Command::new(crd_bin()).args(args).output().expect("crd runs")
}

/// Checks what `crd demo` printed: its tree in the image, and the final comparison.
pub fn assert_demo_output(out: &Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "with descendants, 2 tasks",
        "shared objects:",
        "fifo",
        "queued 23",
        "pipe",
        "a checkpoint of the stubs gives the same graph",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// Objects of a graph by objref, and fd tables by process.
pub struct Index<'g> {
    pub graph: &'g Graph,
    pub index: GraphIndex<'g>,
}

impl<'g> Index<'g> {
    pub fn new(graph: &'g Graph) -> Self {
        Self { graph, index: graph.index() }
    }

    /// The fd table of process `pid`.
    pub fn table(&self, pid: u32) -> &'g FdTable {
        let task = self
            .graph
            .tasks
            .iter()
            .find(|t| t.tgid.0 == pid)
            .unwrap_or_else(|| panic!("no task {pid} in the graph"));
        self.index.tables.get(&task.fd_table.objref()).expect("the task's fd table is in the graph")
    }

    pub fn slot(&self, pid: u32, fd: u32) -> &'g FdSlot {
        self.table(pid).fds.iter().find(|s| s.fd == Fd(fd)).unwrap_or_else(|| panic!("no fd {fd} in {pid}"))
    }

    pub fn file(&self, pid: u32, fd: u32) -> &'g FileDesc {
        self.index
            .files
            .get(&self.slot(pid, fd).file.objref())
            .unwrap_or_else(|| panic!("no description for {pid}:{fd}"))
    }

    pub fn file_ref(&self, pid: u32, fd: u32) -> ObjRef {
        self.slot(pid, fd).file.objref()
    }

    /// The objref of the object (inode, or anon file's private object) behind an fd.
    pub fn inode_ref(&self, pid: u32, fd: u32) -> ObjRef {
        self.file(pid, fd).object.objref()
    }

    /// The object behind an fd.
    pub fn inode(&self, pid: u32, fd: u32) -> &'g Object {
        self.index.objects.get(&self.inode_ref(pid, fd)).unwrap_or_else(|| panic!("no object for {pid}:{fd}"))
    }

    /// The pipe (or FIFO) state behind an fd.
    pub fn pipe(&self, pid: u32, fd: u32) -> &'g PipeState {
        match &self.inode(pid, fd).state {
            Saved::Pipe(p) | Saved::Fifo(p) => p,
            other => panic!("PID {pid} fd {fd} is not a pipe: {other:?}"),
        }
    }

    /// The fd numbers of process `pid`.
    pub fn fds(&self, pid: u32) -> Vec<u32> {
        self.table(pid).fds.iter().map(|s| s.fd.0).collect()
    }
}

/// The fd numbers /proc shows for a process.
pub fn proc_fds(pid: u32) -> Vec<u32> {
    let mut fds: Vec<u32> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("readable /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// A field of /proc/PID/status.
pub fn status_field(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// Asserts a process is running free: not stopped, not traced.
pub fn assert_running_untraced(pid: u32) {
    assert_eq!(status_field(pid, "TracerPid:"), "0", "PID {pid} is still traced");
    let state = status_field(pid, "State:");
    assert!(state.starts_with('S') || state.starts_with('R'), "PID {pid} is in state {state}");
}

/// Returns early (skipping the test, with a message) when `tool` is missing inside a
/// test VM; see [`missing_in_vm`].
#[macro_export]
macro_rules! require_tool {
    ($tool:literal) => {
        if $crate::missing_in_vm($tool) {
            eprintln!(concat!("skipped: no ", $tool, " in this VM"));
            return;
        }
    };
}

/// Whether a host tool a test needs is missing inside a test VM (`cargo xtask vm-test`
/// sets `CRD_IN_VM`; its guests have busybox only). Outside a VM a missing tool is a
/// failure, not a skip: `cargo xtask test` installs them.
pub fn missing_in_vm(tool: &str) -> bool {
    std::env::var_os("CRD_IN_VM").is_some()
        && !std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success() || !o.stdout.is_empty())
}

/// Whether the running kernel is at least `major.minor` (`/proc/sys/kernel/osrelease`).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Whether the BPF and /proc harvests are expected to give equal graphs of any tree of
/// every kind here: from 6.5 on, where /proc shows an eventfd's EFD_SEMAPHORE. (They
/// also need sock_diag's modules for sockets: a VM guest of the matrix loads them.)
pub fn harvests_agree_on_every_kind() -> bool {
    kernel_at_least(6, 5)
}

/// Returns early (skipping the test, with a message) unless the test runs as root:
/// ptrace and BPF need it. CI runs as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// Whether this test process may use ptrace and BPF.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tree `crd restore` made, killed (every stub) when dropped.
pub struct RestoredTree {
    pub root: u32,
    /// Old TID → new TID, as `crd restore` printed them.
    pub tasks: Vec<(u32, u32)>,
}

impl Drop for RestoredTree {
    fn drop(&mut self) {
        for (_, new) in &self.tasks {
            // SAFETY: plain kill(2); a stub that is already gone only gives ESRCH.
            unsafe { libc::kill(*new as i32, libc::SIGKILL) };
        }
    }
}

/// Runs `crd ARGS` and parses the `old -> new` lines of a restore or graft.
pub fn restore_with(args: &[&str]) -> Result<RestoredTree, String> {
    let out = crd(args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let tasks: Vec<(u32, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (old, new) = l.split_once(" -> ")?;
            Some((old.trim().parse().ok()?, new.trim().parse().ok()?))
        })
        .collect();
    let root = tasks.first().map(|t| t.1).ok_or("crd printed no task")?;
    Ok(RestoredTree { root, tasks })
}

/// Checkpoints a fixture tree into an image file, then stops the fixture (an image is
/// restored after its original is gone). Returns the image and what must outlive it.
pub fn image_of_stopped(
    fixture: Spawned,
    dir: &std::path::Path,
) -> (ImageBody, PathBuf, tempfile::NamedTempFile) {
    let body = checkpoint(fixture.root(), true, Source::Bpf);
    let path = dir.join("image.crd");
    crd::image::write(&path, &body).expect("image written");
    let log = fixture.stop();
    (body, path, log)
}

/// Restores `image` and checks that a checkpoint of the stubs is the same graph.
pub fn assert_round_trip(original: &ImageBody, image: &std::path::Path) -> RestoredTree {
    let restored =
        restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("restore: {e}"));
    let again = checkpoint(restored.root, true, Source::Bpf);
    if let Err(difference) = original.graph.same_shape(&again.graph) {
        panic!("the restored tree differs: {difference}");
    }
    restored
}

/// Whether a process with this comm exists anywhere.
pub fn comm_exists(comm: &str) -> bool {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .any(|e| !fs::read_to_string(e.path().join("stat")).is_ok_and(|s| s.contains(") Z ")))
}

/// A tmpfs of `size` mounted on a fresh directory (field 0), unmounted when dropped: a
/// disk that fills up.
pub struct SmallDisk(pub tempfile::TempDir);

impl SmallDisk {
    pub fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "crd-full"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Real programs in tests (Python servers, socket holders) and what the tests read of
/// their sockets through the kernel.
pub mod programs {
    use std::{
        os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        process::{Child, Command, Output},
    };

    /// A program started in a process group of its own; the group (the program and all
    /// it forked) is killed when dropped.
    pub struct Program(pub Child);

    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: plain kill(2) of the process group the test made for the program.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }

    /// Starts `python3 -c SCRIPT ARGS` (see [`start`]) and returns it with the first
    /// line it prints.
    pub fn python(script: &str, args: &[&str]) -> (Program, String) {
        let mut command = Command::new("python3");
        command.arg("-c").arg(script).args(args);
        start(command)
    }

    /// Starts `command` in a process group of its own, with no stdin and no stderr
    /// (whatever the test runner's stderr is — a pipe to a terminal multiplexer... — is
    /// not the program's: a restore would refuse it as external), and returns it with the
    /// first line it prints.
    pub fn start(mut command: Command) -> (Program, String) {
        use std::{
            io::{BufRead, BufReader},
            os::unix::process::CommandExt,
            process::Stdio,
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?} runs: {e}"));
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        BufReader::new(stdout).read_line(&mut line).expect("the program prints a line");
        (Program(child), line)
    }

    /// [`start`], with the first line parsed as JSON.
    pub fn start_json(command: Command) -> (Program, serde_json::Value) {
        let (program, line) = start(command);
        let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        (program, value)
    }

    /// [`python`], with the first line parsed as JSON.
    pub fn python_json(script: &str, args: &[&str]) -> (Program, serde_json::Value) {
        let (program, line) = python(script, args);
        let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        (program, value)
    }

    pub fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A copy of `fd` of process `pid` (the very same open file description).
    pub fn grab(pid: u32, fd: u32) -> OwnedFd {
        try_grab(pid, fd).unwrap_or_else(|e| panic!("pidfd_getfd {pid} {fd}: {e}"))
    }

    /// [`grab`], or why not (the process or the fd is gone).
    pub fn try_grab(pid: u32, fd: u32) -> std::io::Result<OwnedFd> {
        // SAFETY: plain syscalls with integer arguments; the results are checked.
        unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
            if pidfd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
            let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd as i32, 0);
            if copy < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(OwnedFd::from_raw_fd(copy as RawFd))
        }
    }

    /// An integer socket option.
    pub fn int_opt(fd: BorrowedFd<'_>, level: i32, name: i32) -> i32 {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into our local.
        let ret = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast(), &mut len) };
        assert_eq!(ret, 0, "getsockopt {level}/{name}: {}", std::io::Error::last_os_error());
        value
    }

    pub fn set_int_opt(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) {
        // SAFETY: setsockopt reads one int from our local.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(ret, 0, "setsockopt {level}/{name}: {}", std::io::Error::last_os_error());
    }

    /// Moves the calling test's thread into a network namespace of its own with loopback
    /// up: a network namespace is per thread, and every process the thread spawns
    /// afterwards (programs, crd, crd's stubs) lives in it.
    pub fn own_network_namespace() {
        // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        let up = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip runs");
        assert!(up.success(), "ip link set lo up");
    }
}

/// An fd table as the kernel shows it, to compare a restored process with its original
/// without going through crd: `/proc/PID/fd` links, fdinfo, kcmp, and what a
/// `pidfd_getfd` copy of each socket says of itself.
pub mod kernel {
    use std::{
        collections::{BTreeMap, HashMap},
        os::fd::{AsFd, AsRawFd, BorrowedFd},
    };

    use crate::{proc_fds, programs::try_grab};

    /// What `/proc/PID/fd/N` says the file is: `pipe`, `socket`, `anon_inode:[eventfd]`,
    /// a path...
    pub fn link_kind(pid: u32, fd: u32) -> String {
        try_link_kind(pid, fd).unwrap_or_else(|| panic!("no fd {fd} in {pid}"))
    }

    /// [`link_kind`]; None: the fd is gone.
    fn try_link_kind(pid: u32, fd: u32) -> Option<String> {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?.to_string_lossy().into_owned();
        Some(if link.starts_with("anon_inode:") || link.starts_with('/') {
            link
        } else {
            link.split(':').next().unwrap_or("").to_string()
        })
    }

    /// Whether `fd` of `pid` is the file epoll `epfd` of `pid` watches as its `toff`-th
    /// item registered under `tfd` (kcmp KCMP_EPOLL_TFD).
    pub fn watches(pid: u32, fd: u32, epfd: u32, tfd: u32, toff: u32) -> bool {
        #[repr(C)]
        struct Slot {
            efd: u32,
            tfd: u32,
            toff: u32,
        }
        let slot = Slot { efd: epfd, tfd, toff };
        // SAFETY: the kernel reads one slot through the pointer, valid for the call.
        let ret = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, 7, fd as libc::c_long, &raw const slot) };
        ret == 0
    }

    /// One item of an interest list as the kernel shows it: (tfd, events, data, the fd
    /// of the process holding the very file it watches, what that fd is).
    pub type Item = (u32, u32, u64, Option<u32>, String);

    /// The interest list of `epfd` of `pid` from its fdinfo, each item with the fd
    /// holding its file (kcmp), sorted.
    pub fn interest(pid: u32, epfd: u32) -> Vec<Item> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{epfd}")).unwrap();
        let mut seen: HashMap<u32, u32> = HashMap::new();
        let mut items = Vec::new();
        for line in text.lines().filter(|l| l.starts_with("tfd:")) {
            // tfd: N events: X data: Y pos:P ino:I sdev:D
            let w: Vec<&str> = line.split_whitespace().collect();
            let tfd: u32 = w[1].parse().unwrap();
            let events = u32::from_str_radix(w[3], 16).unwrap();
            let data = u64::from_str_radix(w[5], 16).unwrap();
            let toff = seen.entry(tfd).or_default();
            let holder = proc_fds(pid).into_iter().find(|&fd| watches(pid, fd, epfd, tfd, *toff));
            *toff += 1;
            let what = holder.map_or("none".to_string(), |fd| link_kind(pid, fd));
            items.push((tfd, events, data, holder, what));
        }
        items.sort();
        items
    }

    /// One fd as the kernel shows it, without what a restore cannot keep (inode
    /// numbers, mount ids, a timer's remaining time).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct FdView {
        /// [`link_kind`].
        pub kind: String,
        /// fdinfo `flags:` (octal; O_CLOEXEC is the fd's close-on-exec).
        pub flags: String,
        /// fdinfo `pos:`.
        pub pos: String,
        /// What the kind's fdinfo and a copy of the file say of its state, one fact a
        /// line.
        pub state: Vec<String>,
    }

    /// The fd table of `pid`, fd by fd (of a process that runs on, the fds that were
    /// there both when listed and when read).
    pub fn fd_table(pid: u32) -> BTreeMap<u32, FdView> {
        proc_fds(pid).into_iter().filter_map(|fd| Some((fd, fd_view(pid, fd)?))).collect()
    }

    /// The value of an fdinfo line `name: value`.
    fn field<'t>(fdinfo: &'t str, name: &str) -> Option<&'t str> {
        fdinfo.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
    }

    /// One fd of `pid`; None: it is gone.
    pub fn fd_view(pid: u32, fd: u32) -> Option<FdView> {
        let kind = try_link_kind(pid, fd)?;
        let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
        let lines_with = |prefixes: &[&str]| -> Vec<String> {
            fdinfo
                .lines()
                .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        };
        let state = match kind.as_str() {
            "anon_inode:[eventpoll]" => interest(pid, fd)
                .into_iter()
                .map(|(tfd, events, data, holder, what)| {
                    format!("tfd={tfd} events={events:#x} data={data:#x} held by {holder:?}: {what}")
                })
                .collect(),
            // Not eventfd-id: a new eventfd gets a new one.
            "anon_inode:[eventfd]" => lines_with(&["eventfd-count:", "eventfd-semaphore:"]),
            // Not it_value: the time left runs on.
            "anon_inode:[timerfd]" => {
                let mut state = lines_with(&["clockid:", "it_interval:", "settime flags:", "ticks:"]);
                state.push(format!(
                    "armed: {}",
                    field(&fdinfo, "it_value").is_some_and(|v| v.replace(' ', "") != "(0,0)")
                ));
                state
            }
            "anon_inode:[signalfd]" => lines_with(&["sigmask:"]),
            "anon_inode:inotify" => lines_with(&["inotify "])
                .into_iter()
                .map(|l| {
                    l.split_whitespace().filter(|w| !w.starts_with("sdev:")).collect::<Vec<_>>().join(" ")
                })
                .collect(),
            "socket" => socket_state(try_grab(pid, fd).ok()?.as_fd()),
            "pipe" => vec![format!("queued: {:?}", queued(try_grab(pid, fd).ok()?.as_fd()))],
            _ => Vec::new(),
        };
        Some(FdView {
            kind,
            flags: field(&fdinfo, "flags").unwrap_or_default().to_string(),
            pos: field(&fdinfo, "pos").unwrap_or_default().to_string(),
            state,
        })
    }

    /// Bytes queued for reading (FIONREAD), or the error.
    fn queued(fd: BorrowedFd<'_>) -> Result<i32, i32> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into our local.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD as libc::Ioctl, &mut n) };
        if ret < 0 { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) } else { Ok(n) }
    }

    /// A socket's family, type, whether it listens, its local address (what
    /// getsockname gives: an inet address, a unix path), and what is queued for reading.
    fn socket_state(fd: BorrowedFd<'_>) -> Vec<String> {
        use crate::programs::int_opt;
        let domain = int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN);
        let kind = int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE);
        let listening = int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN);
        let local = match nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd()) {
            Ok(addr) => addr.to_string(),
            Err(e) => format!("getsockname: {e}"),
        };
        let mut state =
            vec![format!("domain={domain} type={kind} listening={listening}"), format!("local={local}")];
        if listening == 0 {
            state.push(format!("queued: {:?}", queued(fd)));
        }
        state
    }

    /// Whether the unix sockets `a` and `b` (copies) are each other's peer: a byte sent
    /// on each comes out of the other. Both queues must be empty (the byte read back is
    /// the one sent).
    pub fn are_peers(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
        use nix::sys::socket::{MsgFlags, recv, send};
        let one_way = |from: BorrowedFd<'_>, to: BorrowedFd<'_>, byte: u8| {
            if send(from.as_raw_fd(), &[byte], MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) != Ok(1) {
                return false;
            }
            let mut got = [0u8; 1];
            recv(to.as_raw_fd(), &mut got, MsgFlags::MSG_DONTWAIT) == Ok(1) && got[0] == byte
        };
        one_way(a, b, b'a') && one_way(b, a, b'b')
    }
}
