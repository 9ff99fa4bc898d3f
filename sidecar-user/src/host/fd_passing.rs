//! Descriptors passed with a request on the agent's registration socket (`SCM_RIGHTS`).
//!
//! The pod's sidecar sends its outbound listeners with its register line, so the agent, which
//! has CAP_NET_ADMIN, can check them and mark them as the proxy's
//! (`sidecar_common::flags::CHECK_LISTENER`). Passing is what any process may do; taking them
//! with `pidfd_getfd(2)` instead would need CAP_SYS_PTRACE over every pod's sidecar, which the
//! agent is deliberately not given.
//!
//! Descriptors travel with the first byte of the line they were sent with, and a `read()`
//! (as opposed to `recvmsg()`) silently closes them: the agent reads every connection through
//! [`FdReader`].

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, Interest, ReadBuf},
    net::{UnixStream, unix::OwnedReadHalf},
};

/// Most descriptors one request carries (the IPv4 and the IPv6 listener); more are closed
/// on arrival.
pub const MAX_FDS: usize = 2;

/// Room for one `SCM_RIGHTS` message of [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 64]);

fn control_len(fds: usize) -> usize {
    // SAFETY: a pure size computation.
    unsafe { libc::CMSG_SPACE((fds * size_of::<libc::c_int>()) as libc::c_uint) as usize }
}

/// Sends `line` on `stream` with `fds` attached to its first byte; returns how many bytes
/// went (the caller writes the rest as usual). Waits while the socket is full.
pub async fn send(stream: &UnixStream, line: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "1 to {MAX_FDS} descriptors may be passed ({} given)",
                fds.len()
            ),
        ));
    }
    loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || send_now(stream.as_fd(), line, fds)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            sent => return sent,
        }
    }
}

fn send_now(sock: BorrowedFd<'_>, line: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: line.as_ptr().cast_mut().cast(),
        iov_len: line.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control_len(fds.len()) as _;
    // SAFETY: the control buffer holds one cmsghdr with room for `fds` (checked against
    // MAX_FDS by the caller), so the header and its data stay inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<libc::c_int>()) as u32) as _;
        let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
        for (i, fd) in fds.iter().enumerate() {
            data.add(i).write_unaligned(fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` points at live buffers of the lengths it states.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The read half of a registration connection, read with `recvmsg` so the descriptors a
/// request brings are kept (at most [`MAX_FDS`] waiting at once) until
/// [`take`](Self::take)n.
pub struct FdReader {
    half: OwnedReadHalf,
    fds: Vec<OwnedFd>,
}

impl FdReader {
    pub fn new(half: OwnedReadHalf) -> Self {
        Self {
            half,
            fds: Vec::new(),
        }
    }

    /// The descriptors received so far: those of the request just read, as the sidecar sends
    /// each request only after the previous one was answered.
    pub fn take(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// The connection itself (e.g. to ask which network namespace it was made from).
    pub fn connection(&self) -> BorrowedFd<'_> {
        self.half.as_ref().as_fd()
    }
}

impl AsyncRead for FdReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.half.as_ref().poll_read_ready(cx))?;
            let stream = this.half.as_ref();
            let read = stream.try_io(Interest::READABLE, || {
                receive(stream.as_fd(), buf.initialize_unfilled(), &mut this.fds)
            });
            match read {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// One `recvmsg` into `buf`; descriptors that came with the bytes join `fds` (beyond
/// [`MAX_FDS`] waiting, they are closed; beyond the control buffer, the kernel closes them).
fn receive(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control_len(MAX_FDS) as _;
    // SAFETY: `msg` points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walks the control messages the kernel wrote, within `msg_controllen`; each
    // descriptor it installed is ours to own (and so to close).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..bytes / size_of::<libc::c_int>() {
                    let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if fds.len() < MAX_FDS {
                        fds.push(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    fn inode(fd: impl AsFd) -> (u64, u64) {
        let f = std::fs::File::from(fd.as_fd().try_clone_to_owned().unwrap());
        let m = f.metadata().unwrap();
        (m.dev(), m.ino())
    }

    /// The descriptors arrive with their line, are the very files sent, and bytes written
    /// without any come through as usual.
    #[tokio::test]
    async fn descriptors_arrive_with_their_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let files = [
            std::fs::File::open("/").unwrap(),
            std::fs::File::open("/proc").unwrap(),
        ];
        let sent = send(&a, b"first\n", &[files[0].as_fd(), files[1].as_fd()])
            .await
            .unwrap();
        assert_eq!(sent, 6);
        let (_keep, mut write) = a.into_split();
        write.write_all(b"second\n").await.unwrap();
        let (read, _w) = b.into_split();
        let mut reader = BufReader::new(FdReader::new(read));
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "first\n");
        let got = reader.get_mut().take();
        assert_eq!(got.len(), 2);
        assert_eq!(inode(&got[0]), inode(&files[0]));
        assert_eq!(inode(&got[1]), inode(&files[1]));
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "second\n");
        assert!(reader.get_mut().take().is_empty());
    }

    #[tokio::test]
    async fn more_than_max_fds_are_refused_at_the_sender() {
        let (a, _b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/").unwrap();
        let three = [f.as_fd(), f.as_fd(), f.as_fd()];
        assert!(send(&a, b"x\n", &three).await.is_err());
        assert!(send(&a, b"x\n", &[]).await.is_err());
    }
}
