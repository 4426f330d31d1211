//! The SSH hop's platform seam: every system call of its own is here.
//!
//! - [`send_fd`]: a file descriptor over a Unix socket (`SCM_RIGHTS`), as
//!   OpenSSH's `mm_send_fd` does: one byte of data carries one descriptor
//!   (any Unix).
//!
//! The master's end with keyhole (`PR_SET_PDEATHSIG` on Linux) is
//! [`crate::platform::child::end_with_parent`]'s, shared with `keyhole
//! connect`; elsewhere the master ends at keyhole's shutdown
//! ([`super::Bastion::shutdown`]) or when its handle is dropped.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Linux's `send` flag against SIGPIPE. macOS has none (it sets it per
/// socket); keyhole ignores SIGPIPE anyway, as every Rust program does, so
/// a gone peer is EPIPE either way.
#[cfg(any(target_os = "linux", target_os = "android"))]
const NO_SIGPIPE: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const NO_SIGPIPE: libc::c_int = 0;

/// Sends `fd` over `socket` (a connected Unix stream socket). May report
/// `WouldBlock` on a non-blocking socket: call it again when writable.
pub fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure computation on a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes we own, enough for one
    // cmsghdr with one int (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null
    // and CMSG_DATA has room for the descriptor.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    loop {
        // SAFETY: `msg` and everything it points at outlive the call.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, NO_SIGPIPE) };
        match sent {
            1 => return Ok(()),
            0 => return Err(io::ErrorKind::WriteZero.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    /// The descriptor arrives and is the same pipe: a byte written on our
    /// side comes out of the received one.
    #[test]
    fn a_descriptor_crosses_the_socket() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (mut near, far) = UnixStream::pair().expect("pair");
        send_fd(a.as_fd(), far.as_fd()).expect("sent");
        drop(far);
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut control = [0u64; 8];
        // SAFETY: test-only recvmsg into buffers we own.
        let fd = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            assert_eq!(libc::recvmsg(b.as_raw_fd(), &mut msg, 0), 1);
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null());
            assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
            OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
            ))
        };
        let mut received = UnixStream::from(fd);
        near.write_all(b"x").expect("write");
        let mut got = [0u8; 1];
        received.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"x");
    }
}
