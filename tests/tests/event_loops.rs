//! Real event loops round-trip: a tokio program (its runtime's epoll and eventfd waker,
//! a unix socketpair, an eventfd and a timerfd registered with the runtime, a TCP
//! listener) is checkpointed, killed and restored, and the restored fd table is compared
//! with the original's through the kernel ([`crd_tests::kernel`]: link kinds, fdinfo
//! flags, every epoll item with all 64 bits of data and the file it watches, timer
//! clock and interval, eventfd count, socket family, type and address), never through
//! crd's own output. The socketpair's restored ends are then each other's peer.
use std::{os::fd::AsFd, process::Command};

use crd::Source;
use crd_tests::{
    assert_round_trip, checkpoint,
    kernel::{self, FdView},
    programs::{Program, grab, own_network_namespace, start_json},
    require_root,
};

/// The tokio program (tests/src/bin/tokio_loop.rs): `$CRD_TEST_PROGRAMS/tokio_loop` in
/// a test VM (the matrix shares it there), else the one cargo built beside this test.
fn tokio_loop() -> Command {
    let path = std::env::var_os("CRD_TEST_PROGRAMS")
        .map(|dir| std::path::PathBuf::from(dir).join("tokio_loop"))
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tokio_loop").into());
    Command::new(path)
}

/// Checkpoints `pid` (BPF, then /proc: both must give the same graph where `sources_agree`
/// says this kernel's /proc shows everything the program holds), writes the image,
/// kills the original and restores it; a checkpoint of the stubs must be the same graph.
fn round_trip(
    program: Program,
    pid: u32,
    dir: &std::path::Path,
    sources_agree: bool,
) -> crd_tests::RestoredTree {
    let body = checkpoint(pid, true, Source::Bpf);
    let by_procfs = checkpoint(pid, true, Source::Procfs);
    if let Err(difference) = body.graph.same_shape(&by_procfs.graph)
        && sources_agree
    {
        panic!("BPF and /proc graphs differ: {difference}");
    }
    let image = dir.join("loop.crd");
    crd::image::write(&image, &body).expect("image written");
    drop(program);
    assert_round_trip(&body, &image)
}

/// Asserts two fd tables are the same, naming the first fd that differs.
fn assert_same_table(
    restored: &std::collections::BTreeMap<u32, FdView>,
    original: &std::collections::BTreeMap<u32, FdView>,
) {
    assert_eq!(
        restored.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>(),
        "the same fds: {restored:#?} vs {original:#?}"
    );
    for (fd, view) in original {
        assert_eq!(&restored[fd], view, "fd {fd} differs");
    }
}

#[test]
fn a_tokio_program_round_trips_with_the_same_fd_table_through_the_kernel() {
    require_root!();
    // Loopback up wherever the test runs (a VM guest's is down), and ports of its own.
    own_network_namespace();
    let dir = tempfile::tempdir().unwrap();
    let (program, info) = start_json(tokio_loop());
    let fd = |name: &str| info[name].as_i64().unwrap_or_else(|| panic!("{name} in {info}")) as u32;
    let pid = fd("pid");
    let before = kernel::fd_table(pid);

    // The table is what tokio made: its epoll watches the waker and every fd of ours
    // (edge-triggered, its scheduled-io pointers as data), each at its own number.
    let view = |name: &str| &before[&fd(name)];
    assert_eq!(view("epoll").kind, "anon_inode:[eventpoll]");
    assert_eq!(view("waker").kind, "anon_inode:[eventfd]");
    assert_eq!(view("eventfd").state[0], "eventfd-count: 29", "41 in hex, as fdinfo shows it");
    assert!(view("timerfd").state.contains(&"clockid: 1".to_string()), "{:?}", view("timerfd"));
    assert!(
        view("timerfd").state.iter().any(|l| l == "it_interval: (90, 250000000)"),
        "{:?}",
        view("timerfd")
    );
    assert!(view("timerfd").state.contains(&"armed: true".to_string()), "{:?}", view("timerfd"));
    assert!(
        view("listener").state.contains(&format!("local=127.0.0.1:{}", fd("port"))),
        "{:?}",
        view("listener")
    );
    let items = kernel::interest(pid, fd("epoll"));
    let watched: Vec<Option<u32>> = items.iter().map(|i| i.3).collect();
    for name in ["waker", "a", "b", "eventfd", "timerfd", "listener"] {
        assert!(watched.contains(&Some(fd(name))), "the epoll watches {name}: {items:x?}");
    }
    assert!(items.iter().all(|i| i.3 == Some(i.0)), "each target held at its number: {items:x?}");
    assert!(
        items.iter().filter(|i| i.0 != fd("waker")).all(|i| i.1 & (1 << 31) != 0 && i.2 > u32::MAX as u64),
        "edge-triggered, a pointer as data: {items:x?}"
    );

    let restored = round_trip(program, pid, dir.path(), true);
    let after = kernel::fd_table(restored.root);
    assert_same_table(&after, &before);

    // The restored pair is connected to itself, not to anything else.
    let (a, b) = (grab(restored.root, fd("a")), grab(restored.root, fd("b")));
    assert!(kernel::are_peers(a.as_fd(), b.as_fd()), "the restored ends are each other's peer");
    // The restored listener listens: a connection is queued on it.
    std::net::TcpStream::connect(("127.0.0.1", fd("port") as u16)).expect("the restored listener accepts");
}

/// Python's asyncio server (an epoll, a listening socket, the self-pipe socketpair),
/// plus an eventfd and a memfd, all close-on-exec as Python opens them: listed the same
/// by both sources, checkpointed while it serves, and restored with the same fd table.
#[test]
fn a_python_asyncio_server_is_listed_checkpointed_and_restored_with_the_same_fd_table() {
    require_root!();
    crd_tests::require_tool!("python3");
    let script = r#"
import asyncio, json, os, socket
os.closerange(3, 4096)  # what the test runner leaked is not ours
async def main():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    ev = os.eventfd(5, os.EFD_SEMAPHORE | os.EFD_CLOEXEC)
    mem = os.memfd_create("pycache")
    os.write(mem, b"m" * 3000)
    loop = asyncio.get_running_loop()
    ssock, csock = loop._ssock.fileno(), loop._csock.fileno()
    port = server.sockets[0].getsockname()[1]
    print(json.dumps(dict(pid=os.getpid(), port=port, ev=ev, mem=mem, ssock=ssock, csock=csock)), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"#;
    let (program, info) = crd_tests::programs::python_json(script, &[]);
    let fd = |name: &str| info[name].as_u64().unwrap_or_else(|| panic!("{name} in {info}")) as u32;
    let (pid, port, ev, mem) = (fd("pid"), fd("port"), fd("ev"), fd("mem"));
    let before = kernel::fd_table(pid);
    // ls: each fd by its own kind, the same from both sources.
    let listing = |source: &str| {
        let out = crd_tests::crd(&["ls", &pid.to_string(), "--json", "--source", source]);
        assert!(out.status.success(), "{}", crd_tests::programs::stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let json = listing("bpf");
    assert_eq!(json, listing("procfs"), "BPF and /proc list the same");
    let fds = json["processes"][0]["fds"].as_array().unwrap().clone();
    let entry = |fd: u32| fds.iter().find(|f| f["fd"] == fd).unwrap_or_else(|| panic!("no fd {fd}")).clone();
    assert_eq!(entry(ev)["kind"], "Eventfd");
    assert_eq!(entry(ev)["detail"], "count=5 semaphore");
    assert_eq!(entry(mem)["kind"], "Memfd");
    assert_eq!(entry(mem)["detail"], "3000 bytes seals=seal", "not created with MFD_ALLOW_SEALING");
    let epolls: Vec<_> = fds.iter().filter(|f| f["name"] == "anon_inode:[eventpoll]").collect();
    assert_eq!(epolls.len(), 1);
    assert_eq!(epolls[0]["kind"], "Epoll");
    // asyncio watches its listener and its self-pipe socket, with garbage in the upper
    // half of the data (Python sets only the fd): the detail shows all 64 bits.
    assert!(epolls[0]["detail"].as_str().is_some_and(|d| d.matches("tfd=").count() >= 2), "{epolls:?}");
    let listener = format!("TCP 127.0.0.1:{port} (LISTEN)");
    assert_eq!(
        fds.iter().filter(|f| f["kind"] == "Inet" && f["name"] == listener.as_str()).count(),
        1,
        "{fds:?}"
    );
    assert_eq!(fds.iter().filter(|f| f["kind"] == "Unix").count(), 2, "the self-pipe pair: {fds:?}");
    // Python opens all of these close-on-exec (what it inherited from the test runner
    // may not be).
    let own = fds
        .iter()
        .filter(|f| ["Unix", "Inet", "Epoll", "Eventfd", "Memfd"].contains(&f["kind"].as_str().unwrap()));
    assert!(own.clone().count() >= 6 && own.clone().all(|f| f["close_on_exec"] == true), "{fds:?}");
    let epfd = epolls[0]["fd"].as_u64().unwrap() as u32;
    let watched: Vec<Option<u32>> = kernel::interest(pid, epfd).iter().map(|i| i.3).collect();
    assert!(watched.contains(&Some(fd("ssock"))), "asyncio watches its self-pipe: {watched:?}");

    // A checkpoint leaves the server serving (the connection it accepts and closes
    // comes and goes: wait until its table is the one read above again).
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("py.crd");
    let done = crd_tests::crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    assert!(done.status.success(), "{}", crd_tests::programs::stderr(&done));
    crd_tests::assert_running_untraced(pid);
    // It accepts and closes: the client reads end of file once the server's socket is
    // closed (`connect` alone returns before the server has even accepted, and a table
    // read then would miss the connection the next checkpoint could catch).
    let mut client =
        std::net::TcpStream::connect(("127.0.0.1", port as u16)).expect("the server still accepts");
    client.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut client, &mut rest).expect("the server closes the connection");
    for _ in 0..500 {
        if kernel::fd_table(pid) == before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_same_table(&kernel::fd_table(pid), &before);

    // Once it is gone (its port free again), the image restores: every fd the same.
    let restored = round_trip(program, pid, dir.path(), crd_tests::harvests_agree_on_every_kind());
    assert_same_table(&kernel::fd_table(restored.root), &before);
    let (s, c) = (grab(restored.root, fd("ssock")), grab(restored.root, fd("csock")));
    assert!(kernel::are_peers(s.as_fd(), c.as_fd()), "the restored self-pipe is connected to itself");
    std::net::TcpStream::connect(("127.0.0.1", port as u16)).expect("the restored listener accepts");
}
