//! `--tls-dir` as Kubernetes fills it: the three file layouts (ours, a cert-manager Secret,
//! the SPIFFE helper's), found by name; and rotation through kubelet's atomic Secret update
//! (a `..data` symlink renamed onto a new directory), done exactly the way kubelet does it
//! ([`sidecar_tests::kubelet::write_volume`]).
//!
//! The first tests use the library and the binary without privileges; the last runs two pods'
//! sidecars (network namespaces `scpkg-*`, 10.207.1.0/30) and rotates one under streaming load.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sidecar::tls::{
    Credentials, TlsFiles, TlsState,
    certs::{self, Minted},
    identity::SpiffeId,
    layout::{self, Layout},
    reload,
};
use sidecar_tests::{
    host::{self, output_with_timeout},
    kubelet,
    netns::PodPair,
    ports,
    protocol::{EchoLine, assert_streams_intact},
    run::SidecarRun,
    scratch::Scratch,
    serial, sidecar_bin, skip,
};

const TD: &str = "example.org";
const DAY: Duration = Duration::from_secs(86_400);
const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const APP_PORT: u16 = 8080;

/// A CA and a way to mint workload credentials from it.
struct Ca(Minted);

impl Ca {
    fn new() -> Self {
        Self(certs::mint_ca(TD, DAY).expect("minting a CA"))
    }

    /// (certificate, key, bundle) PEMs for `id`; the key as `sidecar cert` writes it (PKCS#8).
    fn issue(&self, id: &str) -> [Vec<u8>; 3] {
        let id: SpiffeId = id.parse().expect("a SPIFFE ID");
        let w = certs::mint_workload(&self.0.cert_pem, &self.0.key_pem, &id, DAY, Duration::ZERO)
            .expect("minting a workload certificate");
        [
            w.cert_pem.into_bytes(),
            w.key_pem.into_bytes(),
            self.0.cert_pem.clone().into_bytes(),
        ]
    }
}

/// A Secret volume in `layout`'s names, written (or updated) the way kubelet does.
fn write_secret(dir: &Path, layout: Layout, set: &[Vec<u8>; 3]) {
    let names = layout.names();
    kubelet::write_volume(
        dir,
        &[
            (names[0], &set[0][..]),
            (names[1], &set[1][..]),
            (names[2], &set[2][..]),
        ],
    );
}

/// The key re-encoded as cert-manager writes ECDSA keys by default (`encoding: PKCS1`, i.e. a
/// SEC1 `EC PRIVATE KEY` block), with `openssl pkey -traditional`.
fn sec1(key_pem: &[u8], scratch: &Scratch) -> Option<Vec<u8>> {
    if host::which("openssl").is_none() {
        skip("openssl is not installed (.ci/run installs it)");
        return None;
    }
    let input = scratch.path("pkcs8.pem");
    std::fs::write(&input, key_pem).expect("writing the key");
    let out = output_with_timeout(
        Command::new("openssl")
            .args(["pkey", "-traditional", "-in"])
            .arg(&input),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "openssl pkey: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("BEGIN EC PRIVATE KEY"),
        "openssl did not write SEC1"
    );
    Some(out.stdout)
}

fn identity(files: &TlsFiles) -> String {
    Credentials::load(files)
        .expect("loading the credentials")
        .identity
        .to_string()
}

#[test]
fn every_layout_in_a_secret_volume_loads() {
    let scratch = Scratch::new("pkg-layouts");
    let ca = Ca::new();
    for (n, layout) in Layout::ALL.into_iter().enumerate() {
        let id = format!("spiffe://{TD}/ns/demo/sa/app{n}");
        let dir = scratch.path(&format!("vol{n}"));
        write_secret(&dir, layout, &ca.issue(&id));
        let (found, files) = layout::discover(&dir).expect("discovering the layout");
        assert_eq!(found, layout);
        assert_eq!(identity(&files), id, "{layout:?}");
    }
    // cert-manager's default ECDSA key encoding (SEC1) loads too.
    let id = format!("spiffe://{TD}/ns/demo/sa/sec1");
    let mut set = ca.issue(&id);
    let Some(key) = sec1(&set[1], &scratch) else {
        return;
    };
    set[1] = key;
    let dir = scratch.path("sec1");
    write_secret(&dir, Layout::CertManager, &set);
    assert_eq!(identity(&TlsFiles::discover(&dir).unwrap()), id);
}

/// While kubelet swaps the volume between two identities as fast as it can write, every load
/// sees one whole set: never the old certificate with the new key, never a vanished file.
#[test]
fn loads_during_kubelet_swaps_never_see_half_a_set() {
    let scratch = Scratch::new("pkg-swap-race");
    let ca = Ca::new();
    let ids = [
        format!("spiffe://{TD}/ns/demo/sa/one"),
        format!("spiffe://{TD}/ns/demo/sa/two"),
    ];
    let sets = [ca.issue(&ids[0]), ca.issue(&ids[1])];
    let dir = scratch.path("vol");
    write_secret(&dir, Layout::CertManager, &sets[0]);
    let files = TlsFiles::discover(&dir).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, swaps, dir) = (stop.clone(), swaps.clone(), dir.clone());
        std::thread::spawn(move || {
            let mut i = 1;
            while !stop.load(Ordering::Relaxed) && i <= 5_000 {
                write_secret(&dir, Layout::CertManager, &sets[i % 2]);
                swaps.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut loads, mut seen) = (0, [0usize; 2]);
    while Instant::now() < deadline {
        let creds = Credentials::load(&files).unwrap_or_else(|e| {
            panic!(
                "load {loads} during swap {} saw a broken set: {e}",
                swaps.load(Ordering::Relaxed)
            )
        });
        let id = creds.identity.to_string();
        let which = ids.iter().position(|i| *i == id).expect("a known identity");
        seen[which] += 1;
        loads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer thread");
    let swaps = swaps.load(Ordering::Relaxed);
    eprintln!("{loads} loads across {swaps} kubelet swaps: {seen:?}");
    assert!(
        swaps >= 50 && loads >= 50,
        "too little overlap to mean anything"
    );
    assert!(seen[0] > 0 && seen[1] > 0, "both sets seen: {seen:?}");
}

/// The rotation watcher picks up one kubelet update exactly once, with the new identity, and
/// refuses nothing on the way.
#[test]
fn the_watcher_follows_a_kubelet_secret_update() {
    let scratch = Scratch::new("pkg-watch");
    let ca = Ca::new();
    let dir = scratch.path("vol");
    let (old, new) = (
        format!("spiffe://{TD}/ns/demo/sa/v1"),
        format!("spiffe://{TD}/ns/demo/sa/v2"),
    );
    write_secret(&dir, Layout::Spiffe, &ca.issue(&old));
    let state = TlsState::load(TlsFiles::discover(&dir).unwrap()).expect("initial load");
    assert_eq!(state.current().identity.to_string(), old);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let rotations = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let counter = rotations.clone();
        let watcher = reload::spawn_watcher(state.clone(), Duration::from_millis(10), move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        write_secret(&dir, Layout::Spiffe, &ca.issue(&new));
        let deadline = Instant::now() + Duration::from_secs(5);
        while state.current().identity.to_string() != new {
            assert!(Instant::now() < deadline, "the update was not picked up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Many more polls: nothing else happens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        watcher.abort();
    });
    assert_eq!(rotations.load(Ordering::Relaxed), 1);
}

/// A directory with no complete set, or with two producers' files, stops `sidecar run`
/// before anything is set up: one line, naming the three layouts.
#[test]
fn a_mixed_or_empty_tls_dir_is_a_one_line_error() {
    let scratch = Scratch::new("pkg-bad-layout");
    let ca = Ca::new();
    let mixed = scratch.path("mixed");
    write_secret(
        &mixed,
        Layout::Sidecar,
        &ca.issue(&format!("spiffe://{TD}/a")),
    );
    std::fs::write(mixed.join("tls.crt"), b"").unwrap();
    let empty = scratch.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for (dir, expect) in [
        (&mixed, "files of more than one layout"),
        (&empty, "no certificate set found"),
    ] {
        let out = output_with_timeout(
            Command::new(sidecar_bin())
                .args(["run", "--tls-dir"])
                .arg(dir)
                .args(["--", "true"]),
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(lines[0].starts_with("error: --tls-dir "), "{stderr}");
        assert!(lines[0].contains(expect), "{stderr}");
        for l in Layout::ALL {
            assert!(lines[0].contains(&l.names().join("+")), "{stderr}");
        }
    }
}

/// `sidecar proxy --tls-dir` (the pod sidecar, deploy/example-app.yaml) takes every layout
/// too: started against a Secret volume of each, it gets past loading its certificates (it is
/// still running after a moment, waiting for an agent that is not there, or stopped for
/// another reason). A build without `sidecar proxy` (it comes from another branch) is
/// reported and not checked.
#[test]
fn sidecar_proxy_takes_every_layout() {
    let help = output_with_timeout(
        Command::new(sidecar_bin()).args(["proxy", "--help"]),
        Duration::from_secs(10),
    );
    if !help.status.success() {
        eprintln!("not checked: this build has no `sidecar proxy`");
        return;
    }
    let scratch = Scratch::new("pkg-proxy-layouts");
    let ca = Ca::new();
    for (n, layout) in Layout::ALL.into_iter().enumerate() {
        let dir = scratch.path(&format!("vol{n}"));
        write_secret(
            &dir,
            layout,
            &ca.issue(&format!("spiffe://{TD}/ns/demo/sa/app")),
        );
        let mut child = Command::new(sidecar_bin())
            .arg("proxy")
            .arg("--tls-dir")
            .arg(&dir)
            .arg("--agent-socket")
            .arg(scratch.path("no-agent.sock"))
            .args(["--pod-uid", "00000000-0000-0000-0000-000000000000"])
            .args(["--admin-addr", "off", "--no-inbound"])
            .args(["--proxy-port", &ports::take().to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting sidecar proxy");
        let exited = host::wait_child(&mut child, Duration::from_secs(2));
        if exited.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut stderr = String::new();
        use std::io::Read as _;
        let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
        let names = layout.names();
        assert!(
            !stderr.contains("workload certificates") && !stderr.contains("--tls-dir"),
            "`sidecar proxy` cannot load the {layout:?} layout ({}): build its TlsFiles with \
             TlsFiles::discover(&dir), as `sidecar run` does:\n{stderr}",
            names.join(", ")
        );
    }
}

/// Two pods: the server's credentials are a cert-manager Secret (SEC1 key), the client's the
/// SPIFFE helper's files. Streams run while kubelet rotates the server's Secret to a new
/// identity: new tunnels present it, the open streams finish byte-exact, nothing is refused.
#[test]
fn mtls_across_a_kubelet_secret_rotation() {
    if !sidecar_tests::privileged() {
        return;
    }
    if host::which("nsenter").is_none() && !skip("nsenter is not installed") {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("pkg-k8s-rotation");
    let ca = Ca::new();
    let (client_id, server_id, rotated_id) = (
        format!("spiffe://{TD}/ns/demo/sa/client"),
        format!("spiffe://{TD}/ns/demo/sa/server"),
        format!("spiffe://{TD}/ns/demo/sa/server-v2"),
    );
    let server_vol = scratch.path("server-secret");
    let mut server_set = ca.issue(&server_id);
    let Some(key) = sec1(&server_set[1], &scratch) else {
        return;
    };
    server_set[1] = key;
    write_secret(&server_vol, Layout::CertManager, &server_set);
    let client_vol = scratch.path("client-spiffe");
    write_secret(&client_vol, Layout::Spiffe, &ca.issue(&client_id));

    let pods = PodPair::create_in("scpkg", 207, 1);
    let mut server = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(&server_vol)
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(READY_TIMEOUT);
    let client = |port: u16, argv: Vec<String>| {
        SidecarRun::builder(port)
            .meshed_client_of(&pods, &client_vol)
            .command(argv)
            .start()
    };
    let addr = format!("--addr={}:{APP_PORT}", pods.b.addr);
    let streams = 4;
    let mut long = client(
        ports::take(),
        vec![
            CLIENT.into(),
            "pingpong".into(),
            addr.clone(),
            "--size=1024".into(),
            format!("--count={streams}"),
            "--seconds=5".into(),
        ],
    );
    std::thread::sleep(Duration::from_millis(1200));

    let mut rotated = ca.issue(&rotated_id);
    rotated[1] = sec1(&rotated[1], &scratch).expect("openssl was there a moment ago");
    write_secret(&server_vol, Layout::CertManager, &rotated);
    std::thread::sleep(Duration::from_millis(1600));

    let probe = client(
        ports::take(),
        vec![
            CLIENT.into(),
            "echo".into(),
            addr,
            "--size=64".into(),
            "--count=1".into(),
        ],
    )
    .finish(RUN_TIMEOUT);
    probe.assert_exit_code(0);
    let peers: Vec<_> = probe
        .report()
        .connections
        .iter()
        .map(|c| (c.mtls(), c.peer_identity().map(str::to_owned)))
        .collect();
    assert_eq!(peers, vec![(true, Some(rotated_id.clone()))]);

    let long = long.finish(RUN_TIMEOUT);
    long.assert_exit_code(0);
    assert_streams_intact(&long.parse_stdout::<EchoLine>(), streams);
    for c in &long.report().connections {
        assert_eq!(c.peer_identity(), Some(server_id.as_str()), "{c:?}");
        assert_eq!(c.outcome, "ok", "{c:?}");
    }
    server.release();
    let done = server.finish(RUN_TIMEOUT);
    let stderr = done.stderr_text();
    assert!(
        !stderr.contains("refused"),
        "the rotation was refused somewhere:\n{stderr}"
    );
}
