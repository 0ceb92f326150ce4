//! The socket syscalls the socket kinds share: integer options, names, and reading a
//! receive queue without consuming it.
//!
//! Peeking is done on a `pidfd_getfd` copy, which is the target's very socket: the
//! peek offset (`SO_PEEK_OFF`) crd steps through the queue with is the target's own, so
//! it is put back as it was, whatever happens. Files in flight come out of a peek as new
//! fds in crd (the kernel duplicates them, it does not move them): they are handed to
//! the caller, never leaked.
use std::{
    io::IoSlice,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
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
///
/// The call is made here rather than through `nix::sys::socket::recvmsg`, which hands
/// back its address buffer as initialised whatever the kernel wrote: the kernel writes
/// no address at all (`msg_namelen` 0) for a unix datagram from an unbound sender, as
/// a socketpair's end is, and nix 0.30 then returns uninitialised stack bytes as the
/// sender (nix-rust/nix#2177). Whatever stack bytes happened to say AF_INET became a
/// datagram's "sender" in the image, so two checkpoints of one unchanged queue differed.
/// Here the buffer starts zeroed and only the `msg_namelen` bytes the kernel wrote are
/// read.
fn peek_one(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    carried: &mut Vec<OwnedFd>,
) -> Result<(usize, u32, Option<std::net::SocketAddr>), KindError> {
    let mut space = nix::cmsg_space!([RawFd; 253]);
    // SAFETY: sockaddr_storage is plain old data, valid all zero.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain old data, valid all zero (no name, no iovec, no control);
    // its fields are filled in below (their integer types differ between libcs, hence
    // the inferred casts).
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = (&raw mut name).cast();
    header.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = space.as_mut_ptr().cast();
    header.msg_controllen = space.len() as _;
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: every pointer in `header` points at a live buffer of the length it gives
    // (`name`, `iov` over `buf`, `space`), all outliving the call; the kernel writes at
    // most those lengths and updates them.
    let got = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut header, flags) };
    if got < 0 {
        return Err(SyscallError::last("recvmsg(MSG_PEEK)").into());
    }
    let mut fds = 0u32;
    // SAFETY: `header` is the one recvmsg just filled: its control pointer and length
    // describe the part of `space` the kernel wrote, which CMSG_FIRSTHDR/CMSG_NXTHDR
    // walk without leaving it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&header) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies inside `space`.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure computation of the header's size.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (c.cmsg_len as usize).saturating_sub(head) / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points just past this header, inside `space`.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` fds after the header (cmsg_len says
                // so); they need not be aligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed this fd in crd for this message; nothing
                // else owns it.
                carried.push(unsafe { OwnedFd::from_raw_fd(raw) });
                fds += 1;
            }
        }
        // SAFETY: as CMSG_FIRSTHDR above: `header` and `cmsg` describe `space`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&header, cmsg) };
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(KindError::Other("a queued message carries more control data than crd reads".into()));
    }
    if header.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(KindError::Other(format!("a queued datagram is larger than {MAX_DATAGRAM} bytes")));
    }
    Ok((got as usize, fds, sender(&name, header.msg_namelen)))
}

/// The sender's address recvmsg wrote into `name`, from the `len` bytes it says it
/// wrote: an IPv4 or IPv6 address; None for any other family (a unix sender's name is
/// not kept) and for none at all (`len` 0: a unix datagram from an unbound socket).
fn sender(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    let family = i32::from(name.ss_family);
    if family == libc::AF_INET && len >= std::mem::size_of::<libc::sockaddr_in>() {
        // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr, and
        // the kernel wrote a whole sockaddr_in (family and length checked).
        let v4 = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        let ip = Ipv4Addr::from(v4.sin_addr.s_addr.to_ne_bytes());
        return Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(v4.sin_port))));
    }
    if family == libc::AF_INET6 && len >= std::mem::size_of::<libc::sockaddr_in6>() {
        // SAFETY: as above, for a whole sockaddr_in6.
        let v6 = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
        let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
        return Some(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(v6.sin6_port),
            v6.sin6_flowinfo,
            v6.sin6_scope_id,
        )));
    }
    None
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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    /// A connected pair of unix sockets of `sock_type`; socketpair's ends are unbound,
    /// so a datagram between them has no sender address.
    fn pair(sock_type: i32) -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array we pass.
        let ret =
            unsafe { libc::socketpair(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        assert_eq!(ret, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel just returned both fds; nothing else owns them.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Leaves the stack below the caller full of bytes that read, at every 8-byte
    /// boundary, as an IPv4 address (AF_INET, port 0x0909, 9.9.9.9): what any
    /// uninitialised address buffer a later call puts there will hold.
    #[inline(never)]
    fn paint_stack() {
        let mut area = [0u8; 256 * 1024];
        let family = (libc::AF_INET as libc::sa_family_t).to_ne_bytes();
        let pattern = [family[0], family[1], 9, 9, 9, 9, 9, 9];
        // By address, not by index: the array itself need not start on a boundary.
        let base = area.as_ptr() as usize;
        for (i, byte) in area.iter_mut().enumerate() {
            *byte = pattern[(base + i) % 8];
        }
        std::hint::black_box(&mut area);
    }

    /// The regression behind the round-trip property's BPF-vs-/proc difference: a
    /// datagram from an unbound unix socket has no sender, and its peek says so, whatever
    /// the stack held before (nix's recvmsg returned the stale bytes as the sender, and
    /// two checkpoints of one queue differed). Each datagram's bytes are read in place:
    /// they are all still there to receive after the walk.
    #[test]
    fn a_unix_datagram_from_an_unbound_socket_has_no_sender_whatever_the_stack_held() {
        for sock_type in [libc::SOCK_DGRAM, libc::SOCK_SEQPACKET] {
            let (a, b) = pair(sock_type);
            for m in [&b"one"[..], b"", b"three"] {
                // SAFETY: send reads `m.len()` bytes from a live slice.
                let sent = unsafe { libc::send(a.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
                assert_eq!(sent, m.len() as isize);
            }
            let mut carried = Vec::new();
            paint_stack();
            let queue = peek_queue(b.as_fd(), Walk::Datagrams, &mut carried).expect("the queue is peeked");
            let got: Vec<(&[u8], Option<std::net::SocketAddr>)> =
                queue.iter().map(|m| (&m.data[..], m.from)).collect();
            assert_eq!(got, [(&b"one"[..], None), (b"", None), (b"three", None)], "type {sock_type}");
            assert!(carried.is_empty());
        }
    }
}
