//! Boots one guest under qemu (TCG unless `--kvm`), copies its serial console to a log and
//! to stderr, and kills it at the deadline: a hung guest fails, it never hangs the harness.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::guest::MARKER;

/// What one boot showed.
pub struct Boot {
    /// The marker line, when the guest printed one.
    pub marker: Option<String>,
    /// From starting qemu to `/init` running.
    pub boot_time: Option<Duration>,
    pub total: Duration,
    pub timed_out: bool,
}

pub struct Vm<'a> {
    pub label: &'a str,
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub log: &'a Path,
    pub kvm: bool,
    pub timeout: Duration,
    pub memory_mb: u32,
    pub smp: u32,
}

pub fn boot(vm: &Vm) -> Result<Boot> {
    let qemu = "qemu-system-x86_64";
    if super::build::which(qemu).is_none() {
        anyhow::bail!(
            "{qemu} is missing: install it from bookworm-backports \
             (apt-get install -t bookworm-backports --no-install-recommends qemu-system-x86), \
             which keeps the backports qemu-utils"
        );
    }
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", if vm.kvm { "kvm" } else { "tcg" }])
        .args(["-cpu", "max", "-smp", &vm.smp.to_string()])
        .args(["-m", &vm.memory_mb.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(vm.vmlinuz)
        .arg("-initrd")
        .arg(vm.initramfs)
        // no_timer_check: under TCG on a loaded host the boot's IO-APIC timer check can time
        // out ("IO-APIC + timer doesn't work!") and panic a guest before `/init`; the
        // emulated timer works, only the check's timing fails. Seen on 5.10 while another
        // matrix ran on the same two CPUs.
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init no_timer_check",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    let mut log = fs::File::create(vm.log)?;
    let deadline = start + vm.timeout;
    let mut result = Boot {
        marker: None,
        boot_time: None,
        total: Duration::ZERO,
        timed_out: false,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                writeln!(log, "{line}")?;
                eprintln!("[{}] {line}", vm.label);
                if result.boot_time.is_none() && line.contains("vm-init: starting") {
                    result.boot_time = Some(start.elapsed());
                }
                if line.starts_with(MARKER) {
                    result.marker = Some(line);
                }
            }
            // Both pipes closed: qemu exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                result.timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    result.total = start.elapsed();
    Ok(result)
}
