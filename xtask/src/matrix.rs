//! `cargo xtask vm-test`: the integration suite on several kernels.
//!
//! One build serves every kernel: crd (with its BPF object) and the test binaries are
//! built once for `x86_64-unknown-linux-musl` — static, so they run unchanged in a
//! busybox guest — and shared with each guest over 9p. The suite also runs directly on
//! the host kernel. The result is a table test × kernel, with notes under it: where
//! crd fell back to /proc (and why), suites that did not finish, each kernel's time.
//!
//! As for `cargo xtask test`, crd and the suites are testing builds (crd-user's
//! `testing` feature, in `target/testing`), and the product crd is built too, for the
//! test that checks it holds no test scaffolding.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::vm::{self, Kernel};

/// The musl target every binary of the matrix is built for.
const TARGET: &str = "x86_64-unknown-linux-musl";
/// How long one guest may take for the whole suite (TCG is slow).
const GUEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// One suite may take this long in a guest before it is killed (and reported).
const SUITE_TIMEOUT_S: u32 = 900;
/// Property-test cases per kernel: the host run does the full count.
const PROPTEST_CASES_IN_VM: &str = "3";
/// Suites that say nothing about a kernel, run on the host only: `bad_images` decodes
/// made-up images (and has `crd inspect` and `crd restore` refuse them before they touch
/// the kernel). It took 4 to 14 s of each guest's time under TCG.
const HOST_ONLY_SUITES: &[&str] = &["bad_images"];

/// What crd's `--source auto` logs when the BPF harvester cannot run on a kernel
/// (crd-user/src/harvest/bpf.rs), around the reason.
const FALLBACK_WARNING: &str = "the BPF harvester cannot run here (";
const FALLBACK_END: &str = "); reading /proc instead";
/// How crd prints a warning (crd-user/src/main.rs), e.g. that a kernel's BTF lacks a
/// kind's fields and that kind's fds are listed as opaque.
const WARNING: &str = "crd: warn: ";

/// Outcome of one test on one kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// Results of the suite on one kernel: test → outcome, plus whole suites that died
/// without finishing, and what the smoke test's `crd demo` said about the harvester.
#[derive(Default)]
struct Results {
    tests: BTreeMap<String, Outcome>,
    broken_suites: Vec<String>,
    /// The source `crd demo` (`--source auto`) harvested with: `bpf`, or `procfs` where
    /// crd fell back.
    source: Option<String>,
    /// Why crd fell back to /proc, in its own words.
    fallback: Option<String>,
    /// crd's other warnings in the smoke test: what it cannot read on this kernel.
    warnings: Vec<String>,
    /// The fd program the BPF harvester loaded in the smoke test (`crd_task_walk`: the
    /// bpf_loop walk, 6.2+; `crd_task_file` or `crd_task_file_bounded`: one program run
    /// per fd), or `none` where it loaded none.
    fd_program: Option<String>,
    /// How long the kernel's run took (a guest's: boot to power-off).
    elapsed: Duration,
    /// Each failed test's first panic message (libtest's `---- NAME stdout ----`
    /// section), shown under the table: a CI page that keeps only the ends of a long
    /// log still says why.
    why: BTreeMap<String, String>,
}

impl Results {
    /// Parses libtest output (`test NAME ... ok|FAILED|ignored`, `test result:`)
    /// between the runner's `CRD-SUITE-START NAME` and `CRD-SUITE-END NAME STATUS`.
    fn parse(log: &str) -> Self {
        let mut results = Results::default();
        let mut suite = String::new();
        let mut finished = false;
        // The failed test whose `stdout` section is being read, and whether its panic
        // line was seen (the message is the line after it).
        let mut failure: Option<(String, bool)> = None;
        for line in log.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) {
                failure = Some((format!("{suite}::{name}"), false));
                continue;
            }
            if let Some((test, seen_panic)) = &mut failure {
                if *seen_panic {
                    if !line.trim().is_empty() {
                        results.why.entry(test.clone()).or_insert_with(|| line.trim().to_string());
                    }
                    failure = None;
                } else if line.contains("panicked at") {
                    *seen_panic = true;
                }
                continue;
            }
            if let Some(name) = line.strip_prefix("CRD-SUITE-START ") {
                suite = name.trim().to_string();
                finished = false;
            } else if let Some(rest) = line.strip_prefix("CRD-SUITE-END ") {
                let mut words = rest.split_whitespace();
                let (name, status) = (words.next().unwrap_or_default(), words.next().unwrap_or("?"));
                // 101: libtest's "some tests failed", which the table shows per test.
                if status != "0" && status != "101" || !finished {
                    results.broken_suites.push(format!("{name} (exit {status})"));
                }
            } else if let Some(program) = line.strip_prefix("CRD-FD-PROGRAM ") {
                results.fd_program = Some(program.trim().to_string());
            } else if line.starts_with("test result:") {
                finished = true;
            } else if suite == "smoke"
                && let Some((_, rest)) = line.split_once(FALLBACK_WARNING)
            {
                // `... cannot run here (REASON); reading /proc instead`
                let reason = rest.rsplit_once(FALLBACK_END).map_or(rest, |(r, _)| r);
                results.fallback.get_or_insert_with(|| reason.trim().to_string());
            } else if suite == "smoke"
                && let Some((_, warning)) = line.split_once(WARNING)
                && !results.warnings.iter().any(|w| w == warning)
            {
                results.warnings.push(warning.trim().to_string());
            } else if suite == "smoke"
                && line.starts_with("crd image: ")
                && let Some((_, rest)) = line.split_once("; source ")
            {
                results.source = rest.split([',', ' ']).next().map(String::from);
            } else if let Some(rest) = line.strip_prefix("test ") {
                let Some((name, outcome)) = rest.rsplit_once(" ... ") else { continue };
                let outcome = match outcome.trim() {
                    "ok" => Outcome::Pass,
                    "ignored" => Outcome::Skip,
                    _ => Outcome::Fail,
                };
                results.tests.insert(format!("{suite}::{name}"), outcome);
            }
        }
        results
    }

    fn failed(&self) -> bool {
        !self.broken_suites.is_empty() || self.tests.values().any(|o| *o == Outcome::Fail)
    }
}

/// The binaries of one matrix run.
struct Build {
    /// The testing build the suites run.
    crd: PathBuf,
    /// The product build (no `testing` feature).
    product: PathBuf,
    /// Suite name → test binary.
    suites: BTreeMap<String, PathBuf>,
    /// The programs the suites run (tests/src/bin: the tokio event loop), by name: the
    /// guests find them in the share through `$CRD_TEST_PROGRAMS` (cargo's
    /// `CARGO_BIN_EXE_*` paths are the host's).
    programs: BTreeMap<String, PathBuf>,
}

/// Builds crd and every test binary for the musl target.
fn build(root: &Path, bpf_object: &Path) -> Result<Build> {
    let installed = crate::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        crate::run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    let testing_dir = root.join(crate::TESTING_TARGET_DIR);
    let crd = ["build", "--release", "--target", TARGET, "--package", "crd-user", "--bin", "crd"];
    crate::run(crate::cargo().args(crd).env("CRD_BPF_OBJECT", bpf_object))?;
    crate::run(
        crate::cargo()
            .args(crd)
            .args(["--features", "testing", "--target-dir"])
            .arg(&testing_dir)
            .env("CRD_BPF_OBJECT", bpf_object),
    )?;
    let json = crate::output(
        crate::cargo()
            .args([
                "test",
                "--no-run",
                "--release",
                "--target",
                TARGET,
                "--workspace",
                "--message-format=json",
                "--target-dir",
            ])
            .arg(&testing_dir)
            .env("CRD_BPF_OBJECT", bpf_object),
    )?;
    let mut suites = BTreeMap::new();
    let mut programs = BTreeMap::new();
    for line in json.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(executable), Some(name)) =
            (message["executable"].as_str(), message["target"]["name"].as_str())
        else {
            continue;
        };
        let package = message["package_id"].as_str().unwrap_or_default();
        let kind = message["target"]["kind"][0].as_str().unwrap_or_default();
        let of_tests = package.contains("crd-tests") || package.contains("/tests#");
        if message["profile"]["test"].as_bool() == Some(false) && kind == "bin" && of_tests {
            programs.insert(name.to_string(), PathBuf::from(executable));
        }
        if message["profile"]["test"].as_bool() == Some(true) {
            // crd's library unit tests (BTF offsets of the running kernel among them)
            // and every integration suite; binaries' and xtask's unit tests say nothing
            // about a kernel.
            if kind == "lib" && name == "crd" {
                suites.insert("unit".to_string(), PathBuf::from(executable));
            } else if kind == "test" && of_tests {
                suites.insert(name.to_string(), PathBuf::from(executable));
            }
        }
    }
    if suites.is_empty() {
        bail!("cargo built no test binary for {TARGET}");
    }
    Ok(Build {
        crd: testing_dir.join(TARGET).join("release/crd"),
        product: root.join("target").join(TARGET).join("release/crd"),
        suites,
        programs,
    })
}

/// Fixture steps that open one fd of every kind crd reads beyond pipes and files: the
/// smoke test lists them from /proc and by BPF, and crd warns about what this kernel
/// cannot read.
const KIND_PROBE: &str =
    "eventfd:20:1:s memfd:21:crd-probe:16:s epoll:22 timerfd:23 socketpair:24:25 pty:26:27";

/// The smoke test, as a shell snippet for the host's `sh` and the guests' busybox: the
/// product's `crd demo` (the whole pipeline once, with its output in the log), then
/// `crd ls` of one fd of each kind through each source. `crd` is the testing build (for
/// `crd fixture`), `product` the product. Adds to `$status`.
fn smoke_script(crd: &str, product: &str) -> String {
    format!(
        "echo CRD-SUITE-START smoke\nsmoke=0\n\
         timeout -s KILL 300 {product} demo 2>&1\n\
         if [ $? = 0 ]; then echo 'test demo ... ok'; else echo 'test demo ... FAILED'; smoke=101; fi\n\
         rm -f probe.ready\n\
         CRD_FIXTURE_READY=9 {crd} fixture {KIND_PROBE} </dev/null >/dev/null 9>probe.ready &\nprobe=$!\nn=0\n\
         while [ -d /proc/$probe ] && [ ! -s probe.ready ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done\n\
         for source in procfs bpf; do\n\
         timeout -s KILL 120 {product} ls --source $source $probe 2>&1 >/dev/null\n\
         if [ $? = 0 ]; then echo \"test kinds_$source ... ok\"; else echo \"test kinds_$source ... FAILED\"; smoke=101; fi\n\
         done\n\
         fd=$(RUST_LOG=debug timeout -s KILL 120 {product} ls --source bpf $probe 2>&1 >/dev/null \
         | grep -o 'the fd program is crd_task_[a-z_]*' | head -n 1 | cut -d' ' -f5)\n\
         echo \"CRD-FD-PROGRAM ${{fd:-none}}\"\n\
         kill -9 $probe 2>/dev/null\nwait $probe 2>/dev/null\n\
         echo 'test result: smoke'\necho CRD-SUITE-END smoke $smoke\n[ $smoke = 0 ] || status=1\n"
    )
}

/// The shell snippet that runs every suite in a guest, from the 9p share at /mnt.
fn guest_script(root: &Path, build: &Build) -> String {
    let mut script = "export CRD_BIN=/mnt/crd CRD_PRODUCT_BIN=/mnt/crd-product CRD_TEST_PROGRAMS=/mnt/programs CRD_IN_VM=1 PROPTEST_CASES="
        .to_string()
        + PROPTEST_CASES_IN_VM
        + " RUST_BACKTRACE=0\n";
    // Test hook: extra environment for the guests only, e.g. to make a test fail there
    // and see the command fail with the guest's serial log.
    if let Ok(extra) = std::env::var("CRD_VM_GUEST_ENV") {
        script.push_str(&format!("export {extra}\n"));
    }
    // The tests' data, where the test binaries were built to find it.
    let data = root.join("tests/data");
    script.push_str(&format!(
        "mkdir -p '{}'\nln -s /mnt/tests-data '{}'\n",
        root.join("tests").display(),
        data.display()
    ));
    script.push_str("cd /tmp\nstatus=0\n");
    script.push_str(&smoke_script("/mnt/crd", "/mnt/crd-product"));
    for name in build.suites.keys().filter(|n| !HOST_ONLY_SUITES.contains(&n.as_str())) {
        script.push_str(&format!(
            "echo CRD-SUITE-START {name}\ntimeout -s KILL {SUITE_TIMEOUT_S} /mnt/suite-{name} --test-threads=2 2>&1\n\
             rc=$?\necho CRD-SUITE-END {name} $rc\n[ $rc = 0 ] || status=1\n"
        ));
    }
    script.push_str("exit_status=$status\n");
    script
}

/// Runs the smoke test and the suites directly on the host kernel, with the same
/// binaries.
fn run_on_host(build: &Build) -> Result<(Results, String)> {
    eprintln!("xtask: running the suite on the host kernel");
    let started = Instant::now();
    let smoke = smoke_script(&build.crd.display().to_string(), &build.product.display().to_string());
    let out = Command::new("sh")
        .args(["-c", &smoke])
        .current_dir(std::env::temp_dir())
        .output()
        .context("cannot run the smoke test")?;
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    for (name, binary) in &build.suites {
        log.push_str(&format!("CRD-SUITE-START {name}\n"));
        let out = Command::new(binary)
            .arg("--test-threads=2")
            .env("CRD_BIN", &build.crd)
            .env("CRD_PRODUCT_BIN", &build.product)
            .env("RUST_BACKTRACE", "0")
            .output()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        log.push_str(&text);
        log.push_str(&format!("\nCRD-SUITE-END {name} {}\n", out.status.code().unwrap_or(-1)));
    }
    let mut results = Results::parse(&log);
    results.elapsed = started.elapsed();
    eprintln!("xtask: host done in {:.0?}", results.elapsed);
    Ok((results, log))
}

/// `cargo xtask vm-test [KERNEL...]`: returns whether everything passed.
pub fn vm_test(root: &Path, bpf_object: &Path, kernels: &[String]) -> Result<bool> {
    vm::ensure_host_tools()?;
    // The host run has the tools the suites use where they exist (guests skip the two
    // tests that need them).
    crate::ensure_apt_packages(&[("bpftool", "bpftool")])?;
    let cache = root.join("target/vmtest");
    fs::create_dir_all(&cache)?;
    let specs: Vec<String> = if kernels.is_empty() {
        vm::DEFAULT_KERNELS.iter().map(|k| k.to_string()).collect()
    } else {
        kernels.to_vec()
    };
    let kernels: Vec<Kernel> = vm::resolve_kernels(&cache, &specs)?;
    let build = build(root, bpf_object)?;
    let share = cache.join("share");
    let _ = fs::remove_dir_all(&share);
    fs::create_dir_all(&share)?;
    fs::copy(&build.crd, share.join("crd")).with_context(|| format!("copy {}", build.crd.display()))?;
    fs::copy(&build.product, share.join("crd-product"))
        .with_context(|| format!("copy {}", build.product.display()))?;
    for (name, binary) in &build.suites {
        fs::copy(binary, share.join(format!("suite-{name}")))
            .with_context(|| format!("copy {}", binary.display()))?;
    }
    copy_dir(&root.join("tests/data"), &share.join("tests-data"))?;
    fs::create_dir_all(share.join("programs"))?;
    for (name, program) in &build.programs {
        fs::copy(program, share.join("programs").join(name))
            .with_context(|| format!("copy {}", program.display()))?;
    }
    let script = guest_script(root, &build);
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let mut columns: Vec<(String, Results)> = Vec::new();
    let mut failed_logs = Vec::new();
    // One at a time: a guest under TCG keeps both of a 2-core machine's cores busy
    // (two guests side by side took as long in all as one after the other).
    let (results, log) = run_on_host(&build)?;
    if results.failed() {
        failed_logs.push((0, log));
    }
    columns.push((format!("host ({host})"), results));
    for kernel in &kernels {
        let (results, log) = run_guest(&cache, kernel, &share, &script)?;
        if results.failed() {
            failed_logs.push((columns.len(), log));
        }
        columns.push((format!("{} ({})", kernel.label, kernel.name), results));
    }
    // The logs of failed runs first, the table last, where it is seen.
    for (column, log) in failed_logs {
        eprintln!("--- log of {} ---\n{log}\n--- end of log ---", columns[column].0);
    }
    println!("{}", render_table(&columns));
    Ok(!columns.iter().any(|(_, r)| r.failed()))
}

/// Copies the files of `from` (one level) into a new `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let path = entry?.path();
        if path.is_file() {
            fs::copy(&path, to.join(path.file_name().unwrap_or_default()))
                .with_context(|| format!("copy {}", path.display()))?;
        }
    }
    Ok(())
}

/// Boots `kernel` and runs the suite in it: the results and the serial log.
fn run_guest(cache: &Path, kernel: &Kernel, share: &Path, script: &str) -> Result<(Results, String)> {
    eprintln!("xtask: booting {} ({}) under qemu", kernel.label, kernel.name);
    let started = Instant::now();
    let run = vm::boot_and_run(cache, kernel, share, script, GUEST_TIMEOUT)?;
    let mut results = Results::parse(&run.serial_log);
    results.elapsed = started.elapsed();
    eprintln!("xtask: {} done in {:.0?} (exit {})", kernel.label, results.elapsed, run.exit_code);
    if run.exit_code != 0 && !results.failed() {
        results.broken_suites.push(format!("guest exit {}", run.exit_code));
    }
    Ok((results, run.serial_log))
}

/// The table test × kernel, then notes: where crd could not use BPF (and why), suites
/// that did not finish, and each kernel's time.
fn render_table(columns: &[(String, Results)]) -> String {
    let mut tests: Vec<&String> = columns.iter().flat_map(|(_, r)| r.tests.keys()).collect();
    tests.sort();
    tests.dedup();
    let mut out = String::from("\n| test |");
    for (kernel, _) in columns {
        out.push_str(&format!(" {kernel} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    // Which fd program harvested: the bpf_loop walk or one program run per fd.
    out.push_str("\n| fd program (smoke) |");
    for (_, results) in columns {
        out.push_str(&format!(" {} |", results.fd_program.as_deref().unwrap_or("?")));
    }
    for test in tests {
        out.push_str(&format!("\n| {test} |"));
        for (_, results) in columns {
            out.push_str(match results.tests.get(test) {
                Some(Outcome::Pass) => " pass |",
                Some(Outcome::Fail) => " **FAIL** |",
                Some(Outcome::Skip) => " skip |",
                None => " - |",
            });
        }
    }
    out.push('\n');
    for (kernel, results) in columns {
        // The smoke test harvests with `--source auto`: it says what the kernel can do.
        match (&results.fallback, results.source.as_deref()) {
            (Some(reason), _) => {
                out.push_str(&format!("\n{kernel}: crd cannot use BPF here and fell back to /proc: {reason}"))
            }
            (None, Some(source)) if source != "bpf" => {
                out.push_str(&format!("\n{kernel}: crd demo harvested from {source}, not bpf"))
            }
            (None, None) => {
                out.push_str(&format!("\n{kernel}: unknown harvester source (crd demo wrote no image)"))
            }
            _ => {}
        }
        for warning in &results.warnings {
            out.push_str(&format!("\n{kernel}: crd warned: {warning}"));
        }
        for suite in &results.broken_suites {
            out.push_str(&format!("\n{kernel}: suite {suite} did not finish"));
        }
        for (test, outcome) in &results.tests {
            if *outcome == Outcome::Fail {
                let why = results.why.get(test).map_or("(no panic message in the log)", String::as_str);
                out.push_str(&format!("\n{kernel}: {test} FAILED: {why}"));
            }
        }
    }
    let times: Vec<String> =
        columns.iter().map(|(kernel, r)| format!("{kernel} {:.0} s", r.elapsed.as_secs_f64())).collect();
    out.push_str(&format!("\ntime: {}\n", times.join(", ")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_output_becomes_outcomes() {
        let log = "CRD-SUITE-START restore\nrunning 2 tests\ntest a ... ok\ntest b ... FAILED\r\n\
                   test result: FAILED. 1 passed; 1 failed\nCRD-SUITE-END restore 101\n\
                   CRD-SUITE-START cli\ntest c ... ignored\nCRD-SUITE-END cli 139\n";
        let r = Results::parse(log);
        assert!(r.tests[&"restore::a".to_string()] == Outcome::Pass);
        assert!(r.tests[&"restore::b".to_string()] == Outcome::Fail);
        assert!(r.tests[&"cli::c".to_string()] == Outcome::Skip);
        assert_eq!(r.broken_suites, ["cli (exit 139)"]);
        assert!(r.failed());
    }

    #[test]
    fn a_failed_test_is_shown_under_the_table_with_its_first_panic_message() {
        let log = "CRD-SUITE-START terminals\nrunning 2 tests\ntest a ... ok\ntest b ... FAILED\n\n\
                   failures:\n\n---- b stdout ----\n\nthread 'b' (12) panicked at tests/src/lib.rs:265:9:\n\
                   the restored tree differs: task #1\nnote: run with `RUST_BACKTRACE=1`\n\n\
                   thread 'b' (12) panicked at tests/src/lib.rs:265:9:\na later case's message\n\n\
                   failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\nCRD-SUITE-END terminals 101\n";
        let r = Results::parse(log);
        assert!(r.tests[&"terminals::b".to_string()] == Outcome::Fail);
        let table = render_table(&[("6.1 (6.1.0)".into(), r)]);
        assert!(
            table.contains("\n6.1 (6.1.0): terminals::b FAILED: the restored tree differs: task #1\n"),
            "{table}"
        );
        assert!(!table.contains("later case"), "{table}");
        assert!(!table.contains("terminals::a FAILED"), "{table}");
    }

    #[test]
    fn a_fallback_to_proc_in_the_smoke_test_becomes_a_note() {
        let log = "CRD-SUITE-START smoke\n\
                   [2026-01-01T00:00:00Z WARN  crd::harvest::bpf] the BPF harvester cannot run here \
                   (cannot load crd's BPF programs: the BPF verifier rejected (x)); reading /proc instead\n\
                   crd image: root PID 97 with descendants, 2 tasks; source procfs, kernel 5.10.0-46-amd64\n\
                   test demo ... ok\ntest result: smoke\nCRD-SUITE-END smoke 0\n\
                   CRD-SUITE-START cli\ntest c ... ok\ntest result: ok\n\
                   the BPF harvester cannot run here (a test's own output); reading /proc instead\n\
                   CRD-SUITE-END cli 0\n";
        let r = Results::parse(log);
        assert_eq!(r.source.as_deref(), Some("procfs"));
        assert_eq!(
            r.fallback.as_deref(),
            Some("cannot load crd's BPF programs: the BPF verifier rejected (x)")
        );
        assert!(!r.failed(), "a fallback alone is no failure: the tests that need BPF say so");
        let table = render_table(&[("5.10 (5.10.0-46-amd64)".into(), r)]);
        assert!(table.contains(
            "\n5.10 (5.10.0-46-amd64): crd cannot use BPF here and fell back to /proc: cannot load crd's BPF \
             programs: the BPF verifier rejected (x)\n"
        ), "{table}");
        assert!(table.contains("| cli::c | pass |"), "{table}");

        // A kind this kernel's BTF cannot type: BPF runs, that kind is opaque.
        let log = "CRD-SUITE-START smoke\n\
                   crd: warn: this kernel's BTF lacks eventfd_ctx.count: eventfds are listed as opaque anon files\n\
                   crd image: root PID 9; source bpf, kernel 5.10\n";
        let table = render_table(&[("5.10".into(), Results::parse(log))]);
        assert!(table.contains(
            "\n5.10: crd warned: this kernel's BTF lacks eventfd_ctx.count: eventfds are listed as opaque anon files\n"
        ), "{table}");
        assert!(!table.contains("/proc"), "{table}");

        let bpf = Results::parse(
            "CRD-SUITE-START smoke\nCRD-FD-PROGRAM crd_task_file\ncrd image: root PID 9; source bpf, kernel 6.1\n",
        );
        assert!(render_table(&[("6.1".into(), Results::parse(""))]).contains("\n| fd program (smoke) | ? |"));
        assert!(
            render_table(&[("6.1".into(), Results::parse("CRD-FD-PROGRAM crd_task_file\n"))])
                .contains("| fd program (smoke) | crd_task_file |")
        );
        assert_eq!((bpf.source.as_deref(), bpf.fallback.as_deref()), (Some("bpf"), None));
        assert!(!render_table(&[("6.1".into(), bpf)]).contains("6.1:"));
    }
}
