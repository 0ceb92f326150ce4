//! Privilege: crd names the capability it lacks, never works around the kernel's ptrace
//! access check, writes private images and restores only images no one else can write.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crd_tests::{assert_running_untraced, crd, crd_bin, require_root, spawn, status_field};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const NOBODY: &str = "65534";

/// Runs crd as root with `drop` (setpriv capability names) removed from its bounding,
/// inheritable and so effective sets.
fn crd_without(drop: &str, args: &[&str]) -> Output {
    let minus: Vec<String> = drop.split(',').map(|c| format!("-{c}")).collect();
    let minus = minus.join(",");
    Command::new("setpriv")
        .arg(format!("--bounding-set={minus}"))
        .arg(format!("--inh-caps={minus}"))
        .arg(crd_bin())
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs")
}

/// Runs crd as user nobody with no capabilities.
fn crd_as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--inh-caps=-all"])
        .arg(crd_bin())
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs")
}

/// A fixture process run by user nobody, killed when dropped.
struct NobodyFixture(Child);

impl NobodyFixture {
    fn start(steps: &[&str]) -> Self {
        let child = Command::new("setpriv")
            .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--inh-caps=-all"])
            .arg(crd_bin())
            .arg("fixture")
            .args(steps)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // setpriv execs crd in place: wait until the fixture runs as nobody and waits.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(status_field(pid, "Uid:").starts_with(NOBODY) && status_field(pid, "State:").starts_with('S'))
        {
            assert!(Instant::now() < deadline, "the fixture never started as nobody");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for NobodyFixture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn one_line(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn each_missing_capability_is_named_exactly() {
    require_root!();
    crd_tests::require_tool!("setpriv");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("caps.img");
    let image = image.to_str().unwrap();
    let fixture = spawn(&["pipe:3:4"], 1);
    let pid = fixture.root().to_string();
    // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON: it goes too.
    for (drop, lacks) in [
        ("bpf,sys_admin", "crd lacks CAP_BPF;"),
        ("perfmon,sys_admin", "crd lacks CAP_PERFMON;"),
        ("bpf,perfmon,sys_admin", "crd lacks CAP_BPF and CAP_PERFMON;"),
    ] {
        let out = crd_without(drop, &["checkpoint", &pid, "-o", image, "--source", "bpf"]);
        let err = one_line(&out);
        assert!(err.contains(lacks) && err.contains("--source procfs"), "without {drop}: {err}");
        assert!(!std::path::Path::new(image).exists());
        assert_running_untraced(fixture.root());
    }
    // Without CAP_SYS_PTRACE root may not trace another user's process.
    let theirs = NobodyFixture::start(&["pipe:3:4"]);
    let out = crd_without(
        "sys_ptrace",
        &["checkpoint", &theirs.pid().to_string(), "-o", image, "--source", "procfs"],
    );
    let err = one_line(&out);
    assert!(
        err.contains(&format!(
            "not allowed to trace PID {} (owned by uid {NOBODY}): crd lacks CAP_SYS_PTRACE",
            theirs.pid()
        )),
        "{err}"
    );
    assert_running_untraced(theirs.pid());
    // With every capability it works: the dropped ones were the reason.
    let out = crd(&["checkpoint", &theirs.pid().to_string(), "-o", image]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn procfs_works_on_own_processes_and_the_ptrace_check_is_never_bypassed() {
    require_root!();
    crd_tests::require_tool!("setpriv");
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let image = dir.path().join("own.img");
    let image = image.to_str().unwrap();

    // The user's own process: checkpoint and graft (pidfd_getfd) both work.
    let own = NobodyFixture::start(&["pipe:3:4", "write:4:mine"]);
    let pid = own.pid().to_string();
    let out = crd_as_nobody(&["checkpoint", &pid, "-o", image, "--source", "procfs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let body = crd::image::read(std::path::Path::new(image)).unwrap();
    assert_eq!(body.graph.root.0, own.pid());
    let out = crd_as_nobody(&["graft", &pid, "--source", "procfs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(stub) = line.split_once(" -> ").and_then(|(_, new)| new.trim().parse::<i32>().ok()) {
            // SAFETY: plain kill(2) of the stub graft just made.
            unsafe { libc::kill(stub, libc::SIGKILL) };
        }
    }
    assert_running_untraced(own.pid());

    // Someone else's process (root's): refused, by checkpoint and by graft alike.
    let roots = spawn(&["pipe:3:4"], 1);
    let root_pid = roots.root().to_string();
    for args in [
        vec!["checkpoint", root_pid.as_str(), "-o", image, "--source", "procfs"],
        vec!["graft", root_pid.as_str(), "--source", "procfs"],
    ] {
        let out = crd_as_nobody(&args);
        let err = one_line(&out);
        assert!(err.contains("not allowed to trace") && err.contains("crd lacks CAP_SYS_PTRACE"), "{err}");
        assert!(out.stdout.is_empty(), "{args:?}: no stub");
        assert_running_untraced(roots.root());
    }

    // The user's own process, made non-dumpable: the kernel's ptrace check says no to
    // its owner too, and crd takes no way around it.
    let guarded = NobodyFixture::start(&["pipe:3:4", "nodump"]);
    for args in [
        vec![
            "checkpoint".to_string(),
            guarded.pid().to_string(),
            "-o".into(),
            image.into(),
            "--source".into(),
            "procfs".into(),
        ],
        vec!["graft".to_string(), guarded.pid().to_string(), "--source".into(), "procfs".into()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = crd_as_nobody(&args);
        let err = one_line(&out);
        assert!(
            err.contains(&format!("not allowed to trace PID {} (owned by uid {NOBODY})", guarded.pid())),
            "{err}"
        );
        // Why, though it is the user's own: Yama's scope if Yama restricts ptrace, else
        // the process's protection.
        let yama: u32 = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .map_or(0, |s| s.trim().parse().unwrap_or(0));
        let why =
            if yama > 0 { format!("kernel.yama.ptrace_scope is {yama}") } else { "not dumpable".into() };
        assert!(err.contains(&why), "{err}");
        assert!(out.stdout.is_empty());
        assert_running_untraced(guarded.pid());
    }
}

#[test]
fn images_are_private_and_restore_refuses_one_others_can_write() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("p.img");
    let fixture = spawn(&["comm:crdwritable", "pipe:3:4", "write:4:x"], 1);
    // Private even under a permissive umask.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} checkpoint {} -o {}",
            crd_bin().display(),
            fixture.root(),
            image.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::metadata(&image).unwrap().permissions().mode() & 0o777, 0o600);
    let _log = fixture.stop();
    for mode in [0o664, 0o606, 0o666, 0o620] {
        fs::set_permissions(&image, fs::Permissions::from_mode(mode)).unwrap();
        let out = crd(&["restore", image.to_str().unwrap()]);
        let err = one_line(&out);
        assert_eq!(
            err.trim(),
            format!(
                "crd: {0}: refusing an image that others can write (mode {mode:04o}): it may have been altered; chmod 600 {0}",
                image.display()
            )
        );
        assert!(out.stdout.is_empty());
        assert!(!crd_tests::comm_exists("crdwritable"), "no stub was started");
    }
    // Readable by others is fine; chmod 600 as told is too.
    for mode in [0o644, 0o600] {
        fs::set_permissions(&image, fs::Permissions::from_mode(mode)).unwrap();
        let restored = crd_tests::restore_with(&["restore", image.to_str().unwrap()]).expect("restores");
        drop(restored);
    }
}
