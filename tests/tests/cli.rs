//! The `crd` command line: exit codes, one-line errors, no partial output, formats.
use std::{fs, process::Command};

use crd_tests::{assert_running_untraced, crd, require_root, spawn};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A PID no process has: above pid_max.
fn vanished_pid() -> String {
    let max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    (max + 1).to_string()
}

#[test]
fn an_unknown_pid_is_a_one_line_error_and_writes_nothing() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("never.img");
    for source in ["bpf", "procfs"] {
        let out = crd(&["checkpoint", &vanished_pid(), "-o", image.to_str().unwrap(), "--source", source]);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("crd: no process with PID"), "{err}");
        assert!(!image.exists(), "no image for a failed checkpoint");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file either");
    }
}

#[test]
fn ls_into_a_reader_that_stops_early_exits_quietly() {
    require_root!();
    // Tables of a few hundred kilobytes, far more than the pipe holds before the reader
    // closes it (3,000 fds: under the default hard limit of 4,096 a VM guest has).
    let fixture = spawn(&["pipes:1500"], 1);
    for json in [false, true] {
        let mut args = vec!["ls".to_string(), fixture.root().to_string()];
        if json {
            args.push("--json".into());
        }
        let mut child = Command::new(crd_tests::crd_bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first)
            .unwrap();
        assert!(!first.is_empty(), "json {json}: a first line");
        // The reader is gone: crd's next write fails with EPIPE.
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "json {json}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "json {json}: nothing said");
    }
}

#[test]
fn checkpoint_writes_a_private_image_that_inspect_reads_in_every_format() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let fixture = spawn(&["pipe:3:4", "write:4:abc", "dup:4:5", "fork"], 2);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("tree.img");
    let pid = fixture.root().to_string();
    let out = crd(&["checkpoint", &pid, "--tree", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("checkpointed 2 process(es)"), "{}", stderr(&out));
    assert_eq!(fs::metadata(&image).unwrap().permissions().mode() & 0o777, 0o600);
    for pid in &fixture.pids {
        assert_running_untraced(*pid);
    }

    let text = crd(&["inspect", image.to_str().unwrap()]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("shared objects:"), "{text}");
    assert!(text.contains("capacity 65536 queued 3"), "{text}");

    let json = crd(&["inspect", image.to_str().unwrap(), "--format", "json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    assert_eq!(value["graph"]["root"], fixture.root());
    assert_eq!(value["graph"]["tasks"].as_array().unwrap().len(), 2);

    let dot = crd(&["inspect", image.to_str().unwrap(), "--format", "dot"]);
    let dot = String::from_utf8(dot.stdout).unwrap();
    assert!(dot.starts_with("digraph crd {") && dot.trim_end().ends_with('}'));
    assert!(dot.contains("fd 5"), "{dot}");
}

#[test]
fn a_corrupt_or_truncated_image_is_refused_in_one_line() {
    require_root!();
    let fixture = spawn(&["pipe:3:4"], 1);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    let out = crd(&["checkpoint", &fixture.root().to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = fs::read(&image).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("truncated", bytes[..bytes.len() - 3].to_vec(), "truncated image"),
        (
            "flipped",
            {
                let mut b = bytes.clone();
                let last = b.len() - 1;
                b[last] ^= 1;
                b
            },
            "checksum mismatch",
        ),
        ("not an image", b"hello world, not an image at all".to_vec(), "not a crd image"),
    ];
    for (name, content, message) in cases {
        let bad = dir.path().join(name);
        fs::write(&bad, content).unwrap();
        let out = crd(&["inspect", bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains(message), "{name}: {err}");
        assert!(out.stdout.is_empty(), "{name}: no partial output");
    }
}

#[test]
fn demo_checkpoints_a_wired_tree_and_shows_it() {
    require_root!();
    crd_tests::assert_demo_output(&crd(&["demo"]));
}

#[test]
fn bpftool_lists_crd_programs_and_maps_while_they_are_loaded() {
    require_root!();
    crd_tests::require_tool!("bpftool");
    if Command::new("bpftool").arg("version").output().is_err() {
        panic!("bpftool missing: `cargo xtask test` installs it");
    }
    let harvester = crd::harvest::bpf::BpfHarvester::load(false, &Default::default()).expect("BPF loads");
    // Its own programs, by id: another crd (a test beside this one, a `crd serve`) may
    // have programs of the same names loaded.
    let ids = harvester.program_ids();
    let progs = Command::new("bpftool").args(["prog", "show"]).output().unwrap();
    let progs = String::from_utf8_lossy(&progs.stdout);
    let names: Vec<&str> = progs
        .lines()
        .filter(|l| ids.iter().any(|id| l.starts_with(&format!("{id}:"))))
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "name").nth(1))
        .collect();
    assert!(names.contains(&"crd_task"), "crd_task among {ids:?} in {progs}");
    // The fd program this kernel takes (crd_task_walk on 6.2+), its name cut to 15 bytes
    // by the kernel.
    let fd_program = harvester.fd_program_name();
    assert!(
        names.iter().any(|n| n.starts_with("crd_task_") && fd_program.starts_with(n)),
        "{fd_program} among {ids:?} in {progs}"
    );
    let maps = Command::new("bpftool").args(["map", "show"]).output().unwrap();
    let maps = String::from_utf8_lossy(&maps.stdout);
    for name in ["crd_events", "crd_tgids", "crd_stats"] {
        assert!(maps.contains(&format!("name {name}")), "{name} in {maps}");
    }
    drop(harvester);
    let after = Command::new("bpftool").args(["prog", "show"]).output().unwrap();
    let after = String::from_utf8_lossy(&after.stdout);
    for id in &ids {
        assert!(!after.lines().any(|l| l.starts_with(&format!("{id}:"))), "program {id} still loaded");
    }
}

/// Starts `crd checkpoint` with the targets held frozen, and waits until they are.
fn checkpoint_held_frozen(pid: u32, image: &std::path::Path) -> std::process::Child {
    let child = Command::new(crd_tests::crd_bin())
        .args(["checkpoint", &pid.to_string(), "--tree", "-o", image.to_str().unwrap()])
        .env(crd::checkpoint::HOLD_FROZEN_ENV, "20000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while crd_tests::status_field(pid, "TracerPid:") == "0" {
        assert!(std::time::Instant::now() < deadline, "crd never froze {pid}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child
}

#[test]
fn ctrl_c_while_frozen_resumes_the_target_and_writes_nothing() {
    require_root!();
    let fixture = spawn(&["pipe:3:4", "write:4:keep", "fork"], 2);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("i.img");
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let crd = checkpoint_held_frozen(fixture.root(), &image);
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(crd.id() as i32, signal) };
        let out = crd.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "signal {signal}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("interrupted"), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "no image, no temporary file");
        for pid in &fixture.pids {
            assert_running_untraced(*pid);
        }
    }
}

/// Starts `crd ARGS` held at the start of its BPF harvest (the programs loaded, the
/// targets of a graft frozen), and waits until `held` says it is there.
fn crd_held_at_harvest(args: &[&str], held: impl Fn(u32) -> bool) -> std::process::Child {
    let child = Command::new(crd_tests::crd_bin())
        .args(args)
        .env(crd::harvest::bpf::HOLD_HARVEST_ENV, "20000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !held(child.id()) {
        assert!(std::time::Instant::now() < deadline, "crd {args:?} never reached its harvest");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child
}

/// Whether process `pid` holds a BPF program (its fdinfo names a prog_id).
fn holds_bpf_program(pid: u32) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return false };
    dir.flatten().any(|e| fs::read_to_string(e.path()).is_ok_and(|info| info.contains("prog_id:")))
}

/// Asserts crd ended by `signal` as an interrupted command does: status 130, one line
/// saying so, nothing on stdout.
fn assert_interrupted(crd: std::process::Child, signal: i32) {
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(crd.id() as i32, signal) };
    let out = crd.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "signal {signal}: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("crd: interrupted"), "{err}");
    assert!(out.stdout.is_empty(), "signal {signal}: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn ctrl_c_during_a_graft_resumes_the_target_and_exits_130() {
    require_root!();
    let fixture = spawn(&["comm:crdgraftint", "pipe:3:4", "write:4:keep", "fork"], 2);
    let root = fixture.root().to_string();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // Frozen (traced) means the BPF programs are loaded and the harvest is next.
        let crd = crd_held_at_harvest(&["graft", &root, "--tree", "--source", "bpf"], |_| {
            crd_tests::status_field(fixture.root(), "TracerPid:") != "0"
        });
        assert_interrupted(crd, signal);
        for pid in &fixture.pids {
            assert_running_untraced(*pid);
        }
        let named: Vec<_> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "crdgraftint"))
            .collect();
        assert_eq!(named.len(), 2, "the originals and no stub");
    }
}

#[test]
fn ctrl_c_during_ls_exits_130() {
    require_root!();
    let fixture = spawn(&["pipe:3:4"], 1);
    let pid = fixture.root().to_string();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let crd = crd_held_at_harvest(&["ls", &pid], holds_bpf_program);
        assert_interrupted(crd, signal);
    }
}

#[test]
fn a_killed_crd_leaves_its_target_running() {
    require_root!();
    let fixture = spawn(&["pipe:3:4", "threads:2", "fork"], 2);
    let dir = tempfile::tempdir().unwrap();
    let mut crd = checkpoint_held_frozen(fixture.root(), &dir.path().join("k.img"));
    crd.kill().unwrap();
    crd.wait().unwrap();
    // The kernel detaches the tracees of a dead tracer; give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(100));
    for pid in &fixture.pids {
        for tid in crd::freeze::list_threads(crd::types::Tgid(*pid)) {
            assert_running_untraced(tid.0);
        }
    }
}

/// Runs crd as user `nobody` with no capabilities.
fn crd_as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(crd_tests::crd_bin())
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs")
}

#[test]
fn an_unprivileged_user_is_told_what_is_missing() {
    require_root!();
    crd_tests::require_tool!("setpriv");
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let image = dir.path().join("u.img");
    let image = image.to_str().unwrap();
    // Someone else's process (root's fixture): refused, whatever the source.
    let fixture = spawn(&["pipe:3:4"], 1);
    let root_pid = fixture.root().to_string();
    let bpf = crd_as_nobody(&["checkpoint", &root_pid, "-o", image]);
    assert_eq!(bpf.status.code(), Some(1));
    let err = stderr(&bpf);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("CAP_BPF and CAP_PERFMON") && err.contains("--source procfs"), "{err}");
    let procfs = crd_as_nobody(&["checkpoint", &root_pid, "-o", image, "--source", "procfs"]);
    let err = stderr(&procfs);
    assert_eq!(procfs.status.code(), Some(1));
    assert!(err.contains("not allowed to trace") && err.contains("CAP_SYS_PTRACE"), "{err}");
    assert!(!std::path::Path::new(image).exists());
    assert_running_untraced(fixture.root());
    // The user's own process, through /proc: works.
    let mut own = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = crd_as_nobody(&["checkpoint", &own.id().to_string(), "-o", image, "--source", "procfs"]);
    let _ = own.kill();
    let _ = own.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::path::Path::new(image).exists());
}

/// `crd ARGS` with a BTF file that does not exist.
fn crd_without_btf(args: &[&str]) -> std::process::Output {
    crd(&[args, &["--btf", "/nonexistent/vmlinux"]].concat())
}

#[test]
fn a_missing_btf_file_is_a_one_line_error_for_every_bpf_command() {
    require_root!();
    let fixture = spawn(&[], 1);
    let pid = fixture.root().to_string();
    let missing = "crd: cannot read the BTF file /nonexistent/vmlinux given with --btf: No such file or directory (os error 2)";
    for args in [
        vec!["checkpoint", &pid, "-o", "/nonexistent/x.img", "--source", "bpf"],
        vec!["graft", &pid, "--source", "bpf"],
        vec!["ls", &pid, "--source", "bpf"],
        vec!["demo", "--source", "bpf"],
    ] {
        let out = crd_without_btf(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&out).trim(), missing, "{args:?}");
        assert_running_untraced(fixture.root());
    }
    // The default source says why and falls back to /proc.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fallback.img");
    let out = crd_without_btf(&["checkpoint", &pid, "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("the BPF harvester cannot run here (cannot read the BTF file /nonexistent/vmlinux"),
        "{}",
        stderr(&out)
    );
    let body = crd::image::read(&image).unwrap();
    assert_eq!(body.header.source, crd::image::Source::Procfs, "the image says which source it came from");
    let out = crd_without_btf(&["ls", &pid]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("reading /proc instead"), "{}", stderr(&out));
}

#[test]
fn btf_reads_the_kernel_offsets_from_the_file_given() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("vmlinux");
    fs::write(&copy, fs::read(crd::harvest::offsets::VMLINUX_BTF).unwrap()).unwrap();
    let copy = copy.to_str().unwrap();
    let fixture = spawn(&["pipe:3:4", "write:4:abc", "dup:3:5"], 1);
    let pid = fixture.root().to_string();
    let image = dir.path().join("copy.img");
    let out = crd(&["checkpoint", &pid, "-o", image.to_str().unwrap(), "--source", "bpf", "--btf", copy]);
    assert!(out.status.success(), "{}", stderr(&out));
    let body = crd::image::read(&image).unwrap();
    assert_eq!(body.header.source, crd::image::Source::Bpf);
    let direct = crd_tests::checkpoint(fixture.root(), false, crd::Source::Bpf);
    body.graph.same_shape(&direct.graph).expect("the copy gives the offsets the kernel's own BTF gives");
    let out = crd(&["ls", &pid, "--source", "bpf", "--btf", copy]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pipe:["),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And a file that is not BTF is named in the error: --btf is what was read.
    let garbage = dir.path().join("garbage");
    fs::write(&garbage, b"not BTF at all").unwrap();
    let out = crd(&["ls", &pid, "--source", "bpf", "--btf", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("crd: cannot parse kernel BTF: {}: ", garbage.display())), "{err}");
}
