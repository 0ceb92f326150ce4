//! `crd ls` on processes the tests spawn, checked against /proc and against itself
//! across sources.
use std::{collections::BTreeMap, fs};

use crd_tests::{crd, proc_fds, require_root, spawn};
use serde_json::Value;

fn ls_json(args: &[&str]) -> Value {
    let mut full = vec!["ls", "--json"];
    full.extend_from_slice(args);
    let out = crd(&full);
    assert!(out.status.success(), "crd {full:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("crd ls --json prints JSON")
}

fn process(listing: &Value, pid: u32) -> &Value {
    listing["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
        .unwrap_or_else(|| panic!("PID {pid} missing from {listing:#}"))
}

/// fd number → the listing's entry.
fn fds(listing: &Value, pid: u32) -> BTreeMap<u64, &Value> {
    process(listing, pid)["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .map(|f| (f["fd"].as_u64().expect("fd number"), f))
        .collect()
}

fn holders(v: &Value) -> Vec<(u64, u64)> {
    v.as_array()
        .expect("holders")
        .iter()
        .map(|h| (h["pid"].as_u64().expect("pid"), h["fd"].as_u64().expect("fd")))
        .collect()
}

/// A parent and child sharing a pipe (with 11 bytes queued) and a dup of its read end,
/// a file at an offset, a second pipe whose write end only the parent still holds, and a
/// FIFO (fd 9, shared) that the child also opened anew (fd 10).
fn wired_pair(file: &std::path::Path) -> crd::fixture::Spawned {
    let fifo = file.with_extension("fifo");
    let steps = [
        "pipe:3:4".to_string(),
        "write:4:hello, pipe".into(),
        "dup:3:5".into(),
        format!("open:6:rwc:{}", file.display()),
        "write:6:0123456789".into(),
        "seek:6:3".into(),
        "pipe:7:8".into(),
        "cloexec:8".into(),
        format!("mkfifo:{}", fifo.display()),
        format!("open:9:rw:{}", fifo.display()),
        "threads:2".into(),
        "fork".into(),
        "close:8".into(),
        format!("open:10:r:{}", fifo.display()),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    spawn(&steps, 2)
}

#[test]
fn ls_agrees_with_proc_on_fds_names_modes_and_offsets() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    let tree = wired_pair(&file);
    let (parent, child) = (tree.pids[0], tree.pids[1]);
    let listing = ls_json(&[&parent.to_string(), &child.to_string()]);
    for pid in [parent, child] {
        let listed = fds(&listing, pid);
        assert_eq!(listed.keys().map(|&fd| fd as u32).collect::<Vec<_>>(), proc_fds(pid), "PID {pid}");
        for (fd, entry) in &listed {
            let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
            let field = |name: &str| {
                info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap()
            };
            assert_eq!(entry["name"], link.to_string_lossy().as_ref(), "PID {pid} fd {fd}");
            let flags = u32::from_str_radix(&field("flags:"), 8).unwrap();
            let read = flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32;
            let write = flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
            assert_eq!(entry["access"]["read"], read, "PID {pid} fd {fd} flags {flags:o}");
            assert_eq!(entry["access"]["write"], write, "PID {pid} fd {fd} flags {flags:o}");
            assert_eq!(entry["close_on_exec"], flags & libc::O_CLOEXEC as u32 != 0, "PID {pid} fd {fd}");
            assert_eq!(entry["offset"].as_i64().unwrap().to_string(), field("pos:"), "PID {pid} fd {fd}");
        }
    }
    assert_eq!(fds(&listing, parent)[&6]["offset"], 3);
    assert_eq!(fds(&listing, parent)[&8]["kind"], "Pipe");
    assert_eq!(process(&listing, parent)["threads"].as_array().unwrap().len(), 3);
}

#[test]
fn ls_shows_pipe_ends_shared_descriptions_and_shared_tables() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let tree = wired_pair(&dir.path().join("data"));
    let (parent, child) = (tree.pids[0] as u64, tree.pids[1] as u64);
    let listing = ls_json(&[&parent.to_string(), &child.to_string()]);
    let by_fd = fds(&listing, parent as u32);
    let pipe_of = |fd: u64| by_fd[&fd]["inode"].clone();
    let pipes = listing["pipes"].as_array().unwrap();
    let pipe = |inode: Value| pipes.iter().find(|p| p["inode"] == inode).expect("pipe listed");
    let first = pipe(pipe_of(3));
    assert_eq!(holders(&first["readers"]), vec![(parent, 3), (parent, 5), (child, 3), (child, 5)]);
    assert_eq!(holders(&first["writers"]), vec![(parent, 4), (child, 4)]);
    assert_eq!(first["queued"], "hello, pipe".len());
    assert_eq!(first["held_outside"], false);
    let second = pipe(pipe_of(7));
    assert_eq!(holders(&second["writers"]), vec![(parent, 8)], "the child closed its write end");
    // fd 3 and its dup share one description, across the fork too.
    let description = by_fd[&3]["description"].clone();
    assert_eq!(by_fd[&5]["description"], description);
    let shared = listing["shared_descriptions"].as_array().unwrap();
    let entry = shared.iter().find(|d| d["description"] == description).expect("shared description listed");
    assert_eq!(holders(&entry["holders"]), vec![(parent, 3), (parent, 5), (child, 3), (child, 5)]);
    // The parent's three threads share one table; the child has its own.
    let tables = listing["shared_fd_tables"].as_array().unwrap();
    assert_eq!(tables.len(), 1, "{tables:#?}");
    assert_eq!(tables[0]["fd_table"], process(&listing, parent as u32)["fd_table"]);
    let fifo = pipe(by_fd[&9]["inode"].clone());
    assert_eq!(holders(&fifo["readers"]), vec![(parent, 9), (child, 9), (child, 10)]);
    assert_eq!(holders(&fifo["writers"]), vec![(parent, 9), (child, 9)]);
    // Listed alone, the parent shares the FIFO with a description it does not hold (the
    // child's fd 10); the pipes' descriptions it does hold, so those are not outside.
    let alone = ls_json(&[&parent.to_string()]);
    let by_fd = fds(&alone, parent as u32);
    for p in alone["pipes"].as_array().unwrap() {
        let is_fifo = p["inode"] == by_fd[&9]["inode"];
        assert_eq!(p["held_outside"], is_fifo, "{p:#}");
    }
}

#[test]
fn bpf_and_procfs_list_the_same_thing() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let tree = wired_pair(&dir.path().join("data"));
    let pids: Vec<String> = tree.pids.iter().map(u32::to_string).collect();
    let pids: Vec<&str> = pids.iter().map(String::as_str).collect();
    for extra in [&[][..], &["--pipes"][..]] {
        let run = |source: &str| {
            let mut args = vec!["ls", "--source", source];
            args.extend_from_slice(extra);
            args.extend_from_slice(&pids);
            let out = crd(&args);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let (bpf, procfs) = (run("bpf"), run("procfs"));
        assert_eq!(bpf, procfs, "crd ls {extra:?}: BPF and /proc differ");
        assert!(bpf.contains("11 bytes queued"), "{bpf}");
    }
}

#[test]
fn pipes_only_lists_nothing_but_pipes() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let tree = wired_pair(&dir.path().join("data"));
    let listing = ls_json(&["--pipes", &tree.pids[0].to_string()]);
    let listed: Vec<u64> = fds(&listing, tree.pids[0]).into_keys().collect();
    assert_eq!(listed, vec![3, 4, 5, 7, 8, 9]);
}

#[test]
fn ls_all_covers_every_inspectable_process_but_crd() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let tree = wired_pair(&dir.path().join("data"));
    let listing = ls_json(&["--all"]);
    let pids: Vec<u64> =
        listing["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    for pid in &tree.pids {
        assert!(pids.contains(&(*pid as u64)), "PID {pid} missing from --all");
        assert_eq!(fds(&listing, *pid).len(), proc_fds(*pid).len());
    }
    // Every process crd may inspect that is alive before and after the listing is in it.
    let alive = |pid: &u64| fs::read_link(format!("/proc/{pid}/cwd")).is_ok();
    let before: Vec<u64> =
        fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    let listing = ls_json(&["--all"]);
    let listed: Vec<u64> =
        listing["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    for pid in before.iter().filter(|p| alive(p)) {
        assert!(listed.contains(pid), "PID {pid} was alive throughout but not listed");
    }
}

#[test]
fn ls_without_targets_or_with_a_vanished_pid_is_a_one_line_error() {
    require_root!();
    for args in [&["ls"][..], &["ls", "4194303"][..]] {
        let out = crd(args);
        assert_eq!(out.status.code(), Some(1), "crd {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(out.stdout.is_empty());
    }
    let out = crd(&["ls", "4194303"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no process with PID 4194303"));
}
