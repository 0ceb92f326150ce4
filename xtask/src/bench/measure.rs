//! Running one measured command: wall time from fork to exit and the peak RSS the
//! kernel accounted to it (wait4's rusage), with its output kept in files so that no
//! pipe to xtask can stall it or be held open by a process it leaves behind (restore's
//! stubs).
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Set by SIGINT/SIGTERM; checked between measurements so the bench stops promptly and
/// its guards kill every workload and stub on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM only raise a flag (no SA_RESTART, so a wait returns EINTR).
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised before use.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// A measured command that failed, with the tail of what it said.
#[derive(Debug)]
pub struct Failed {
    pub command: String,
    pub status: i32,
    pub stderr: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` failed (wait status {:#x}): {}", self.command, self.status, self.stderr)
    }
}

impl std::error::Error for Failed {}

/// What one command did.
#[derive(Debug)]
pub struct Measured {
    pub wall: Duration,
    /// Peak resident set size, bytes.
    pub max_rss: u64,
    pub stdout: String,
    /// `$CRD_TIMINGS_FILE`'s content, if the command wrote one.
    pub timings: BTreeMap<String, f64>,
}

impl Measured {
    pub fn wall_ms(&self) -> f64 {
        self.wall.as_secs_f64() * 1e3
    }
}

/// Where measured commands leave their output.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(dir: PathBuf) -> Result<Scratch> {
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Scratch { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `command` to its end; fails (with the tail of its stderr) unless it exits
    /// with a status in `ok_codes`.
    pub fn run(&self, command: &mut Command, ok_codes: &[i32]) -> Result<Measured> {
        check_interrupted()?;
        let (out_path, err_path, timings_path) =
            (self.path("stdout"), self.path("stderr"), self.path("timings.json"));
        let _ = fs::remove_file(&timings_path);
        command
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).context("scratch stdout")?)
            .stderr(fs::File::create(&err_path).context("scratch stderr")?)
            .env("CRD_TIMINGS_FILE", &timings_path);
        let started = Instant::now();
        let child = command.spawn().with_context(|| format!("cannot run {command:?}"))?;
        let (status, max_rss) = wait4(child.id() as i32)?;
        let wall = started.elapsed();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let code = if libc::WIFEXITED(status) { Some(libc::WEXITSTATUS(status)) } else { None };
        if !code.is_some_and(|c| ok_codes.contains(&c)) {
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let mut shown = command.get_program().to_string_lossy().into_owned();
            for arg in command.get_args().take(4) {
                shown.push(' ');
                shown.push_str(&arg.to_string_lossy());
            }
            return Err(Failed { command: shown, status, stderr: tail.join(" / ") }.into());
        }
        check_interrupted()?;
        let stdout = fs::read_to_string(&out_path).context("reading the command's output")?;
        let timings = match fs::read_to_string(&timings_path) {
            Ok(text) => parse_timings(&text).context("crd's timings file")?,
            Err(_) => BTreeMap::new(),
        };
        Ok(Measured { wall, max_rss, stdout, timings })
    }
}

/// Waits for `pid` and returns its wait status and peak RSS in bytes. On Ctrl-C the
/// child gets SIGTERM (crd then resumes its targets) and is still waited for.
fn wait4(pid: i32) -> Result<(i32, u64)> {
    let mut signalled = false;
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid out-pointers.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if ret == pid {
            // ru_maxrss is in KiB on Linux.
            return Ok((status, usage.ru_maxrss.max(0) as u64 * 1024));
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error).context("wait4");
        }
        if INTERRUPTED.load(Ordering::Relaxed) && !signalled {
            // SAFETY: kill of our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            signalled = true;
        }
    }
}

/// `{"load_ms": 1.5, ...}` → a map; values that are not numbers are skipped (keys may
/// grow, and not every future key need be a time).
pub fn parse_timings(text: &str) -> Result<BTreeMap<String, f64>> {
    let value: serde_json::Value = serde_json::from_str(text.trim())?;
    let object = value.as_object().context("not a JSON object")?;
    Ok(object.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
}

/// `crd bench-harvest`'s one line.
#[derive(Debug, PartialEq)]
pub struct HarvestRuns {
    pub fds: u64,
    pub processes: u64,
    pub load_ms: f64,
    pub runs_ms: Vec<f64>,
    /// The same fds visited with nothing read (BPF only; empty otherwise).
    pub floor_ms: Vec<f64>,
}

pub fn parse_harvest(stdout: &str) -> Result<HarvestRuns> {
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line")?;
    let value: serde_json::Value = serde_json::from_str(line)?;
    let number =
        |key: &str| value.get(key).and_then(serde_json::Value::as_f64).with_context(|| format!("no {key}"));
    let runs_ms: Vec<f64> = value
        .get("runs_ns")
        .and_then(serde_json::Value::as_array)
        .context("no runs_ns")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .map(|ns| ns / 1e6)
        .collect();
    if runs_ms.is_empty() {
        bail!("no runs in {line}");
    }
    let floor_ms: Vec<f64> = value
        .get("floor_ns")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_f64)
        .map(|ns| ns / 1e6)
        .collect();
    Ok(HarvestRuns {
        fds: number("fds")? as u64,
        processes: number("processes")? as u64,
        load_ms: number("load_ns")? / 1e6,
        runs_ms,
        floor_ms,
    })
}

/// The NEW PIDs of `crd restore`'s "OLD -> NEW" lines.
pub fn parse_restored(stdout: &str) -> Vec<i32> {
    stdout.lines().filter_map(|l| l.split_once("->")).filter_map(|(_, new)| new.trim().parse().ok()).collect()
}

/// The file's size, 0 if it is missing.
pub fn size(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harvest_line() {
        let out = "noise\n{\"source\":\"bpf\",\"processes\":2,\"tasks\":3,\"fds\":2000,\
                   \"load_ns\":15000000,\"runs_ns\":[1000000,3000000]}\n";
        assert_eq!(
            parse_harvest(out).unwrap(),
            HarvestRuns { fds: 2000, processes: 2, load_ms: 15.0, runs_ms: vec![1.0, 3.0], floor_ms: vec![] }
        );
        assert!(parse_harvest("{\"fds\":1,\"processes\":1,\"load_ns\":1,\"runs_ns\":[]}").is_err());
        assert!(parse_harvest("nothing").is_err());
    }

    #[test]
    fn timings_keep_numbers_only() {
        let t = parse_timings("{\"load_ms\": 12.5, \"total_ms\": 20, \"note\": \"x\"}\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t["load_ms"], 12.5);
        assert_eq!(t["total_ms"], 20.0);
        assert!(parse_timings("[1]").is_err());
    }

    #[test]
    fn restored_pids() {
        assert_eq!(parse_restored("10 -> 20\n11 -> 21\ngarbage\n"), vec![20, 21]);
    }

    #[test]
    fn measures_a_real_command() {
        let dir = std::env::temp_dir().join(format!("xtask-measure-{}", std::process::id()));
        let scratch = Scratch::new(dir.clone()).unwrap();
        let m = scratch.run(Command::new("sh").args(["-c", "echo hi"]), &[0]).unwrap();
        assert_eq!(m.stdout, "hi\n");
        assert!(m.max_rss > 0);
        let error = scratch.run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"]), &[0]).unwrap_err();
        let failed = error.downcast_ref::<Failed>().unwrap();
        assert_eq!(
            (failed.command.as_str(), failed.stderr.as_str()),
            ("sh -c echo boom >&2; exit 3", "boom")
        );
        assert!(scratch.run(Command::new("sh").args(["-c", "exit 1"]), &[0, 1]).is_ok());
        let _ = fs::remove_dir_all(dir);
    }
}
