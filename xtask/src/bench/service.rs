//! The service's latencies: a request's time from its line sent to its reply read,
//! through `crd serve` (BPF programs loaded once, at its start), against the same
//! command run by crd alone (fork to exit, BPF load included).
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    measure::{Scratch, check_interrupted},
    report::ServiceRow,
    workload::{Wiring, Workload},
};

/// `crd serve` on a socket in the scratch directory, stopped (SIGTERM) when dropped.
struct Service {
    child: Child,
    replies: BufReader<UnixStream>,
    requests: UnixStream,
}

impl Service {
    fn start(crd: &Path, scratch: &Scratch) -> Result<Service> {
        let socket = scratch.path("crd.sock");
        let child = Command::new(crd)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start crd serve")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e).context("crd serve does not listen"),
            }
        };
        let replies = BufReader::new(stream.try_clone()?);
        Ok(Service { child, replies, requests: stream })
    }

    /// Sends one request and waits for its final reply; returns the milliseconds between.
    fn time(&mut self, request: &str) -> Result<f64> {
        check_interrupted()?;
        let started = Instant::now();
        self.requests.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.replies.read_line(&mut line)? == 0 {
                bail!("crd serve closed the connection");
            }
            let reply: serde_json::Value = serde_json::from_str(&line).context("a reply line")?;
            match reply.get("exit").and_then(serde_json::Value::as_u64) {
                None => continue,
                Some(0) => return Ok(started.elapsed().as_secs_f64() * 1e3),
                Some(code) => bail!("crd serve: {request}: exit {code}: {}", reply["error"]),
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of the service this bench started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The two requests the issue sets targets for, each `repetitions` times through the
/// service and by crd alone.
pub fn measure(crd: &Path, scratch: &Scratch, repetitions: usize) -> Result<Vec<ServiceRow>> {
    let mut service = Service::start(crd, scratch)?;
    let mut rows = Vec::new();

    let workload = Workload::spawn(1, Wiring::Private { pipes: 9_000 })?;
    let image = scratch.path("service.img");
    let request = format!(
        r#"{{"request": "checkpoint", "pid": {}, "tree": true, "output": "{}"}}"#,
        workload.root(),
        image.display()
    );
    let alone = || {
        let mut command = Command::new(crd);
        command.arg("checkpoint").arg(workload.root().to_string()).arg("--tree").arg("-o").arg(&image);
        command
    };
    rows.push(row(
        &mut service,
        scratch,
        "checkpoint of 1 process × 9,000 pipes",
        18_000,
        &request,
        alone,
        repetitions,
    )?);
    drop(workload);

    let workload = Workload::spawn(100, Wiring::Private { pipes: 500 })?;
    let request = r#"{"request": "ls", "all": true}"#;
    let alone = || {
        let mut command = Command::new(crd);
        command.args(["ls", "--all"]);
        command
    };
    rows.push(row(&mut service, scratch, "ls --all, 100 × 500 pipes", 100_000, request, alone, repetitions)?);
    drop(workload);
    Ok(rows)
}

fn row(
    service: &mut Service,
    scratch: &Scratch,
    name: &str,
    fds: u64,
    request: &str,
    alone: impl Fn() -> Command,
    repetitions: usize,
) -> Result<ServiceRow> {
    eprintln!("bench: service: {name}");
    // The first request warms the service's buffers, as a resident service's would be.
    service.time(request)?;
    let mut row = ServiceRow { name: name.into(), fds, ..ServiceRow::default() };
    for _ in 0..repetitions {
        row.served_ms.push(service.time(request)?);
        row.alone_ms.push(scratch.run(&mut alone(), &[0])?.wall_ms());
    }
    Ok(row)
}
