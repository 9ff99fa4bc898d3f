//! `cargo xtask vm-test`: the integration tests on several Linux kernels under qemu.
//!
//! Per kernel: fetch the pinned Debian package (private apt configuration, cached under
//! `target/vm/`), pack an initramfs with the static test binaries and an `/init` that runs
//! them, boot it, and read the result marker from the serial console. The marker is the
//! only pass signal: no marker (a panic, a hang killed at the timeout) is a failure.

mod build;
mod cpio;
pub mod guest;
mod initramfs;
mod kernel;
mod qemu;
mod userland;

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};

use crate::step;

#[derive(clap::Args)]
pub struct Options {
    /// Kernels to boot (repeatable): 5.10, 6.1, 6.12, 6.18, 7.3. Default: all of them.
    #[arg(long = "kernel", value_name = "VERSION")]
    pub kernels: Vec<String>,
    /// Use KVM instead of TCG (only where /dev/kvm runs ordinary guests).
    #[arg(long)]
    pub kvm: bool,
    /// Seconds before a guest is killed and counted as failed.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Guest memory (MiB); the initramfs lives in it.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
}

/// One kernel's outcome.
struct Outcome {
    version: String,
    pass: bool,
    summary: String,
    boot: Option<Duration>,
    total: Duration,
}

pub fn vm_test(opts: &Options) -> Result<()> {
    let kernels: Vec<&kernel::Kernel> = if opts.kernels.is_empty() {
        kernel::KERNELS.iter().collect()
    } else {
        opts.kernels
            .iter()
            .map(|v| kernel::find(v))
            .collect::<Result<_>>()?
    };
    let vm_dir = crate::build_ebpf::workspace_root().join("target/vm");
    std::fs::create_dir_all(&vm_dir)?;
    let bins = build::build()?;
    let mut outcomes = Vec::new();
    for k in kernels {
        let extracted = kernel::fetch(k, &vm_dir)?;
        let run_dir = vm_dir.join(k.version);
        std::fs::create_dir_all(&run_dir)?;
        let modules = userland::modules(&extracted.modules, &run_dir.join("modules"))?;
        let initramfs = run_dir.join("initramfs.cpio");
        step(&format!("packing {}", initramfs.display()));
        initramfs::contents(&bins, &modules)?.write(&initramfs)?;
        step(&format!("booting {} ({})", k.version, k.packages[0]));
        let log = run_dir.join("console.log");
        let boot = qemu::boot(&qemu::Vm {
            label: k.version,
            vmlinuz: &extracted.vmlinuz,
            initramfs: &initramfs,
            log: &log,
            kvm: opts.kvm,
            timeout: Duration::from_secs(opts.timeout),
            memory_mb: opts.memory,
        })?;
        outcomes.push(judge(k.version, &boot, &log));
    }
    eprintln!("\nkernel  result  boot    total   details");
    for o in &outcomes {
        eprintln!(
            "{:<7} {:<7} {:<7} {:<7} {}",
            o.version,
            if o.pass { "PASS" } else { "FAIL" },
            o.boot
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            format!("{:.0}s", o.total.as_secs_f64()),
            o.summary
        );
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.pass)
        .map(|o| &o.version)
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on kernel(s) {failed:?}: see target/vm/<kernel>/console.log");
    }
    Ok(())
}

/// Reads the marker: pass only when the probe passed, tests ran and none failed.
fn judge(version: &str, boot: &qemu::Boot, log: &Path) -> Outcome {
    let (pass, summary) = match &boot.marker {
        None if boot.timed_out => (
            false,
            format!("no marker: killed at the timeout ({})", log.display()),
        ),
        None => (
            false,
            format!("no marker: the guest stopped early ({})", log.display()),
        ),
        Some(line) => {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .unwrap_or("?")
                    .to_owned()
            };
            let pass = field("probe") == "ok"
                && field("failed") == "0"
                && field("binaries_failed") == "0"
                && field("passed").parse::<u32>().is_ok_and(|n| n > 0);
            let summary = line.trim_start_matches(guest::MARKER).trim().to_owned();
            (pass, summary)
        }
    };
    Outcome {
        version: version.into(),
        pass,
        summary,
        boot: boot.boot_time,
        total: boot.total,
    }
}
