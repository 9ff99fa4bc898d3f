//! `agent-ask`: the registration socket of `sidecar agent`, seen from a pod.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::{IO_TIMEOUT, print_line};

pub fn ask(
    socket: &Path,
    lines: &[String],
    connections: usize,
    partial: Option<&str>,
    hold: bool,
    orphan: bool,
) -> ExitCode {
    match run(socket, lines, connections, partial, hold, orphan) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-ask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    socket: &Path,
    lines: &[String],
    connections: usize,
    partial: Option<&str>,
    hold: bool,
    orphan: bool,
) -> io::Result<()> {
    let mut streams = Vec::new();
    for conn in 0..connections {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        for line in lines {
            let answer = exchange(&s, line)?;
            print_line(&serde_json::json!({"conn": conn, "answer": answer}).to_string());
        }
        streams.push(s);
    }
    if let Some(text) = partial {
        for s in &mut streams {
            // A connection the agent refused at once may be closed already.
            let _ = s.write_all(text.as_bytes());
        }
        let started = Instant::now();
        for (conn, s) in streams.iter_mut().enumerate() {
            let mut rest = String::new();
            // EOF, or a reset (the agent closed before reading our bytes): closed either
            // way; only a read timeout means the connection is still open.
            let closed = match s.read_to_string(&mut rest) {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
            };
            print_line(
                &serde_json::json!({
                    "conn": conn,
                    "closed": closed,
                    "closed_after_secs": started.elapsed().as_secs_f64(),
                    "answer": rest.trim(),
                })
                .to_string(),
            );
        }
    }
    if hold {
        print_line(crate::READY);
        let _ = io::stdin().read_to_end(&mut Vec::new());
    }
    if orphan {
        forward_in_child(&streams[0])?;
    }
    Ok(())
}

/// Writes `line` and reads one answer line.
fn exchange(s: &UnixStream, line: &str) -> io::Result<String> {
    writeln!(&*s, "{line}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim().to_string())
}

/// Forks: this process (the one that connected) exits; the child keeps the connection
/// and forwards stdin lines on it. Single-threaded here, so the child may run Rust code.
fn forward_in_child(s: &UnixStream) -> io::Result<()> {
    // SAFETY: no other thread exists in this process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        print_line("HANDED");
        return Ok(());
    }
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    for line in io::stdin().lock().lines() {
        let answer = exchange(s, &line?).unwrap_or_else(|e| format!("error: {e}"));
        print_line(&serde_json::json!({"answer": answer}).to_string());
    }
    Ok(())
}
