//! The tunnel preamble: the first bytes the client's sidecar sends inside the mTLS stream,
//! telling the server's sidecar where the app was going.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "SC" (0x53 0x43)
//! 2       1     version = 1
//! 3       1     flags = 0 (reserved: a v1 reader refuses any bit set)
//! 4       2     body length N, big-endian, N <= 1024
//! 6       N     body: a sequence of TLV fields
//!                 type (1 byte) | length (1 byte) | value (length bytes)
//! ```
//!
//! Fields: type 0x01 ORIGINAL_DST (required, exactly once): 16-byte IPv6 address (IPv4 as
//! `::ffff:a.b.c.d`) then the port, big-endian: length 18. Types 0x02–0x7f are optional: a
//! reader skips the ones it does not know, which leaves room for future fields. Types
//! 0x80–0xff are critical: a reader that does not know one refuses the preamble.
//!
//! Anything else — wrong magic or version, a body over the limit, a truncated field, a
//! duplicate or missing ORIGINAL_DST — is refused. The reader never allocates more than the
//! limit, and [`read`] gives up after a deadline.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAGIC: [u8; 2] = *b"SC";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 6;
/// Largest body a reader accepts.
pub const MAX_BODY: usize = 1024;

const T_ORIGINAL_DST: u8 = 0x01;
const CRITICAL: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub original_dst: SocketAddr,
}

/// Why a preamble was refused; each has its own counter.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum PreambleError {
    #[error("malformed preamble: {0}")]
    Malformed(&'static str),
    #[error("preamble body of {0} bytes is over the {MAX_BODY}-byte limit")]
    Oversized(usize),
    #[error("preamble truncated: the stream ended inside it")]
    Truncated,
    #[error("preamble not received within the deadline")]
    Timeout,
}

impl PreambleError {
    /// Metric/report label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "preamble_malformed",
            Self::Oversized(_) => "preamble_oversized",
            Self::Truncated => "preamble_truncated",
            Self::Timeout => "preamble_timeout",
        }
    }
}

impl Preamble {
    pub fn encode(&self) -> Vec<u8> {
        let ip = match self.original_dst.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let mut body = vec![T_ORIGINAL_DST, 18];
        body.extend_from_slice(&ip.octets());
        body.extend_from_slice(&self.original_dst.port().to_be_bytes());
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(0);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Checks the fixed header and returns the body length it announces.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<usize, PreambleError> {
    if header[..2] != MAGIC {
        return Err(PreambleError::Malformed("bad magic"));
    }
    if header[2] != VERSION {
        return Err(PreambleError::Malformed("unsupported version"));
    }
    if header[3] != 0 {
        return Err(PreambleError::Malformed("reserved flags set"));
    }
    let len = u16::from_be_bytes([header[4], header[5]]) as usize;
    if len > MAX_BODY {
        return Err(PreambleError::Oversized(len));
    }
    Ok(len)
}

/// Parses a body (after [`decode_header`]).
pub fn decode_body(mut body: &[u8]) -> Result<Preamble, PreambleError> {
    let mut original_dst = None;
    while !body.is_empty() {
        let [kind, len, rest @ ..] = body else {
            return Err(PreambleError::Malformed("field header cut short"));
        };
        let len = *len as usize;
        if rest.len() < len {
            return Err(PreambleError::Malformed("field value cut short"));
        }
        let (value, next) = rest.split_at(len);
        match *kind {
            T_ORIGINAL_DST => {
                if original_dst.is_some() {
                    return Err(PreambleError::Malformed("duplicate ORIGINAL_DST"));
                }
                let v: &[u8; 18] = value
                    .try_into()
                    .map_err(|_| PreambleError::Malformed("ORIGINAL_DST must be 18 bytes"))?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&v[..16]);
                let v6 = Ipv6Addr::from(octets);
                let ip = v6
                    .to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6));
                let port = u16::from_be_bytes([v[16], v[17]]);
                if port == 0 {
                    return Err(PreambleError::Malformed("ORIGINAL_DST port 0"));
                }
                original_dst = Some(SocketAddr::new(ip, port));
            }
            k if k & CRITICAL != 0 => {
                return Err(PreambleError::Malformed("unknown critical field"));
            }
            _ => {} // unknown optional field: skipped
        }
        body = next;
    }
    original_dst
        .map(|original_dst| Preamble { original_dst })
        .ok_or(PreambleError::Malformed("no ORIGINAL_DST"))
}

/// Parses a complete preamble from a buffer; returns it and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<(Preamble, usize), PreambleError> {
    let header: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(PreambleError::Truncated)?;
    let len = decode_header(header)?;
    let body = buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(PreambleError::Truncated)?;
    Ok((decode_body(body)?, HEADER_LEN + len))
}

/// Reads exactly one preamble from the stream within `deadline`, never buffering more than
/// [`MAX_BODY`] bytes and never reading past its end (the app's bytes follow it).
pub async fn read<R: AsyncRead + Unpin>(
    reader: &mut R,
    deadline: Duration,
) -> Result<Preamble, PreambleError> {
    let read_all = async {
        let mut header = [0u8; HEADER_LEN];
        read_exact(reader, &mut header).await?;
        let len = decode_header(&header)?;
        let mut body = [0u8; MAX_BODY];
        read_exact(reader, &mut body[..len]).await?;
        decode_body(&body[..len])
    };
    tokio::time::timeout(deadline, read_all)
        .await
        .unwrap_or(Err(PreambleError::Timeout))
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<(), PreambleError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(PreambleError::Truncated),
        Err(_) => Err(PreambleError::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(s: &str) -> Preamble {
        Preamble {
            original_dst: s.parse().unwrap(),
        }
    }

    #[test]
    fn round_trips_both_families() {
        for s in ["10.1.2.3:8080", "[2001:db8::1]:443", "127.0.0.1:1"] {
            let p = dst(s);
            let bytes = p.encode();
            assert_eq!(decode(&bytes), Ok((p, bytes.len())));
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let bytes = dst("10.0.0.1:80").encode();
        assert_eq!(&bytes[..6], &[b'S', b'C', 1, 0, 0, 20]);
        assert_eq!(&bytes[6..8], &[0x01, 18]);
        assert_eq!(&bytes[8..20], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&bytes[20..24], &[10, 0, 0, 1]);
        assert_eq!(&bytes[24..26], &80u16.to_be_bytes());
    }

    #[test]
    fn skips_unknown_optional_fields_and_refuses_critical_ones() {
        let mut bytes = dst("10.0.0.1:80").encode();
        bytes.extend_from_slice(&[0x42, 3, 1, 2, 3]);
        let len = (bytes.len() - HEADER_LEN) as u16;
        bytes[4..6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&bytes).unwrap().0, dst("10.0.0.1:80"));
        let last = bytes.len() - 5;
        bytes[last] = 0x82;
        assert_eq!(
            decode(&bytes),
            Err(PreambleError::Malformed("unknown critical field"))
        );
    }

    #[test]
    fn refuses_bad_input() {
        let good = dst("10.0.0.1:80").encode();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        assert!(matches!(
            decode(&with(0, b'X')),
            Err(PreambleError::Malformed(_))
        ));
        assert!(matches!(
            decode(&with(2, 2)),
            Err(PreambleError::Malformed(_))
        ));
        assert!(matches!(
            decode(&with(3, 1)),
            Err(PreambleError::Malformed(_))
        ));
        assert_eq!(
            decode(&[b'S', b'C', 1, 0, 0xff, 0xff]),
            Err(PreambleError::Oversized(65535))
        );
        assert_eq!(decode(&good[..10]), Err(PreambleError::Truncated));
        assert_eq!(decode(&good[..3]), Err(PreambleError::Truncated));
        // Body without ORIGINAL_DST, duplicated, wrong length, port 0.
        assert!(decode(&[b'S', b'C', 1, 0, 0, 0]).is_err());
        let mut dup = good.clone();
        dup.extend_from_slice(&good[6..]);
        dup[4..6].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(
            decode(&dup),
            Err(PreambleError::Malformed("duplicate ORIGINAL_DST"))
        );
        assert!(matches!(
            decode(&with(7, 17)),
            Err(PreambleError::Malformed(_))
        ));
        let mut port0 = good.clone();
        port0[24] = 0;
        port0[25] = 0;
        assert_eq!(
            decode(&port0),
            Err(PreambleError::Malformed("ORIGINAL_DST port 0"))
        );
    }

    #[tokio::test]
    async fn reader_stops_at_the_end_of_the_preamble() {
        let mut bytes = dst("10.0.0.1:80").encode();
        bytes.extend_from_slice(b"app data");
        let mut cursor = std::io::Cursor::new(bytes);
        let p = read(&mut cursor, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p, dst("10.0.0.1:80"));
        let mut rest = Vec::new();
        cursor.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"app data");
    }

    #[tokio::test]
    async fn reader_times_out_on_a_silent_peer() {
        let (_tx, mut rx) = tokio::io::duplex(64);
        let r = read(&mut rx, Duration::from_millis(50)).await;
        assert_eq!(r, Err(PreambleError::Timeout));
    }
}
