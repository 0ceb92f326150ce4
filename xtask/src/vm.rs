//! Booting Debian kernels under qemu to run crd's tests in them.
//!
//! - Kernels come from Debian's archive by package name, resolved at run time (ABI
//!   versions come and go): a release's `linux-image-amd64` (5.10: bullseye and
//!   bullseye-security; 6.1: bookworm and bookworm-security; 6.12: bookworm-backports),
//!   each through a *private* apt configuration (its own sources file and lists
//!   directory under the cache) on the machine's own mirrors, so the machine's apt
//!   sources never change.
//! - The guest boots the uncompressed `vmlinux` (through its PVH entry), which halves
//!   boot time under TCG, with a newc initramfs written here: static busybox, the 9p
//!   modules the kernel needs, and an `/init` that mounts proc, sys, devtmpfs, bpffs,
//!   debugfs, a tmpfs, devpts (for ptys) and the host's share, runs the caller's
//!   script, prints its status and powers off.
//! - KVM is used only where the host offers it; these machines are themselves VMs with
//!   nested PVM, where stock kernels crawl or abort under KVM, so they use TCG.
use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A kernel of the matrix, downloaded and unpacked.
pub struct Kernel {
    /// The name it was asked for by: `5.10`, `6.1`, `6.12`, or a package name.
    pub label: String,
    /// The package's kernel release, e.g. `6.1.0-56-amd64`.
    pub name: String,
    /// The uncompressed kernel image.
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
}

/// What a guest run left.
pub struct GuestRun {
    /// The status the guest script reported (`CRD-VM-EXIT=n`), or -1 if it never did.
    pub exit_code: i32,
    pub serial_log: String,
}

/// Tools the VM tests need from Debian: (command, package).
const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
];

/// The 9p stack, in load order; a module a kernel has built in is simply not found.
const NINEP_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
];

/// sock_diag's families, which a real system loads on the first dump that asks for them
/// (`request_module`); the guest has no modprobe to do that, and without them the /proc
/// harvester cannot see a unix socket's peer or a TCP socket's addresses.
const SOCK_DIAG_MODULES: &[&str] = &["unix_diag", "inet_diag", "tcp_diag", "udp_diag"];

pub fn ensure_host_tools() -> Result<()> {
    crate::ensure_apt_packages(HOST_TOOLS)?;
    if !Path::new("/bin/busybox").exists() {
        bail!("busybox-static is installed but /bin/busybox is missing");
    }
    Ok(())
}

/// The kernels the matrix knows by name: each is a Debian release's `linux-image-amd64`,
/// resolved at run time (ABI versions come and go) from that release's suites only.
struct Release {
    /// The name on the command line and in the table.
    label: &'static str,
    /// Other names accepted on the command line.
    aliases: &'static [&'static str],
    /// Suites on the machine's Debian mirror.
    suites: &'static [&'static str],
    /// Suites on its security mirror: where an LTS release's kernel updates land.
    security: &'static [&'static str],
}

const RELEASES: &[Release] = &[
    // bullseye (LTS): its last point release has 5.10.223; later 5.10s are in
    // bullseye-security only.
    Release {
        label: "5.10",
        aliases: &["bullseye"],
        suites: &["bullseye"],
        security: &["bullseye-security"],
    },
    Release {
        label: "6.1",
        aliases: &["stable", "bookworm"],
        suites: &["bookworm"],
        security: &["bookworm-security"],
    },
    Release {
        label: "6.12",
        aliases: &["backports", "bookworm-backports"],
        suites: &["bookworm-backports"],
        security: &[],
    },
];

/// The kernels of `cargo xtask vm-test` without arguments, oldest first.
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12"];

/// apt options for a private configuration reaching `release`'s suites only: its own
/// sources file and lists directory under the cache, so the machine's apt sources never
/// change.
fn private_apt(cache: &Path, release: &Release) -> Result<Vec<String>> {
    let dir = cache.join("apt").join(release.label);
    fs::create_dir_all(dir.join("lists/partial"))?;
    // apt reads deb822 only from files named *.sources.
    let sources = dir.join("private.sources");
    let mirrors = mirrors().context("cannot find the machine's Debian mirror in /etc/apt")?;
    let mut text = String::new();
    for (uri, suites) in [(&mirrors.main, release.suites), (&mirrors.security, release.security)] {
        if suites.is_empty() {
            continue;
        }
        text.push_str(&format!(
            "Types: deb\nURIs: {uri}\nSuites: {}\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n",
            suites.join(" ")
        ));
    }
    fs::write(&sources, text)?;
    Ok(vec![
        "-o".into(),
        format!("Dir::Etc::sourcelist={}", sources.display()),
        "-o".into(),
        "Dir::Etc::sourceparts=-".into(),
        "-o".into(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        "-o".into(),
        "APT::Get::List-Cleanup=0".into(),
    ])
}

/// The machine's Debian mirrors.
#[derive(Debug, PartialEq)]
struct Mirrors {
    main: String,
    security: String,
}

/// The machine's own Debian mirrors, whatever they are: read, never written.
fn mirrors() -> Option<Mirrors> {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let one_line = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    parse_mirrors(&deb822, &one_line)
}

/// The main mirror is the first source of a suite other than `*-security`; the security
/// mirror the first of a `*-security` suite, else the main one's `-security` sibling
/// (the archive's own layout).
fn parse_mirrors(deb822: &str, one_line: &str) -> Option<Mirrors> {
    // (uri, suites) of every source, deb822 stanzas first.
    let mut sources: Vec<(String, String)> = Vec::new();
    for stanza in deb822.split("\n\n") {
        let field = |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(str::trim));
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:"))
            && let Some(uri) = uris.split_whitespace().next()
        {
            sources.push((uri.to_string(), suites.to_string()));
        }
    }
    for line in one_line.lines() {
        let Some(rest) = line.trim().strip_prefix("deb ") else { continue };
        // `deb [options] uri suite components`
        let rest = match rest.trim_start().strip_prefix('[') {
            Some(options) => options.split_once(']').map(|(_, r)| r).unwrap_or_default(),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            sources.push((uri.to_string(), suite.to_string()));
        }
    }
    let is_security = |suites: &str| suites.split_whitespace().any(|s| s.ends_with("-security"));
    let main = sources.iter().find(|(_, s)| !is_security(s))?.0.trim_end_matches('/').to_string();
    let security = sources
        .iter()
        .find(|(_, s)| is_security(s))
        .map(|(u, _)| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("{main}-security"));
    Some(Mirrors { main, security })
}

/// Resolves `specs` (5.10, 6.1, 6.12 or an alias of one; or a `linux-image-*` package
/// name, looked up in the machine's own apt sources) to unpacked kernels under `cache`,
/// downloading only what is not cached.
pub fn resolve_kernels(cache: &Path, specs: &[String]) -> Result<Vec<Kernel>> {
    let mut kernels = Vec::new();
    for spec in specs {
        let release = RELEASES.iter().find(|r| r.label == spec || r.aliases.contains(&spec.as_str()));
        let (label, package) = match release {
            Some(r) => (r.label.to_string(), "linux-image-amd64".to_string()),
            None if spec.starts_with("linux-image-") => (spec.clone(), spec.clone()),
            None => {
                let known: Vec<&str> = RELEASES.iter().map(|r| r.label).collect();
                bail!("unknown kernel {spec:?}: use {} or a linux-image-* package", known.join(", "))
            }
        };
        let resolved_file = cache.join(format!("kernels/{label}.package"));
        let cached = fs::read_to_string(&resolved_file).ok().map(|s| s.trim().to_string());
        let package = match cached {
            Some(p) if cache.join("kernels").join(&p).join("vmlinux").exists() => p,
            _ => {
                let opts = match release {
                    Some(release) => {
                        let opts = private_apt(cache, release)?;
                        crate::run(Command::new("apt-get").arg("update").arg("-qq").args(&opts))?;
                        opts
                    }
                    None => Vec::new(),
                };
                let concrete = if package == "linux-image-amd64" {
                    // The candidate's: the newest version in any of the release's suites.
                    let deps =
                        crate::output(Command::new("apt-cache").args(&opts).args(["depends", &package]))?;
                    deps.lines()
                        .find_map(|l| {
                            l.trim().strip_prefix("Depends: ").filter(|d| d.starts_with("linux-image-"))
                        })
                        .map(|d| d.trim().to_string())
                        .with_context(|| format!("apt-cache depends {package} names no kernel"))?
                } else {
                    package
                };
                unpack(cache, &concrete, &opts)?;
                fs::create_dir_all(cache.join("kernels"))?;
                fs::write(&resolved_file, &concrete)?;
                concrete
            }
        };
        let dir = cache.join("kernels").join(&package);
        let name = package.trim_start_matches("linux-image-").to_string();
        kernels.push(Kernel {
            label,
            modules: dir.join("root/lib/modules").join(&name),
            vmlinux: dir.join("vmlinux"),
            name,
        });
    }
    Ok(kernels)
}

/// Downloads and unpacks a kernel package and extracts its vmlinux.
fn unpack(cache: &Path, package: &str, apt_opts: &[String]) -> Result<()> {
    let downloads = cache.join("downloads");
    fs::create_dir_all(&downloads)?;
    let find = || -> Option<PathBuf> {
        fs::read_dir(&downloads).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
    };
    if find().is_none() {
        eprintln!("xtask: downloading {package}");
        crate::run(
            Command::new("apt-get")
                .args(apt_opts)
                // The cache is root's: apt's `_apt` user could not write there.
                .args(["-o", "APT::Sandbox::User=root", "download", "-qq", package])
                .current_dir(&downloads),
        )?;
    }
    let deb = find().with_context(|| format!("apt-get download {package} left no .deb"))?;
    let dir = cache.join("kernels").join(package);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.join("root")))?;
    let release = package.trim_start_matches("linux-image-");
    let vmlinuz = dir.join("root/boot").join(format!("vmlinuz-{release}"));
    let image = fs::read(&vmlinuz).with_context(|| format!("read {}", vmlinuz.display()))?;
    let vmlinux =
        extract_vmlinux(&image).with_context(|| format!("no vmlinux inside {}", vmlinuz.display()))?;
    fs::write(dir.join("vmlinux"), vmlinux)?;
    Ok(())
}

/// Finds the compressed kernel inside a bzImage and decompresses it, as the kernel's
/// scripts/extract-vmlinux does: try each compression magic at each place it occurs,
/// keep the first output that is an ELF file.
fn extract_vmlinux(image: &[u8]) -> Option<Vec<u8>> {
    let formats: [(&[u8], &[&str]); 3] = [
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], &["xz", "-dcq"]),
        (&[0x28, 0xb5, 0x2f, 0xfd], &["zstd", "-dcq"]),
        (&[0x1f, 0x8b, 0x08], &["gzip", "-dcq"]),
    ];
    for (magic, command) in formats {
        let offsets =
            image.windows(magic.len()).enumerate().filter(|(_, w)| *w == magic).map(|(i, _)| i).take(8);
        for offset in offsets {
            let Ok(mut child) = Command::new(command[0])
                .args(&command[1..])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            else {
                continue;
            };
            let payload = image[offset..].to_vec();
            let mut stdin = child.stdin.take()?;
            let feeder = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let mut out = Vec::new();
            let _ = child.stdout.take()?.read_to_end(&mut out);
            let _ = child.wait();
            let _ = feeder.join();
            // Trailing bytes after the payload make the tools complain: the ELF
            // header decides.
            if out.starts_with(b"\x7fELF") {
                return Some(out);
            }
        }
    }
    None
}

/// A newc ("070701") cpio archive, written in memory.
struct Cpio {
    data: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn new() -> Self {
        Self { data: Vec::new(), inode: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), content: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            content.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.inode += 1;
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, content: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), content);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// Finds a module by name (either `-` or `_`) under the kernel's modules and returns it
/// uncompressed.
fn module(kernel: &Kernel, name: &str) -> Result<Option<Vec<u8>>> {
    let wanted: Vec<String> = [name.to_string(), name.replace('_', "-")]
        .iter()
        .flat_map(|n| [format!("{n}.ko"), format!("{n}.ko.xz"), format!("{n}.ko.zst")])
        .collect();
    let mut stack = vec![kernel.modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = entry.file_name().to_string_lossy().into_owned();
            if !wanted.contains(&file) {
                continue;
            }
            let decompress = |tool: &str| crate::output_bytes(Command::new(tool).arg("-dc").arg(&path));
            return Ok(Some(if file.ends_with(".xz") {
                decompress("xz")?
            } else if file.ends_with(".zst") {
                decompress("zstd")?
            } else {
                fs::read(&path)?
            }));
        }
    }
    Ok(None)
}

/// The guest's /init around the caller's script.
fn init_script(modules: &[&str], guest_script: &str) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mkdir -p /sys/fs/bpf /sys/kernel/debug\nmount -t bpf bpf /sys/fs/bpf\n\
         mount -t debugfs debugfs /sys/kernel/debug\nmount -t tmpfs tmp /tmp\n\
         mkdir -p /dev/pts\nmount -t devpts devpts /dev/pts\n",
    );
    for m in modules {
        s.push_str(&format!("insmod /lib/modules/{m}.ko 2>/dev/null\n"));
    }
    s.push_str(
        "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 host0 /mnt || echo CRD-VM-ERROR cannot mount the share\n\
         echo CRD-VM-READY $(cat /proc/sys/kernel/osrelease)\nexit_status=1\n",
    );
    s.push_str(guest_script);
    s.push_str(
        "\necho CRD-VM-EXIT=$exit_status\n\
         printf \"\\\\$(printf %03o $exit_status)\" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n\
         poweroff -f\n",
    );
    s
}

fn initramfs(cache: &Path, kernel: &Kernel, guest_script: &str) -> Result<PathBuf> {
    let mut cpio = Cpio::new();
    for dir in ["bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    // init needs a console before devtmpfs is mounted.
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio.file("bin/busybox", 0o755, &fs::read("/bin/busybox").context("read /bin/busybox")?);
    let mut loaded = Vec::new();
    for name in NINEP_MODULES.iter().chain(SOCK_DIAG_MODULES) {
        if let Some(bytes) = module(kernel, name)? {
            cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &bytes);
            loaded.push(*name);
        }
    }
    cpio.file("init", 0o755, init_script(&loaded, guest_script).as_bytes());
    let path = cache.join(format!("initramfs-{}.cpio", kernel.name));
    fs::write(&path, cpio.finish())?;
    Ok(path)
}

/// Boots `kernel` with `share` mounted at /mnt and runs `guest_script` (which sets
/// `exit_status`), killing qemu after `timeout`.
pub fn boot_and_run(
    cache: &Path,
    kernel: &Kernel,
    share: &Path,
    guest_script: &str,
    timeout: Duration,
) -> Result<GuestRun> {
    let initrd = initramfs(cache, kernel, guest_script)?;
    let kvm = Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", if kvm { "kvm" } else { "tcg" }])
        // -nodefaults: no NIC (whose boot ROM only adds noise); the serial port is the log.
        .args([
            "-nodefaults",
            "-serial",
            "stdio",
            "-display",
            "none",
            "-m",
            "2048",
            "-smp",
            "2",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-virtfs")
        .arg(format!("local,path={},mount_tag=host0,security_model=none,id=host0", share.display()))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = qemu.spawn().context("cannot start qemu-system-x86_64")?;
    let log = Arc::new(Mutex::new(Vec::new()));
    // Also written as it comes, to follow a long run: tail -f target/vmtest/serial-*.log
    let live = Arc::new(Mutex::new(fs::File::create(cache.join(format!("serial-{}.log", kernel.name)))?));
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let log = Arc::clone(&log);
        let live = Arc::clone(&live);
        readers.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 8192];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut log) = log.lock() {
                    log.extend_from_slice(&buf[..n]);
                }
                if let Ok(mut live) = live.lock() {
                    let _ = live.write_all(&buf[..n]);
                }
            }
        }));
    }
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for r in readers {
        let _ = r.join();
    }
    let mut serial_log = log.lock().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default();
    if timed_out {
        serial_log.push_str(&format!("\nCRD-VM-TIMEOUT after {timeout:?}\n"));
    }
    let exit_code = serial_log
        .lines()
        .rev()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("CRD-VM-EXIT=")?.trim().parse().ok())
        .unwrap_or(-1);
    Ok(GuestRun { exit_code, serial_log })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_from_the_machines_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://sec.example/debian-security/\n\
                      Suites: bookworm-security\nComponents: main\n";
        let both =
            |main: &str, security: &str| Some(Mirrors { main: main.into(), security: security.into() });
        assert_eq!(
            parse_mirrors(deb822, ""),
            both("http://mirror.example/debian", "http://sec.example/debian-security")
        );
        // One-line sources, with options and without a security line.
        let one_line = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            parse_mirrors("", one_line),
            both("http://m.example/debian", "http://m.example/debian-security")
        );
        assert_eq!(parse_mirrors("", ""), None);
    }

    #[test]
    fn every_default_kernel_is_a_known_release() {
        for k in DEFAULT_KERNELS {
            assert!(RELEASES.iter().any(|r| r.label == *k), "{k}");
        }
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::new();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let data = cpio.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
        // mode field of the first entry (after magic and inode)
        assert_eq!(&data[14..22], b"000081ed");
    }
}
