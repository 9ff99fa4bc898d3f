//! Project automation. `cargo xtask build-ebpf` builds the eBPF object (installing what it
//! needs first), `cargo xtask test` builds everything and runs the whole test suite.

mod bench;
mod build_ebpf;
mod demo;
mod fuzz;
mod sanitize;
mod setup;
mod soak;
mod toolchain;
mod vmtest;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build and test automation for the sidecar workspace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (nightly, -Z build-std=core, bpf-linker), installing the nightly's
    /// rust-src and a bpf-linker built against the nightly's own LLVM when they are missing.
    BuildEbpf(build_ebpf::Options),
    /// Build everything and run `sidecar run -- curl` against a page served on 127.0.0.1
    /// (needs root): shows interception and the exit summary with no setup.
    Demo,
    /// Fuzz the parsers of network bytes for a bounded time (installs cargo-fuzz if missing).
    Fuzz(fuzz::Options),
    /// Run the unsafe code of the user half under Miri and AddressSanitizer (nightly).
    Sanitize(sanitize::Options),
    /// Install what the tests, the demo and the bench need (Debian packages, the manifest
    /// validator's venv), one line per thing installed; `test` and `demo` run it first.
    Setup,
    /// Run the soak test (mixed traffic through one sidecar, leak and counter checks) for a
    /// bounded time (needs root).
    Soak(soak::Options),
    /// Install what is missing (`setup`), build the eBPF object, then run every test of the
    /// workspace (privileged ones included: run as root; with CI set they fail instead of
    /// skipping when they cannot run).
    Test {
        /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure direct vs iptables vs eBPF (with and without sockmap) on this host, in network
    /// namespaces of its own (needs root); writes target/bench/report.md and report.svg.
    Bench(bench::Options),
    /// (internal) The bench's echo and sink server.
    #[command(hide = true)]
    BenchServer(bench::load::ServerArgs),
    /// (internal) The bench's load generator.
    #[command(hide = true)]
    BenchClient(bench::load::ClientArgs),
    /// (internal) The bench's idle-connections command: opens and holds connections.
    #[command(hide = true)]
    BenchHold(bench::idle::HoldArgs),
    /// (internal) The meshed idle-connections' server, in the server pod.
    #[command(hide = true)]
    BenchHoldServe(bench::idle::HoldServeArgs),
    /// Run the integration tests on Debian's 5.10, 6.1, 6.12, 6.18 and 7.3 kernels under qemu (TCG):
    /// fetches the kernels through a private apt configuration, boots each with a static
    /// initramfs, reports pass/fail, test counts and boot time per kernel.
    VmTest(vmtest::Options),
}

fn main() -> Result<()> {
    // Inside a vm-test guest this binary is `/init`.
    if std::process::id() == 1 {
        vmtest::guest::init();
    }
    match Cli::parse().command {
        Cmd::BuildEbpf(opts) => build_ebpf::build(&opts).map(|_| ()),
        Cmd::Demo => setup::setup().and_then(|()| demo::demo()),
        Cmd::Setup => setup::setup(),
        Cmd::Fuzz(opts) => fuzz::fuzz(&opts),
        Cmd::Soak(opts) => soak::soak(&opts),
        Cmd::Sanitize(opts) => sanitize::sanitize(&opts),
        Cmd::Test { args } => test(&args),
        Cmd::Bench(opts) => bench::bench(&opts),
        Cmd::BenchServer(args) => bench::load::server(&args),
        Cmd::BenchClient(args) => bench::load::client(&args),
        Cmd::BenchHold(args) => bench::idle::hold(&args),
        Cmd::BenchHoldServe(args) => bench::idle::hold_serve(&args),
        Cmd::VmTest(opts) => vmtest::vm_test(&opts),
    }
}

/// Seconds per fuzz target in `cargo xtask test` (six targets: 120 s in all).
const FUZZ_SECONDS_IN_TEST: u64 = 20;

fn test(args: &[String]) -> Result<()> {
    step("checking what the tests need (cargo xtask setup)");
    setup::setup()?;
    build_ebpf::build(&build_ebpf::Options::default())?;
    // First: its build leaves the variant where the normal `sidecar` goes, until the next.
    let mut build = cargo();
    build.args(["build", "--locked"]);
    build_ebpf::build_fillable_map_sidecar(build, &build_ebpf::target_dir().join("debug"))?;
    step("building the workspace");
    run(cargo().args(["build", "--locked"]))?;
    step("running the tests");
    let mut cmd = cargo();
    // Default members only: the eBPF crate builds for bpfel-unknown-none, not the host.
    cmd.args(["test", "--locked", "--"]).args(args);
    run(&mut cmd)?;
    // With a test filter, only the tests were asked for.
    if args.is_empty() {
        sanitize::sanitize(&sanitize::Options::default())?;
        soak::soak(&soak::Options {
            secs: soak::SECONDS_IN_TEST,
            no_build: true,
        })?;
        // A short, bounded fuzz run so the targets keep building and finding nothing new.
        fuzz::fuzz(&fuzz::Options {
            seconds: FUZZ_SECONDS_IN_TEST,
        })?;
        step("smoke-running the bench harness (cargo xtask bench --quick)");
        bench::bench(&bench::Options {
            quick: true,
            ..Default::default()
        })?;
    }
    Ok(())
}

/// `cargo` on the caller's toolchain (the stable one for everything but the eBPF crate).
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Prints a progress line, so long steps say what they are doing.
pub fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

/// Runs a command to completion; a failure names the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; a failure names the command.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
