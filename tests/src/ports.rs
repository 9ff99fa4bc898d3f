//! TCP ports for the tests, handed out by one allocator instead of ranges agreed in comments.
//!
//! A test asks for what it needs ([`take`], or [`take_run`] for consecutive ports) and gets
//! ports no other test in this process was given and nothing on the host is listening on:
//! each candidate is bound for a moment on the wildcard addresses (IPv4 and IPv6) before it is
//! handed out. Privileged tests also hold [`crate::serial`], so two test binaries never use
//! their ports at the same time; the process's start point is still spread by its pid so that
//! unserialized tests of two binaries rarely probe the same ports.
//!
//! Ports come from [`RANGE`], below Linux's default ephemeral range (32768–60999), so a
//! client's source port never takes a port a test is about to listen on. Ports inside a
//! network namespace the test created could be anything; they come from here too, so a reader
//! never has to wonder whether two tests collide.

use std::{
    net::{Ipv4Addr, Ipv6Addr, TcpListener},
    ops::Range,
    sync::Mutex,
};

/// Where the allocator hands out ports from.
pub const RANGE: Range<u16> = 20_000..32_000;

/// One free port.
pub fn take() -> u16 {
    take_run(1)
}

/// `N` free ports (not necessarily consecutive), e.g. `let [proxy, admin] = ports::take_each();`.
pub fn take_each<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| take())
}

/// `count` consecutive free ports; returns the first. Panics if [`RANGE`] has no such run
/// left (a test asking for thousands of ports is a bug in the test).
pub fn take_run(count: u16) -> u16 {
    assert!(
        count > 0 && count < RANGE.len() as u16 / 4,
        "take_run({count})"
    );
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let span = RANGE.end - RANGE.start;
    let mut start = next.unwrap_or_else(|| RANGE.start + (std::process::id() % span as u32) as u16);
    // Every start point at most once: a full lap without a free run means there is none.
    for _ in 0..span {
        if start + count > RANGE.end {
            start = RANGE.start;
        }
        match (start..start + count).find(|&p| !is_free(p)) {
            None => {
                *next = Some(start + count);
                return start;
            }
            Some(busy) => start = busy + 1,
        }
    }
    panic!("no {count} consecutive free ports left in {RANGE:?}");
}

/// Whether nothing listens on `port`: it can be bound on 0.0.0.0 and on [::] (a host without
/// IPv6 only checks IPv4).
fn is_free(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok();
    v4 && match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = take();
            assert!(RANGE.contains(&p));
            assert!(seen.insert(p), "port {p} handed out twice");
        }
        let first = take_run(10);
        for p in first..first + 10 {
            assert!(seen.insert(p), "port {p} handed out twice");
        }
    }

    #[test]
    fn a_port_someone_listens_on_is_skipped() {
        let first = take_run(3);
        // Hold the port the allocator would hand out next, then ask again.
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, first + 3));
        let next = take();
        if held.is_ok() {
            assert_ne!(next, first + 3, "a port in use was handed out");
        }
        assert!(!(first..first + 3).contains(&next));
    }
}
