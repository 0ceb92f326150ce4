//! `cargo xtask vm-test`: the integration suite on several kernels.
//!
//! One build serves every kernel: crd (with its BPF object) and the test binaries are
//! built once for `x86_64-unknown-linux-musl` — static, so they run unchanged in a
//! busybox guest — and shared with each guest over 9p. The suite also runs directly on
//! the host kernel. The result is a table test × kernel.
//!
//! As for `cargo xtask test`, crd and the suites are testing builds (crd-user's
//! `testing` feature, in `target/testing`), and the product crd is built too, for the
//! test that checks it holds no test scaffolding.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
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

/// Outcome of one test on one kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// Results of the suite on one kernel: test → outcome, plus whole suites that died
/// without finishing.
#[derive(Default)]
struct Results {
    tests: BTreeMap<String, Outcome>,
    broken_suites: Vec<String>,
}

impl Results {
    /// Parses libtest output (`test NAME ... ok|FAILED|ignored`, `test result:`)
    /// between the runner's `CRD-SUITE-START NAME` and `CRD-SUITE-END NAME STATUS`.
    fn parse(log: &str) -> Self {
        let mut results = Results::default();
        let mut suite = String::new();
        let mut finished = false;
        for line in log.lines() {
            let line = line.trim_end_matches('\r');
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
            } else if line.starts_with("test result:") {
                finished = true;
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
    for line in json.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(executable), Some(name)) =
            (message["executable"].as_str(), message["target"]["name"].as_str())
        else {
            continue;
        };
        if message["profile"]["test"].as_bool() == Some(true) {
            let package = message["package_id"].as_str().unwrap_or_default();
            let kind = message["target"]["kind"][0].as_str().unwrap_or_default();
            // crd's library unit tests (BTF offsets of the running kernel among them)
            // and every integration suite; binaries' and xtask's unit tests say nothing
            // about a kernel.
            if kind == "lib" && name == "crd" {
                suites.insert("unit".to_string(), PathBuf::from(executable));
            } else if kind == "test" && (package.contains("crd-tests") || package.contains("/tests#")) {
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
    })
}

/// The shell snippet that runs every suite in a guest, from the 9p share at /mnt.
fn guest_script(build: &Build) -> String {
    let mut script = "export CRD_BIN=/mnt/crd CRD_PRODUCT_BIN=/mnt/crd-product CRD_IN_VM=1 PROPTEST_CASES="
        .to_string()
        + PROPTEST_CASES_IN_VM
        + " RUST_BACKTRACE=0\n";
    // Test hook: extra environment for the guests only, e.g. to make a test fail there
    // and see the command fail with the guest's serial log.
    if let Ok(extra) = std::env::var("CRD_VM_GUEST_ENV") {
        script.push_str(&format!("export {extra}\n"));
    }
    script.push_str("cd /tmp\nstatus=0\n");
    // A smoke test first: the whole pipeline once, by the product, with its output in the log.
    script.push_str(
        "echo CRD-SUITE-START smoke\ntimeout -s KILL 300 /mnt/crd-product demo 2>&1\nrc=$?\n\
         if [ $rc = 0 ]; then echo 'test demo ... ok'; else echo 'test demo ... FAILED'; status=1; fi\n\
         echo 'test result: smoke'\necho CRD-SUITE-END smoke $rc\n",
    );
    for name in build.suites.keys() {
        script.push_str(&format!(
            "echo CRD-SUITE-START {name}\ntimeout -s KILL {SUITE_TIMEOUT_S} /mnt/suite-{name} --test-threads=2 2>&1\n\
             rc=$?\necho CRD-SUITE-END {name} $rc\n[ $rc = 0 ] || status=1\n"
        ));
    }
    script.push_str("exit_status=$status\n");
    script
}

/// Runs the suite directly on the host kernel, with the same binaries.
fn run_on_host(build: &Build) -> Result<Results> {
    let mut log = String::new();
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
    let results = Results::parse(&log);
    if results.failed() {
        eprintln!("--- host run ---\n{log}");
    }
    Ok(results)
}

/// `cargo xtask vm-test [KERNEL...]`: returns whether everything passed.
pub fn vm_test(root: &Path, bpf_object: &Path, kernels: &[String]) -> Result<bool> {
    vm::ensure_host_tools()?;
    let cache = root.join("target/vmtest");
    fs::create_dir_all(&cache)?;
    let specs: Vec<String> = if kernels.is_empty() {
        vec!["bookworm".into(), "bookworm-backports".into()]
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
    let script = guest_script(&build);
    let mut columns: Vec<(String, Results)> = Vec::new();
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    eprintln!("xtask: running the suite on the host kernel {host}");
    columns.push((format!("host {host}"), run_on_host(&build)?));
    for kernel in &kernels {
        eprintln!("xtask: booting {} under qemu", kernel.name);
        let started = std::time::Instant::now();
        let run = vm::boot_and_run(&cache, kernel, &share, &script, GUEST_TIMEOUT)?;
        let results = Results::parse(&run.serial_log);
        eprintln!("xtask: {} done in {:.0?} (exit {})", kernel.name, started.elapsed(), run.exit_code);
        let mut results = results;
        if run.exit_code != 0 && !results.failed() {
            results.broken_suites.push(format!("guest exit {}", run.exit_code));
        }
        if results.failed() {
            eprintln!("--- serial log of {} ---\n{}\n--- end of serial log ---", kernel.name, run.serial_log);
        }
        columns.push((kernel.name.clone(), results));
    }
    print_table(&columns);
    Ok(!columns.iter().any(|(_, r)| r.failed()))
}

fn print_table(columns: &[(String, Results)]) {
    let mut tests: Vec<&String> = columns.iter().flat_map(|(_, r)| r.tests.keys()).collect();
    tests.sort();
    tests.dedup();
    let mut header = String::from("| test |");
    let mut rule = String::from("|---|");
    for (kernel, _) in columns {
        header.push_str(&format!(" {kernel} |"));
        rule.push_str("---|");
    }
    println!("\n{header}\n{rule}");
    for test in tests {
        let mut row = format!("| {test} |");
        for (_, results) in columns {
            row.push_str(match results.tests.get(test) {
                Some(Outcome::Pass) => " pass |",
                Some(Outcome::Fail) => " **FAIL** |",
                Some(Outcome::Skip) => " skip |",
                None => " - |",
            });
        }
        println!("{row}");
    }
    for (kernel, results) in columns {
        for suite in &results.broken_suites {
            println!("\n{kernel}: suite {suite} did not finish");
        }
    }
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
}
