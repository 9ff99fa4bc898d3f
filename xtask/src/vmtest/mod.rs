//! `cargo xtask vm-test`: the integration tests on several Linux kernels under qemu.
//!
//! Per kernel: fetch the pinned Debian package (private apt configuration, cached under
//! `target/vm/`), pack an initramfs with the static test binaries and an `/init` that runs
//! them, boot it, and read the result marker from the serial console. The marker is the
//! only pass signal: no marker (a panic, a hang killed at the timeout) is a failure.
//!
//! `--expect-fail-broken VERSION` also boots one kernel with the test-only broken eBPF
//! program and requires that boot to fail, which shows the harness can fail.

mod build;
mod cpio;
mod exclusions;
pub mod guest;
mod initramfs;
mod kernel;
mod qemu;
mod userland;

use std::{
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

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
    /// Guest memory (MiB); the initramfs lives in it. The 10,000-connection test needs
    /// more than 2 GiB (20,000 threads with their kernel stacks, and the sockets): with 2 GiB
    /// the guest's OOM killer ended its client.
    #[arg(long, default_value_t = 4096)]
    pub memory: u32,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// Guests booted at the same time (each uses `--smp` host threads under TCG).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Only these integration test targets (repeatable, e.g. `interception`). Default: all.
    #[arg(long = "test", value_name = "TARGET")]
    pub tests: Vec<String>,
    /// Only the tests whose name contains this (libtest's filter, given to every target).
    #[arg(long)]
    pub filter: Option<String>,
    /// After the matrix, boot VERSION once more with the test-only broken eBPF program
    /// (`build-ebpf --broken-for-tests`): vm-test fails unless that boot fails with the
    /// probe reporting the rejected program.
    #[arg(long, value_name = "VERSION")]
    pub expect_fail_broken: Option<String>,
}

/// One kernel's outcome.
struct Outcome {
    label: String,
    pass: bool,
    /// The guest printed a marker and its probe failed (what the broken run must show).
    probe_failed: bool,
    summary: String,
    boot: Option<Duration>,
    total: Duration,
}

/// One guest to boot.
struct Job<'a> {
    kernel: &'static kernel::Kernel,
    label: String,
    extracted: kernel::Extracted,
    /// A `sidecar` to put in place of the normal one (the broken run).
    sidecar: Option<&'a Path>,
    /// Only the `interception` target, to fail fast (the broken run).
    tests: Vec<String>,
}

pub fn vm_test(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let kernels: Vec<&kernel::Kernel> = if opts.kernels.is_empty() {
        kernel::KERNELS.iter().collect()
    } else {
        opts.kernels
            .iter()
            .map(|v| kernel::find(v))
            .collect::<Result<_>>()?
    };
    let broken_kernel = opts
        .expect_fail_broken
        .as_deref()
        .map(kernel::find)
        .transpose()?;
    let vm_dir = crate::build_ebpf::workspace_root().join("target/vm");
    std::fs::create_dir_all(&vm_dir)?;
    let bins = build::build()?;
    let broken_sidecar = broken_kernel
        .map(|_| build::build_broken_sidecar(&vm_dir))
        .transpose()?;
    // Fetching runs one at a time (one private apt state); packing and booting may overlap.
    let mut jobs = Vec::new();
    for k in &kernels {
        jobs.push(Job {
            kernel: k,
            label: k.version.to_owned(),
            extracted: kernel::fetch(k, &vm_dir)?,
            sidecar: None,
            tests: opts.tests.clone(),
        });
    }
    if let (Some(k), Some(sidecar)) = (broken_kernel, &broken_sidecar) {
        jobs.push(Job {
            kernel: k,
            label: format!("{}-broken", k.version),
            extracted: kernel::fetch(k, &vm_dir)?,
            sidecar: Some(sidecar),
            tests: vec!["interception".into()],
        });
    }
    let prepared = build::Prepared::new(&bins, &vm_dir.join("stripped"))?;
    let outcomes = run_jobs(opts, &jobs, &prepared, &vm_dir)?;

    eprintln!("\nkernel       result  boot    total   details");
    for o in &outcomes {
        eprintln!(
            "{:<12} {:<7} {:<7} {:<7} {}",
            o.label,
            if o.pass { "PASS" } else { "FAIL" },
            o.boot
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            format!("{:.0}s", o.total.as_secs_f64()),
            o.summary
        );
    }
    eprintln!(
        "vm-test: {} guest(s) in {:.0}s wall time ({} at a time, -smp {})",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        opts.jobs.max(1),
        opts.smp
    );
    let mut problems = Vec::new();
    for o in &outcomes {
        let broken = o.label.ends_with("-broken");
        if broken && o.pass {
            problems.push(format!(
                "{}: the broken eBPF program PASSED: the harness cannot fail",
                o.label
            ));
        } else if broken && !o.probe_failed {
            problems.push(format!(
                "{}: failed, but not because the probe rejected the broken program ({})",
                o.label, o.summary
            ));
        } else if broken {
            eprintln!(
                "vm-test: {}: failed as it must (the probe rejected the broken program)",
                o.label
            );
        } else if !o.pass {
            problems.push(format!("{} failed", o.label));
        }
    }
    if !problems.is_empty() {
        bail!(
            "vm-test: {}; see target/vm/<kernel>/console.log",
            problems.join("; ")
        );
    }
    Ok(())
}

/// Packs and boots every job, `opts.jobs` at a time, in the order given: as soon as one guest
/// ends, the next job boots (a pair does not wait for its slower guest). Outcomes come back
/// in the jobs' order.
fn run_jobs(
    opts: &Options,
    jobs: &[Job],
    prepared: &build::Prepared,
    vm_dir: &Path,
) -> Result<Vec<Outcome>> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Outcome>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, jobs.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let outcome = run_job(opts, job, prepared, vm_dir);
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| bail!("a guest thread panicked"))
        })
        .collect()
}

fn run_job(
    opts: &Options,
    job: &Job,
    prepared: &build::Prepared,
    vm_dir: &Path,
) -> Result<Outcome> {
    let run_dir = vm_dir.join(&job.label);
    std::fs::create_dir_all(&run_dir)?;
    // Decompressed modules are per kernel, shared by its normal and broken runs.
    let modules = userland::modules(
        &job.extracted.modules,
        &vm_dir.join(job.kernel.version).join("modules"),
    )?;
    let initramfs = run_dir.join("initramfs.cpio");
    let sidecar = job
        .sidecar
        .map(|s| build::strip_copy(s, &run_dir.join("stripped")))
        .transpose()?;
    let plan = initramfs::Plan {
        tests: &job.tests,
        filter: opts.filter.as_deref(),
        skip: exclusions::skipped(job.kernel.version),
        skip_targets: exclusions::skipped_targets(job.kernel.version),
        sidecar: sidecar.as_deref(),
    };
    let pack_start = Instant::now();
    let size = initramfs::contents(prepared, &modules, &plan)?.write(&initramfs)?;
    step(&format!(
        "packed {} ({:.0} MiB in {:.1}s)",
        initramfs.display(),
        size as f64 / (1024.0 * 1024.0),
        pack_start.elapsed().as_secs_f64()
    ));
    step(&format!(
        "booting {} ({})",
        job.label, job.kernel.packages[0]
    ));
    let log = run_dir.join("console.log");
    let boot = qemu::boot(&qemu::Vm {
        label: &job.label,
        vmlinuz: &job.extracted.vmlinuz,
        initramfs: &initramfs,
        log: &log,
        kvm: opts.kvm,
        timeout: Duration::from_secs(opts.timeout),
        memory_mb: opts.memory,
        smp: opts.smp,
    })?;
    // The image is rebuilt every run: keep the disk free of a few hundred MiB per kernel.
    let _ = std::fs::remove_file(&initramfs);
    let mut outcome = judge(&job.label, &boot, &log);
    let excluded = exclusions::skipped_quietly(job.kernel.version).len();
    if excluded > 0 {
        outcome.summary += &format!(" excluded={excluded} (exclusions.rs)");
    }
    Ok(outcome)
}

/// Reads the marker: pass only when the probe passed, tests ran and none failed.
fn judge(label: &str, boot: &qemu::Boot, log: &Path) -> Outcome {
    let (pass, probe_failed, summary) = match &boot.marker {
        None if boot.timed_out => (
            false,
            false,
            format!("no marker: killed at the timeout ({})", log.display()),
        ),
        None => (
            false,
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
            (pass, field("probe") == "failed", summary)
        }
    };
    Outcome {
        label: label.into(),
        pass,
        probe_failed,
        summary,
        boot: boot.boot_time,
        total: boot.total,
    }
}
