//! The setting most Kubernetes tests start from: two pods with mTLS sidecars, A a client
//! meshing B, B a server, and the app traffic between them.

use std::path::PathBuf;

use super::{
    CLIENT_ID, Node, Pod, SERVER_ID,
    net::{ADDR_A, ADDR_B, NS_A, NS_B},
    proc::Proc,
};

/// Two pods with mTLS sidecars: A (client, meshing B) and B (server), each sidecar writing an
/// access log the test reads.
pub struct TwoPods {
    pub a: Pod,
    pub b: Pod,
    pub log_a: PathBuf,
    pub log_b: PathBuf,
}

/// Starts [`TwoPods`] on a node whose agent runs; returns them with their sidecars (A's, then
/// B's), running and ready.
pub fn two_pods(node: &Node) -> (TwoPods, Proc, Proc) {
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let tls_a = node.certs(CLIENT_ID, "tls-a");
    let tls_b = node.certs(SERVER_ID, "tls-b");
    let (log_a, log_b) = (node.log_file("access-a.log"), node.log_file("access-b.log"));
    let proxy_b = node.start_proxy(
        &b,
        "proxy-b",
        "server",
        &[
            format!("--tls-dir={tls_b}"),
            format!("--access-log={}", log_b.display()),
        ],
    );
    let proxy_a = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[
            format!("--tls-dir={tls_a}"),
            "--no-inbound".into(),
            format!("--mesh-cidrs={}/32", b.addr),
            format!("--access-log={}", log_a.display()),
        ],
    );
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    (TwoPods { a, b, log_a, log_b }, proxy_a, proxy_b)
}

impl Node {
    /// `sidecar-testclient echo` arguments: `count` connections of `size` bytes each to pod
    /// B's server ([`Node::server`]).
    pub fn echo_args(&self, size: usize, count: usize) -> Vec<String> {
        vec![
            "echo".into(),
            format!("--addr={ADDR_B}:{}", self.app_port),
            format!("--size={size}"),
            format!("--count={count}"),
        ]
    }
}
