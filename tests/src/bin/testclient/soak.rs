//! `soak`: the mixed workload. Every loop stops at the phase deadline or the phase's
//! connection budget, whichever comes first; every socket operation has a timeout.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::ExitCode,
    sync::{Arc, Mutex, atomic::AtomicU64},
    thread,
    time::{Duration, Instant},
};

use sidecar_tests::protocol::{EchoLine, SoakLine};

use crate::{
    FAIL_TIMEOUT, connect,
    connect_fail::first_failure,
    echo::{echo_one, pingpong_one},
    emit,
};

/// How long a phase may wait for the test's go file.
const GO_TIMEOUT: Duration = Duration::from_secs(180);
const BULK: usize = 1 << 20;

#[derive(Clone, Copy)]
enum Kind {
    Rr,
    Churn,
    Bulk,
    HalfClose,
    Fault,
}

struct Shared {
    line: Mutex<SoakLine>,
    started: AtomicU64,
}

impl Shared {
    fn record(&self, kind: &str, target: usize, l: EchoLine) {
        let mut s = self.line.lock().unwrap();
        s.connections += 1;
        s.spurious_wouldblock += l.spurious_wouldblock;
        if l.ok {
            s.ok += 1;
            s.sent += l.sent;
            s.received += l.received;
            *s.by_kind.entry(format!("{kind}@{target}")).or_default() += 1;
        } else {
            s.failed += 1;
            if s.errors.len() < 10 {
                s.errors.push(format!("{kind}@{target}: {:?}", l.error));
            }
        }
    }

    fn record_fault(&self, what: &str, failed: bool) {
        let mut s = self.line.lock().unwrap();
        s.connections += 1;
        match (failed, what) {
            (false, _) => {
                s.unexpected_success += 1;
                if s.errors.len() < 10 {
                    s.errors.push(format!("{what}: the connection worked"));
                }
            }
            (true, "refused") => s.refused += 1,
            (true, _) => s.reset += 1,
        }
    }
}

/// An upstream that reads what arrives, then resets (SO_LINGER 0): every connection to
/// it must fail for the client.
fn start_resetter() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding the resetter");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut stream) = conn else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf);
            sidecar_tests::blocking::reset_on_close(&stream);
        }
    });
    addr
}

/// A loopback port where nothing listens (bound, then released).
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a probe port");
    l.local_addr().unwrap()
}

fn fault_fails(addr: SocketAddr) -> bool {
    let spurious = AtomicU64::new(0);
    match connect(addr) {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.set_write_timeout(Some(FAIL_TIMEOUT));
            let _ = s.write_all(&[b'x'; 32]);
            first_failure(&s, &spurious).is_some()
        }
    }
}

fn worker(
    kind: Kind,
    targets: Arc<Vec<SocketAddr>>,
    faults: [SocketAddr; 2],
    shared: Arc<Shared>,
    deadline: Instant,
    budget: u64,
    seed0: u64,
) {
    let mut i: u64 = 0;
    while Instant::now() < deadline
        && shared
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            < budget
    {
        let t = (i as usize) % targets.len();
        let seed = seed0.wrapping_mul(1_000_003).wrapping_add(i);
        match kind {
            Kind::Rr => shared.record("rr", t, pingpong_one(targets[t], 64, 20, seed)),
            Kind::Churn => shared.record("churn", t, pingpong_one(targets[t], 32, 1, seed)),
            Kind::Bulk => shared.record("bulk", t, echo_one(targets[t], BULK, seed, None)),
            Kind::HalfClose => shared.record(
                "half_close",
                t,
                echo_one(targets[t], 100 + (i % 900) as usize, seed, None),
            ),
            Kind::Fault => {
                let (what, addr) = if i.is_multiple_of(2) {
                    ("refused", faults[0])
                } else {
                    ("reset", faults[1])
                };
                shared.record_fault(what, fault_fails(addr));
                thread::sleep(Duration::from_millis(20));
            }
        }
        i += 1;
    }
}

pub fn run(
    addrs: &[SocketAddr],
    phases: usize,
    phase: Duration,
    go_dir: &Path,
    max_per_phase: u64,
) -> ExitCode {
    let targets = Arc::new(addrs.to_vec());
    let faults = [closed_port(), start_resetter()];
    let shared = Arc::new(Shared {
        line: Mutex::new(SoakLine::default()),
        started: AtomicU64::new(0),
    });
    let kinds = [
        Kind::Rr,
        Kind::Rr,
        Kind::Churn,
        Kind::Churn,
        Kind::Bulk,
        Kind::HalfClose,
        Kind::Fault,
    ];
    for p in 1..=phases {
        let deadline = Instant::now() + phase;
        let budget = max_per_phase * p as u64;
        let handles: Vec<_> = kinds
            .iter()
            .enumerate()
            .map(|(w, kind)| {
                let (kind, targets, shared) = (*kind, targets.clone(), shared.clone());
                let seed = (p * 100 + w) as u64;
                thread::spawn(move || worker(kind, targets, faults, shared, deadline, budget, seed))
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        shared.started.store(
            shared.line.lock().unwrap().connections,
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut line = shared.line.lock().unwrap().clone();
        line.phase = p;
        emit(&line);
        // Also after the last phase: the test measures the idle sidecar before it exits.
        {
            let go = go_dir.join(format!("go-{p}"));
            let waited = Instant::now();
            while !go.exists() {
                if waited.elapsed() > GO_TIMEOUT {
                    eprintln!("soak: no {} within {GO_TIMEOUT:?}", go.display());
                    return ExitCode::FAILURE;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let line = shared.line.lock().unwrap();
    if line.failed == 0 && line.unexpected_success == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
