//! The socket syscalls the socket kinds share: integer options, names, and reading a
//! receive queue without consuming it.
//!
//! Peeking is done on a `pidfd_getfd` copy, which is the target's very socket: the
//! peek offset (`SO_PEEK_OFF`) crd steps through the queue with is the target's own, so
//! it is put back as it was, whatever happens. Files in flight come out of a peek as new
//! fds in crd (the kernel duplicates them, it does not move them): they are handed to
//! the caller, never leaked.
use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use super::KindError;
use crate::sys::SyscallError;

/// An integer socket option.
pub fn get_int(fd: BorrowedFd<'_>, level: i32, name: i32, call: &'static str) -> Result<i32, KindError> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the int we pass and updates len.
    let ret = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast(), &mut len) };
    if ret < 0 {
        return Err(SyscallError::last(call).into());
    }
    Ok(value)
}

pub fn set_int(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: i32,
    call: &'static str,
) -> Result<(), KindError> {
    // SAFETY: setsockopt reads one int from the pointer we pass.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(SyscallError::last(call).into());
    }
    Ok(())
}

/// A new socket, close-on-exec.
pub fn socket(family: i32, sock_type: i32) -> Result<OwnedFd, KindError> {
    // SAFETY: plain syscall with integer arguments.
    let raw = unsafe { libc::socket(family, sock_type | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(SyscallError::last("socket").into());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Receive and send buffer sizes, as getsockopt reports them (the kernel doubles what
/// setsockopt asks for; restore asks for half with the FORCE variants, so the sizes
/// come back equal whatever the sysctl limits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffers {
    pub rcvbuf: i32,
    pub sndbuf: i32,
}

impl Buffers {
    pub fn read(fd: BorrowedFd<'_>) -> Result<Self, KindError> {
        Ok(Buffers {
            rcvbuf: get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, "getsockopt(SO_RCVBUF)")?,
            sndbuf: get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "getsockopt(SO_SNDBUF)")?,
        })
    }

    pub fn apply(&self, fd: BorrowedFd<'_>) -> Result<(), KindError> {
        if self.rcvbuf > 0 {
            set_int(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                self.rcvbuf / 2,
                "setsockopt(SO_RCVBUFFORCE)",
            )?;
        }
        if self.sndbuf > 0 {
            set_int(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                self.sndbuf / 2,
                "setsockopt(SO_SNDBUFFORCE)",
            )?;
        }
        Ok(())
    }
}

/// One message of a receive queue: its bytes and how many files it carries (the files
/// themselves are the object's carried files, in queue order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub data: Vec<u8>,
    pub fds: u32,
    /// Who sent a datagram, where the socket reports it (UDP: the source address).
    pub from: Option<std::net::SocketAddr>,
}

/// How a queue is walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// A byte stream: peek exactly the bytes FIONREAD counts (peeking past them blocks
    /// when a message with files is queued, even with MSG_DONTWAIT); a message carrying
    /// files ends a peek, so each such message comes out on its own.
    Stream,
    /// Datagrams: one peek per datagram until the queue is empty (FIONREAD counts only
    /// the first).
    Datagrams,
    /// The datagrams of a SEQPACKET socket shut for reading (its peer closed, or
    /// `shutdown(SHUT_RD)`): once its queue is empty a peek reads end of file (0 bytes)
    /// instead of failing with EAGAIN, again and again, so a 0-byte peek without files
    /// ends the walk. (A zero-length message queued there ends it too; the caller's
    /// count of queued messages tells the two apart.)
    ShutSeqpacket,
}

/// The biggest datagram peeked (a bigger one is an error, not a silent truncation).
const MAX_DATAGRAM: usize = 4 << 20;
/// At most this many messages are walked (a queue cannot hold more without filling
/// its receive buffer many times over).
const MAX_MESSAGES: usize = 1 << 20;

/// Reads a receive queue without consuming it (see the module documentation). Files in
/// flight are pushed onto `carried`, in queue order.
pub fn peek_queue(
    fd: BorrowedFd<'_>,
    walk: Walk,
    carried: &mut Vec<OwnedFd>,
) -> Result<Vec<Message>, KindError> {
    let old = get_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, "getsockopt(SO_PEEK_OFF)")?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0, "setsockopt(SO_PEEK_OFF)")?;
    let walked = match walk {
        Walk::Stream => peek_stream(fd, carried),
        Walk::Datagrams => peek_datagrams(fd, carried, false),
        Walk::ShutSeqpacket => peek_datagrams(fd, carried, true),
    };
    // The target's own peek offset, back as it was, whatever the walk did.
    let restored = set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old, "setsockopt(SO_PEEK_OFF)");
    let messages = walked?;
    restored?;
    Ok(messages)
}

/// Bytes ready to read (`FIONREAD`/`SIOCINQ`).
pub fn inq(fd: BorrowedFd<'_>) -> Result<usize, KindError> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if ret < 0 {
        return Err(SyscallError::last("ioctl(FIONREAD)").into());
    }
    Ok(n.max(0) as usize)
}

fn peek_stream(fd: BorrowedFd<'_>, carried: &mut Vec<OwnedFd>) -> Result<Vec<Message>, KindError> {
    let total = inq(fd)?;
    let mut buf = vec![0u8; total];
    let mut got = 0;
    let mut messages = Vec::new();
    while got < total {
        let (n, fds, _) = peek_one(fd, &mut buf[got..], carried)?;
        if n == 0 {
            return Err(KindError::Other(format!(
                "its queue ended after {got} of the {total} bytes the kernel counted"
            )));
        }
        messages.push(Message { data: buf[got..got + n].to_vec(), fds, from: None });
        got += n;
    }
    Ok(merge_plain(messages))
}

/// Joins consecutive stream chunks that carry no files (a peek may stop at any skb).
fn merge_plain(messages: Vec<Message>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    for m in messages {
        match out.last_mut() {
            Some(last) if last.fds == 0 && m.fds == 0 => last.data.extend_from_slice(&m.data),
            _ => out.push(m),
        }
    }
    out
}

/// `zero_is_end`: a 0-byte peek without files is end of file (see [`Walk::ShutSeqpacket`]).
fn peek_datagrams(
    fd: BorrowedFd<'_>,
    carried: &mut Vec<OwnedFd>,
    zero_is_end: bool,
) -> Result<Vec<Message>, KindError> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut messages = Vec::new();
    loop {
        if messages.len() >= MAX_MESSAGES {
            return Err(KindError::Other(format!("its queue holds more than {MAX_MESSAGES} datagrams")));
        }
        match peek_one(fd, &mut buf, carried) {
            Ok((0, 0, _)) if zero_is_end => return Ok(messages),
            Ok((n, fds, from)) => messages.push(Message { data: buf[..n].to_vec(), fds, from }),
            Err(KindError::Syscall(e)) if e.errno() == Some(libc::EAGAIN) => return Ok(messages),
            Err(e) => return Err(e),
        }
    }
}

/// One peek: bytes, files in flight (pushed onto `carried`), and the sender's address.
fn peek_one(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    carried: &mut Vec<OwnedFd>,
) -> Result<(usize, u32, Option<std::net::SocketAddr>), KindError> {
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd(), &mut iov, Some(&mut space), flags)
        .map_err(|e| KindError::errno("recvmsg(MSG_PEEK)", e))?;
    let mut fds = 0u32;
    let mut cmsgs = msg.cmsgs().map_err(|e| KindError::errno("recvmsg(MSG_PEEK) control messages", e))?;
    for cmsg in &mut cmsgs {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for raw in received {
                // SAFETY: the kernel installed this fd in crd for this message; nothing
                // else owns it.
                carried.push(unsafe { OwnedFd::from_raw_fd(raw) });
                fds += 1;
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(KindError::Other("a queued message carries more control data than crd reads".into()));
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(KindError::Other(format!("a queued datagram is larger than {MAX_DATAGRAM} bytes")));
    }
    let from = msg.address.and_then(|a: nix::sys::socket::SockaddrStorage| {
        if let Some(v4) = a.as_sockaddr_in() {
            Some(std::net::SocketAddr::V4((*v4).into()))
        } else {
            a.as_sockaddr_in6().map(|v6| std::net::SocketAddr::V6((*v6).into()))
        }
    });
    Ok((msg.bytes, fds, from))
}

/// Sends one message (with its files) without blocking: the queue it refills had room
/// for it once, so a full queue is an error to report, not to wait on.
pub fn send(fd: BorrowedFd<'_>, message: &Message, files: &[BorrowedFd<'_>]) -> Result<(), KindError> {
    let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(&message.data)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let sent = sendmsg::<()>(fd.as_raw_fd(), &iov, control, flags, None)
        .map_err(|e| KindError::errno("sendmsg", e))?;
    if sent != message.data.len() {
        return Err(KindError::Other(format!(
            "only {sent} of a message's {} bytes went back into its queue",
            message.data.len()
        )));
    }
    Ok(())
}
