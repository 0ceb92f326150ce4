//! Property: for any process tree wired with pipes, dups, files, eventfds and memfds,
//! restoring its image
//! and checkpointing the stubs gives the same graph. proptest shrinks a failure to a
//! small tree.
use std::collections::BTreeMap;

use crd_tests::{assert_round_trip, image_of_stopped, is_root, spawn};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// An end of pipe number N.
    PipeRead(usize),
    PipeWrite(usize),
    File,
    Eventfd,
    Memfd,
}

/// Decodes random bytes into a valid fixture script: every step applies to fds that
/// are open and of the right kind, so any byte string is a tree worth restoring.
/// Returns the steps and the number of processes.
fn script(genome: &[u8], dir: &std::path::Path) -> (Vec<String>, usize) {
    let mut bytes = genome.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);
    let mut open: BTreeMap<u32, Kind> = BTreeMap::new();
    let mut steps = Vec::new();
    let (mut processes, mut threads, mut files) = (1usize, 0, 0);
    // Bytes queued per pipe (kept well under 64 KiB so no write blocks), and the pipes
    // whose read end an ancestor still holds (it stopped at its fork, fds and all).
    let mut queued: Vec<usize> = Vec::new();
    let mut ancestors_read: std::collections::BTreeSet<usize> = Default::default();
    let free = |open: &BTreeMap<u32, Kind>, pick: u8| -> u32 {
        let mut fd = 3 + (pick as u32 % 24);
        while open.contains_key(&fd) {
            fd = 3 + (fd - 2) % 24;
        }
        fd
    };
    let pick = |open: &BTreeMap<u32, Kind>, b: u8, want: &dyn Fn(Kind) -> bool| -> Option<u32> {
        let candidates: Vec<u32> = open.iter().filter(|(_, k)| want(**k)).map(|(fd, _)| *fd).collect();
        (!candidates.is_empty()).then(|| candidates[b as usize % candidates.len()])
    };
    let any = |_: Kind| true;
    for _ in 0..genome.len() / 2 {
        if open.len() > 20 {
            break;
        }
        match next() % 11 {
            0 | 1 => {
                let pipe = queued.len();
                queued.push(0);
                let r = free(&open, next());
                open.insert(r, Kind::PipeRead(pipe));
                let w = free(&open, next());
                open.insert(w, Kind::PipeWrite(pipe));
                steps.push(format!("pipe:{r}:{w}"));
            }
            2 => {
                if let Some(a) = pick(&open, next(), &any) {
                    let b = free(&open, next());
                    open.insert(b, open[&a]);
                    steps.push(format!("dup:{a}:{b}"));
                }
            }
            3 => {
                if let Some(a) = pick(&open, next(), &any) {
                    open.remove(&a);
                    steps.push(format!("close:{a}"));
                }
            }
            4 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::File);
                let name = dir.join(format!("f{}", next() % 3));
                steps.push(format!("open:{fd}:rwc:{}", name.display()));
                files += 1;
                steps.push(format!("write:{fd}:file {files} "));
                steps.push(format!("seek:{fd}:{}", next() % 7));
            }
            5 => {
                let readable = |k: Kind| match k {
                    Kind::PipeWrite(p) => {
                        ancestors_read.contains(&p) || open.values().any(|o| *o == Kind::PipeRead(p))
                    }
                    _ => false,
                };
                if let Some(w) = pick(&open, next(), &readable) {
                    let Kind::PipeWrite(p) = open[&w] else { unreachable!() };
                    let len = 1 + next() as usize * 37;
                    if queued[p] + len < 60_000 {
                        queued[p] += len;
                        steps.push(format!("fill:{w}:{len}"));
                    }
                }
            }
            6 => {
                if let Some(a) = pick(&open, next(), &any) {
                    steps.push(format!("{}:{a}", if next() % 2 == 0 { "cloexec" } else { "nonblock" }));
                }
            }
            7 if processes < 4 => {
                processes += 1;
                ancestors_read.extend(open.values().filter_map(|k| match k {
                    Kind::PipeRead(p) => Some(*p),
                    _ => None,
                }));
                steps.push("fork".into());
            }
            8 if threads < 2 => {
                threads += 1;
                steps.push("threads:1".into());
            }
            9 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::Eventfd);
                let flags = ["", "s", "n", "sn"][next() as usize % 4];
                steps.push(format!("eventfd:{fd}:{}:{flags}", next()));
            }
            10 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::Memfd);
                let seals = ["", "s", "sg", "S", "sgw"][next() as usize % 5];
                steps.push(format!("memfd:{fd}:m{fd}:{}:{seals}", next() as usize * 61));
                steps.push(format!("seek:{fd}:{}", next() % 5));
            }
            _ => {}
        }
    }
    (steps, processes)
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES lowers it where time is short (the VM matrix).
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(12),
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_wired_tree_round_trips(genome in prop::collection::vec(any::<u8>(), 0..48)) {
        if !is_root() {
            return Ok(());
        }
        let dir = tempfile::tempdir().unwrap();
        let (steps, processes) = script(&genome, dir.path());
        let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
        let fixture = spawn(&steps, processes);
        let (original, image, _log) = image_of_stopped(fixture, dir.path());
        // Panics (and so fails and shrinks) with the first difference.
        assert_round_trip(&original, &image);
    }
}
