//! Load: 500 checkpoint → image → restore cycles on a tree of more than 1,000 fds, in
//! one `crd stress` process with BPF loaded once. crd's own fd count and RSS must stay
//! flat, and once it exits no BPF program, map or link of its own may be left.
use std::process::Command;

use crd_tests::{crd_bin, require_root, spawn};
use serde_json::Value;

/// Cycles to run: `CRD_LOAD_CYCLES` (to try fewer), else 500.
fn cycles() -> usize {
    std::env::var("CRD_LOAD_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
}

/// IDs of the BPF objects of `kind` (prog, map, link) `bpftool` lists, with the named
/// field of each (e.g. "prog_id" of links).
fn bpftool_list(kind: &str) -> Vec<Value> {
    let out = Command::new("bpftool").args(["--json", kind, "list"]).output().expect("bpftool runs");
    assert!(out.status.success(), "bpftool {kind} list: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn ids(list: &[Value], field: &str) -> Vec<u64> {
    list.iter().filter_map(|v| v[field].as_u64()).collect()
}

#[test]
fn five_hundred_cycles_leak_no_fd_no_memory_and_no_bpf_object() {
    require_root!();
    crd_tests::require_tool!("bpftool");
    // 300 pipes: the root holds 403 fds, its child (which inherits them and adds its
    // own) 603.
    let fixture = spawn(&["pipes:200", "fork", "pipes:100"], 2);
    let n = cycles();
    let out = Command::new(crd_bin())
        .args(["stress", &fixture.root().to_string(), "--tree", "--cycles", &n.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "crd stress: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("crd stress prints JSON");
    assert!(report["fds"].as_u64().unwrap() > 1000, "{}", report["fds"]);
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), n);
    let window = (n / 5).max(1);
    let max_of = |s: &[Value], field: &str| s.iter().map(|v| v[field].as_u64().unwrap()).max().unwrap();
    let (first, last) = (&samples[..window], &samples[n - window..]);
    let (fds_first, fds_last) = (max_of(first, "fds"), max_of(last, "fds"));
    assert_eq!(fds_last, fds_first, "crd's fd count grew from {fds_first} to {fds_last}");
    // RSS: the allocator may keep some pages, but a leak of even one image (~100 KiB)
    // or one fd table per cycle would add tens of MiB over the run.
    let (rss_first, rss_last) = (max_of(first, "rss_kib"), max_of(last, "rss_kib"));
    assert!(
        rss_last <= rss_first + rss_first / 10 + 2048,
        "crd's RSS grew from {rss_first} KiB to {rss_last} KiB over {n} cycles"
    );
    eprintln!(
        "{n} cycles in {} ms: fds {fds_first} -> {fds_last}, RSS {rss_first} -> {rss_last} KiB",
        report["elapsed_ms"]
    );

    // crd has exited: none of the objects it loaded is left.
    let progs: Vec<u64> =
        report["bpf"]["progs"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    let maps: Vec<u64> = report["bpf"]["maps"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(progs.len() >= 2 && maps.len() >= 3, "crd saw its own objects: {}", report["bpf"]);
    // The kernel frees maps and programs asynchronously (RCU, work queues): allow it
    // a moment, then nothing of crd's may be listed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let live_progs = ids(&bpftool_list("prog"), "id");
        let live_maps = ids(&bpftool_list("map"), "id");
        let linked = ids(&bpftool_list("link"), "prog_id");
        let left: Vec<String> = progs
            .iter()
            .filter(|id| live_progs.contains(id))
            .map(|id| format!("program {id}"))
            .chain(progs.iter().filter(|id| linked.contains(id)).map(|id| format!("a link to program {id}")))
            .chain(maps.iter().filter(|id| live_maps.contains(id)).map(|id| format!("map {id}")))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "left after crd exited: {}", left.join(", "));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
