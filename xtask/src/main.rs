//! `cargo xtask`: crd's build driver.
//!
//! - `setup`: install what a fresh machine lacks (rust-src for the nightly, bpf-linker
//!   built against the nightly's own LLVM, bpftool for the tests).
//! - `build`: setup, then the BPF object (nightly, bpfel-unknown-none) and `crd`.
//! - `run -- ARGS`: build, then run `crd ARGS`.
//! - `test`: build, then the whole test suite (unit and integration; needs root).
//! - `bench`: build (release), then measure crd on real workloads (docs/benchmarks.md).
//! - `fuzz`: run the decoders' fuzz targets (fuzz/, cargo-fuzz) for a given time each.
//!
//! Two flavours of crd ([`Flavor`]): `build` and `run` make the product, without test
//! scaffolding; `test`, `vm-test` and `bench` make a *testing* build (crd-user's
//! `testing` feature: hidden test commands, test hooks) into its own target directory,
//! `target/testing`, so neither overwrites the other's `crd`.
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod matrix;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces crd needs.
    Setup,
    /// Build the BPF object and crd.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run crd with the given arguments.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Measure crd (harvest, checkpoint, restore) against /proc and lsof on real
    /// workloads; write docs/benchmarks.md and docs/benchmarks.svg (needs root).
    Bench {
        /// Fewer repetitions, for a quick look (the page says how many were made).
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the image and record decoders (cargo-fuzz, nightly) for SECONDS each.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Targets [default: all: image_decode record_decode].
        targets: Vec<String>,
    },
    /// Run the integration suite on several kernels in qemu, and on the host kernel.
    VmTest {
        /// Kernels: 5.10 (bullseye), 6.1 (bookworm), 6.12 (bookworm-backports) or
        /// linux-image-* package names [default: 5.10 6.1 6.12].
        kernels: Vec<String>,
    },
    /// Build, then run every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> std::process::ExitCode {
    match run_task(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup(),
        Task::Build { release } => build(release, Flavor::Product).map(|_| ()),
        Task::Run { release, args } => {
            let crd = build(release, Flavor::Product)?;
            // crd's own exit code is the answer: pass it on, no wrapper error.
            let status = Command::new(&crd)
                .args(args)
                .status()
                .with_context(|| format!("cannot run {}", crd.display()))?;
            std::process::exit(status.code().unwrap_or(1))
        }
        Task::Bench { quick } => {
            bench::preflight()?;
            // `crd bench-harvest` and $CRD_TIMINGS_FILE exist only in testing builds.
            let crd = build(true, Flavor::Testing)?;
            ensure_apt_packages(&[("lsof", "lsof")])?;
            bench::run(&crd, &root(), bench::Repetitions::new(quick))
        }
        Task::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
        Task::VmTest { kernels } => {
            let object = bpf_object()?;
            if !matrix::vm_test(&root(), &object, &kernels)? {
                bail!("some tests failed (table above)");
            }
            Ok(())
        }
        Task::Test { args } => {
            // The product too: a test checks that it holds no test scaffolding.
            let product = build(false, Flavor::Product)?;
            let crd = build(false, Flavor::Testing)?;
            // python3: a test runs a real asyncio server (tests/tests/event_loops.rs);
            // nginx and redis are the real servers of tests/tests/real_servers.rs; lsof
            // and ss check sockets against the kernel's own views
            // (tests/tests/sockets_bpf.rs).
            ensure_apt_packages(&[
                ("bpftool", "bpftool"),
                ("python3", "python3"),
                ("lsof", "lsof"),
                ("ss", "iproute2"),
                ("nginx", "nginx"),
                ("redis-server", "redis-server"),
            ])?;
            // The tests crate turns on crd-user's `testing` feature for the whole
            // workspace build: it goes to the testing target directory, with the same
            // environment as the build above (so build.rs does not rerun).
            run(cargo()
                .args(["test", "--workspace", "--target-dir"])
                .arg(root().join(TESTING_TARGET_DIR))
                .args(args)
                .env("CRD_BPF_OBJECT", root().join(BPF_OBJECT))
                .env("CRD_BIN", &crd)
                .env("CRD_PRODUCT_BIN", &product))
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// A command with the environment an outer `cargo run` leaves behind removed, so the
/// inner cargo picks its own toolchain.
fn clean(mut command: Command) -> Command {
    for var in
        ["RUSTC", "RUSTC_WRAPPER", "RUSTDOC", "CARGO", "RUSTUP_TOOLCHAIN", "CARGO_MANIFEST_DIR", "RUSTFLAGS"]
    {
        command.env_remove(var);
    }
    command
}

pub(crate) fn cargo() -> Command {
    let mut c = clean(Command::new("cargo"));
    c.current_dir(root());
    c
}

fn nightly(program: &str) -> Command {
    let mut c = clean(Command::new("rustup"));
    c.args(["run", "nightly", program]).current_dir(root());
    c
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn output(command: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output_bytes(command)?).into_owned())
}

pub(crate) fn output_bytes(command: &mut Command) -> Result<Vec<u8>> {
    let out = command.output().with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

fn works(command: &mut Command) -> bool {
    command.output().is_ok_and(|o| o.status.success())
}

fn setup() -> Result<()> {
    if !works(nightly("rustc").arg("-vV")) {
        eprintln!("xtask: installing the nightly toolchain");
        run(clean(Command::new("rustup")).args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let sysroot = PathBuf::from(output(nightly("rustc").args(["--print", "sysroot"]))?.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        run(clean(Command::new("rustup")).args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !works(Command::new("bpf-linker").arg("--version")) {
        install_bpf_linker(&sysroot)?;
    }
    Ok(())
}

/// Builds bpf-linker against the nightly's own libLLVM, so the two always agree on the
/// LLVM version (bpf-linker reads the bitcode rustc emits).
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let version = output(nightly("rustc").arg("-vV"))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not say its LLVM version")?
        .trim()
        .to_string();
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let lib_dir = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("libLLVM.so.") && fs::metadata(p).is_ok_and(|m| m.len() > 1 << 20)
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let name = libllvm.file_name().context("libLLVM has a name")?.to_owned();
    // Keep the prefix somewhere lasting: bpf-linker's rpath points into it.
    let home = env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    let prefix = home.join(".cache/crd").join(format!("llvm-{llvm}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in [OsString::from("libLLVM.so"), name] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(&libllvm, &path)
            .with_context(|| format!("cannot link {}", path.display()))?;
    }
    eprintln!("xtask: building bpf-linker against LLVM {llvm} (a few minutes, once)");
    run(clean(Command::new("cargo"))
        .args(["install", "bpf-linker", "--version", "^0.13", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))
}

/// Installs the Debian packages of the (command, package) pairs whose command is
/// missing; `apt-get update` first, once.
pub(crate) fn ensure_apt_packages(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !works(Command::new("which").arg(tool)))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    // RUNLEVEL=1: a server package (nginx, redis-server) is installed for the tests to
    // run their own instances, not started as the machine's service (invoke-rc.d
    // starts nothing in runlevel 1).
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("RUNLEVEL", "1"))
}

/// Where the BPF object is built, relative to the workspace.
const BPF_OBJECT: &str = "target/ebpf/bpfel-unknown-none/release/crd";
/// The target directory of testing builds, relative to the workspace.
pub(crate) const TESTING_TARGET_DIR: &str = "target/testing";

/// Which crd to build.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// What users run: no test commands, no test hooks. In `target/`.
    Product,
    /// With crd-user's `testing` feature, for the tests and the bench. In
    /// [`TESTING_TARGET_DIR`]: cargo would otherwise put both at `target/debug/crd`, and
    /// each build would overwrite the other's binary.
    Testing,
}

/// Sets up the toolchain and builds the BPF object; returns its path.
fn bpf_object() -> Result<PathBuf> {
    setup()?;
    let root = root();
    run(nightly("cargo")
        .args(["build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(root.join("crd-ebpf/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf"))?;
    Ok(root.join(BPF_OBJECT))
}

/// Builds the BPF object and crd; returns the path of the crd binary.
fn build(release: bool, flavor: Flavor) -> Result<PathBuf> {
    let object = bpf_object()?;
    let target_dir = match flavor {
        Flavor::Product => root().join("target"),
        Flavor::Testing => root().join(TESTING_TARGET_DIR),
    };
    let mut build = cargo();
    build
        .args(["build", "--package", "crd-user", "--bin", "crd", "--target-dir"])
        .arg(&target_dir)
        .env("CRD_BPF_OBJECT", &object);
    if flavor == Flavor::Testing {
        build.args(["--features", "testing"]);
    }
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    Ok(target_dir.join(if release { "release" } else { "debug" }).join("crd"))
}
