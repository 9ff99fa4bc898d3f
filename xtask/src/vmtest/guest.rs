//! The guest's `/init`: this same xtask binary, built static for musl. It mounts what the
//! sidecar and the tests need, brings up `lo`, loads the modules, runs `sidecar probe` and
//! every test binary of the plan, prints one result marker and powers the VM off. The host
//! trusts only the marker: a guest that dies earlier prints none and fails.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

/// Where the host puts the plan in the initramfs.
pub const PLAN: &str = "/vm/plan";
/// The marker's prefix; the host looks for it on the serial console.
pub const MARKER: &str = "SIDECAR-VM-RESULT";

/// The kernel starts `/init` without a PATH.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The counts the marker reports.
#[derive(Default, Debug, PartialEq)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    pub binaries_failed: u32,
}

impl Counts {
    /// Adds a libtest summary line (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`).
    pub fn add_summary(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs as PID 1; never returns.
pub fn init() -> ! {
    println!("vm-init: starting");
    setup();
    let plan = fs::read_to_string(PLAN).unwrap_or_default();
    let mut counts = Counts::default();
    let mut probe = "none";
    for line in plan.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["module", path] => load_module(path),
            ["probe", sidecar] => {
                println!("vm-init: {sidecar} probe");
                // The verifier's log, when a program is rejected, is the useful part.
                let ok = Command::new(sidecar)
                    .arg("probe")
                    .env("SIDECAR_LOG", "debug")
                    .env("PATH", PATH)
                    .status()
                    .is_ok_and(|s| s.success());
                probe = if ok { "ok" } else { "failed" };
            }
            ["test", binary, args @ ..] => {
                println!("vm-init: running {binary}");
                if !run_test(binary, args, &mut counts) {
                    counts.binaries_failed += 1;
                }
            }
            _ => {}
        }
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "{MARKER} kernel={} probe={probe} passed={} failed={} ignored={} binaries_failed={}",
        release.trim(),
        counts.passed,
        counts.failed,
        counts.ignored,
        counts.binaries_failed
    );
    // SAFETY: plain syscalls; PID 1 powering off is the end of the guest.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}

fn setup() {
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/var/run"] {
        let _ = fs::create_dir_all(dir);
    }
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    // The initramfs is writable already; a tmpfs on top would hide what it holds there, and
    // the test executables sit at their host paths (a checkout under /tmp is common).
    for dir in ["/tmp", "/run"] {
        let populated = fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        if !populated {
            mount("tmpfs", dir, "tmpfs");
        }
    }
    mount("bpf", "/sys/fs/bpf", "bpf");
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2");
    if let Err(e) = loopback_up() {
        println!("vm-init: bringing lo up failed: {e}");
    }
    raise_threads_max();
}

/// What the load tests need from the guest kernel's process table.
///
/// The kernel sizes `kernel.threads-max` from the guest's RAM: about 15,000 in a 2 GiB
/// guest (measured: 15,090 on 5.10, 15,023 on 6.1). The 10,000-connection test needs more
/// than 20,000 threads at once (its client and its echo server each run a thread per
/// connection), so thread creation failed with EAGAIN, the client died, and the proxy then
/// accepted connections whose app side was already gone ("no original destination
/// recorded"). A host gets its threads-max from its own RAM (192,730 on the CI machine),
/// so the guest is given a host-like one rather than a smaller test.
const THREADS_MAX: u64 = 65_536;

fn raise_threads_max() {
    const PATH: &str = "/proc/sys/kernel/threads-max";
    let read = || {
        fs::read_to_string(PATH)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let cpus = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = mem.lines().next().unwrap_or_default();
    let before = read();
    if before.is_some_and(|n| n < THREADS_MAX)
        && let Err(e) = fs::write(PATH, THREADS_MAX.to_string())
    {
        println!("vm-init: raising {PATH} failed: {e}");
    }
    println!(
        "vm-init: possible CPUs {}, {}, threads-max {} -> {}",
        cpus.trim(),
        mem_total
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" "),
        before.map_or("?".into(), |n| n.to_string()),
        read().map_or("?".into(), |n| n.to_string())
    );
}

fn mount(source: &str, target: &str, fstype: &str) {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, tgt, ty) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        println!(
            "vm-init: mount {fstype} on {target} failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `ip link set lo up`, without `ip`: SIOCSIFFLAGS on a throwaway socket.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a zeroed ifreq is valid; the socket is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 { Err(err) } else { Ok(()) }
    }
}

fn load_module(path: &str) {
    let result = fs::File::open(path).and_then(|f| {
        use std::os::fd::AsRawFd;
        // SAFETY: finit_module on an open file with empty parameters.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    });
    match result {
        Ok(()) => {}
        Err(e) => println!("vm-init: loading {path} failed: {e}"),
    }
}

/// Runs one test binary, echoing its output to the console and counting its summary.
fn run_test(binary: &str, args: &[&str], counts: &mut Counts) -> bool {
    let child = Command::new(binary)
        .args(args)
        .env("CI", "1")
        .env("RUST_BACKTRACE", "1")
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            println!("vm-init: could not start {binary}: {e}");
            return false;
        }
    };
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            counts.add_summary(&line);
        }
    }
    child.wait().is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_add_up() {
        let mut c = Counts::default();
        c.add_summary("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.1s");
        c.add_summary(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        c.add_summary("running 3 tests");
        assert_eq!(
            c,
            Counts {
                passed: 4,
                failed: 2,
                ignored: 1,
                binaries_failed: 0
            }
        );
    }
}
