//! The kernel's own view of a TCP connection, read with `getsockopt(TCP_INFO)` on the proxy's
//! sockets just before they close: one syscall per socket, no eBPF program on the hot path.
//!
//! `libc::tcp_info` stops before `tcpi_delivery_rate` (Linux 4.9), so the prefix of the
//! kernel's `struct tcp_info` we need is declared here. The kernel copies
//! `min(optlen, sizeof)` bytes and returns the length it wrote, which tells which fields an
//! older kernel filled in.

use std::{mem, os::fd::AsRawFd};

use serde::Serialize;

/// What the access log and the TCP histograms carry for one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcpStats {
    /// Smoothed round-trip time, microseconds.
    pub srtt_us: u32,
    /// Lowest RTT seen on the connection, microseconds.
    pub min_rtt_us: u32,
    /// Segments retransmitted over the connection's lifetime.
    pub retransmits: u32,
    /// Most recent delivery-rate estimate, bytes per second (Linux ≥ 4.9).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_rate_bytes_per_sec: Option<u64>,
}

/// `struct tcp_info` from `linux/tcp.h`, up to `tcpi_delivery_rate`.
#[repr(C)]
#[derive(Default)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
}

/// Reads TCP_INFO from a TCP socket; `None` if the kernel refuses (not a TCP socket).
pub fn read(socket: &impl AsRawFd) -> Option<TcpStats> {
    let mut info = RawTcpInfo::default();
    let mut len = mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is a plain repr(C) struct of `len` bytes; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut RawTcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let has = |end: usize| len as usize >= end;
    let min_rtt_end = mem::offset_of!(RawTcpInfo, min_rtt) + 4;
    let rate_end = mem::offset_of!(RawTcpInfo, delivery_rate) + 8;
    Some(TcpStats {
        srtt_us: info.rtt,
        min_rtt_us: if has(min_rtt_end) { info.min_rtt } else { 0 },
        retransmits: info.total_retrans,
        delivery_rate_bytes_per_sec: has(rate_end).then_some(info.delivery_rate),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernel_uapi() {
        // Offsets from linux/tcp.h (stable UAPI).
        assert_eq!(mem::offset_of!(RawTcpInfo, rto), 8);
        assert_eq!(mem::offset_of!(RawTcpInfo, rtt), 68);
        assert_eq!(mem::offset_of!(RawTcpInfo, total_retrans), 100);
        assert_eq!(mem::offset_of!(RawTcpInfo, pacing_rate), 104);
        assert_eq!(mem::offset_of!(RawTcpInfo, min_rtt), 148);
        assert_eq!(mem::offset_of!(RawTcpInfo, delivery_rate), 160);
    }

    #[test]
    fn reads_a_real_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let stats = read(&client).expect("TCP_INFO on a TCP socket");
        assert_eq!(stats.retransmits, 0);
        assert!(
            stats.delivery_rate_bytes_per_sec.is_some(),
            "kernel ≥ 4.9 reports it"
        );
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(read(&file).is_none(), "not a socket");
    }
}
