//! Kernel struct field offsets: declared once, in one table, from which come the
//! `.rodata` struct the BPF programs read ([`Offsets`]), its zero placeholder
//! ([`Offsets::ZERO`]) and the list userspace resolves against the running kernel's BTF
//! ([`Offsets::FIELDS`]), each with the load width the BPF side uses.
//!
//! Rust eBPF emits no CO-RE relocations: this table is what CO-RE would do. A field is
//! a member path inside a struct (`f_path.dentry` walks an embedded struct); several
//! paths mean "the first that exists" (fields get renamed across kernel versions).

/// Which part of crd needs a field: without a [`FieldGroup::Core`] field the BPF harvester
/// cannot run at all; without a kind's field, only that kind degrades to opaque.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldGroup {
    /// Tasks, fd tables, files, inodes, superblocks and pipes.
    Core,
    /// Dentry names of anon-inode and shmem files ([`crate::KIND_NAMED`]).
    Named,
    /// `eventfd_ctx` ([`crate::KIND_EVENTFD`]).
    Eventfd,
    /// `shmem_inode_info` ([`crate::KIND_SHMEM`]).
    Shmem,
    /// `socket`, `sock`, `unix_sock`, `unix_address` ([`crate::KIND_SOCKET`]).
    Socket,
    /// `eventpoll`, `epitem`, `rb_node` ([`crate::KIND_EPOLL`]): without them an epoll's
    /// interest list is read from fdinfo.
    Epoll,
    /// `timerfd_ctx`, `hrtimer`, `hrtimer_clock_base` ([`crate::KIND_TIMERFD`]).
    Timerfd,
    /// `signalfd_ctx` ([`crate::KIND_SIGNALFD`]).
    Signalfd,
}

/// One declared field.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub group: FieldGroup,
    /// Name of the [`Offsets`] member.
    pub name: &'static str,
    /// The kernel struct.
    pub structure: &'static str,
    /// Candidate member paths, first match wins (`a.b`: member `b` of embedded `a`).
    pub paths: &'static [&'static str],
    /// Bytes the BPF program loads: the member's size in BTF must be exactly this
    /// (0: an embedded struct, of which only the address is used).
    pub width: u32,
}

macro_rules! offsets {
    ($($group:ident { $($name:ident: $structure:literal [$($path:literal),+] $width:literal,)* })*) => {
        /// Byte offsets of kernel struct fields, resolved in userspace from the running
        /// kernel's BTF and handed to the BPF programs as a read-only global.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Offsets {
            $($(
                #[doc = concat!("`", $structure, "::", $($path, " ",)+ "` (", stringify!($width), " bytes)")]
                pub $name: u32,
            )*)*
        }

        impl Offsets {
            /// Every offset zero: the placeholder in the BPF object.
            pub const ZERO: Self = Self { $($($name: 0,)*)* };

            /// Every field the BPF programs read, in declaration order.
            pub const FIELDS: &'static [Field] = &[
                $($(Field {
                    group: FieldGroup::$group,
                    name: stringify!($name),
                    structure: $structure,
                    paths: &[$($path),+],
                    width: $width,
                },)*)*
            ];

            /// The member named `name` (one of [`Self::FIELDS`]).
            pub fn get_mut(&mut self, name: &str) -> Option<&mut u32> {
                match name {
                    $($(stringify!($name) => Some(&mut self.$name),)*)*
                    _ => None,
                }
            }
        }
    };
}

offsets! {
    Core {
        task_pid: "task_struct" ["pid"] 4,
        task_tgid: "task_struct" ["tgid"] 4,
        task_real_parent: "task_struct" ["real_parent"] 8,
        task_comm: "task_struct" ["comm"] 16,
        task_files: "task_struct" ["files"] 8,
        task_group_leader: "task_struct" ["group_leader"] 8,
        files_fdt: "files_struct" ["fdt"] 8,
        fdtable_close_on_exec: "fdtable" ["close_on_exec"] 8,
        fdtable_max_fds: "fdtable" ["max_fds"] 4,
        fdtable_fd: "fdtable" ["fd"] 8,
        file_f_flags: "file" ["f_flags"] 4,
        file_f_mode: "file" ["f_mode"] 4,
        file_f_pos: "file" ["f_pos"] 8,
        file_f_inode: "file" ["f_inode"] 8,
        // 6.13 replaced `atomic_long_t f_count` by `file_ref_t f_ref`.
        file_f_ref: "file" ["f_ref", "f_count"] 8,
        inode_i_mode: "inode" ["i_mode"] 2,
        inode_i_ino: "inode" ["i_ino"] 8,
        inode_i_size: "inode" ["i_size"] 8,
        inode_i_sb: "inode" ["i_sb"] 8,
        inode_i_rdev: "inode" ["i_rdev"] 4,
        inode_i_pipe: "inode" ["i_pipe"] 8,
        sb_s_magic: "super_block" ["s_magic"] 8,
        sb_s_dev: "super_block" ["s_dev"] 4,
        pipe_head: "pipe_inode_info" ["head"] 4,
        pipe_tail: "pipe_inode_info" ["tail"] 4,
        pipe_ring_size: "pipe_inode_info" ["ring_size"] 4,
        pipe_max_usage: "pipe_inode_info" ["max_usage"] 4,
        pipe_readers: "pipe_inode_info" ["readers"] 4,
        pipe_writers: "pipe_inode_info" ["writers"] 4,
        pipe_bufs: "pipe_inode_info" ["bufs"] 8,
        pipe_buffer_len: "pipe_buffer" ["len"] 4,
    }
    Named {
        file_private_data: "file" ["private_data"] 8,
        file_dentry: "file" ["f_path.dentry"] 8,
        dentry_name: "dentry" ["d_name.name"] 8,
    }
    Eventfd {
        eventfd_count: "eventfd_ctx" ["count"] 8,
        eventfd_flags: "eventfd_ctx" ["flags"] 4,
    }
    Shmem {
        shmem_seals: "shmem_inode_info" ["seals"] 4,
        shmem_vfs_inode: "shmem_inode_info" ["vfs_inode"] 0,
    }
    Socket {
        // A sockfs file's `private_data` is its `struct socket` (sock_alloc_file). The
        // same member as `file_private_data`, declared again so that sockets do not
        // depend on the Named group.
        file_socket: "file" ["private_data"] 8,
        socket_sk: "socket" ["sk"] 8,
        sock_family: "sock" ["__sk_common.skc_family"] 2,
        sock_state: "sock" ["__sk_common.skc_state"] 1,
        // u16 since 5.6 (bitfields before); a bitfield never resolves (see harvest).
        sock_type: "sock" ["sk_type"] 2,
        sock_protocol: "sock" ["sk_protocol"] 2,
        sock_shutdown: "sock" ["sk_shutdown"] 1,
        sock_max_ack_backlog: "sock" ["sk_max_ack_backlog"] 4,
        sock_ack_backlog: "sock" ["sk_ack_backlog"] 4,
        sock_rqueue_len: "sock" ["sk_receive_queue.qlen"] 4,
        // inet: `sock_common` keeps them in anonymous unions and structs.
        sock_rcv_saddr: "sock" ["__sk_common.skc_rcv_saddr"] 4,
        sock_daddr: "sock" ["__sk_common.skc_daddr"] 4,
        sock_v6_rcv_saddr: "sock" ["__sk_common.skc_v6_rcv_saddr"] 16,
        sock_v6_daddr: "sock" ["__sk_common.skc_v6_daddr"] 16,
        sock_num: "sock" ["__sk_common.skc_num"] 2,
        sock_dport: "sock" ["__sk_common.skc_dport"] 2,
        // unix: `struct unix_sock` starts with its `struct sock`.
        unix_peer: "unix_sock" ["peer"] 8,
        unix_addr: "unix_sock" ["addr"] 8,
        unix_address_len: "unix_address" ["len"] 4,
        // `struct sockaddr_un name[]`: a flexible array, only its address is used.
        unix_address_name: "unix_address" ["name"] 0,
    }
    Epoll {
        // `struct rb_root_cached rbr`: the tree of items and its cached leftmost node,
        // where an in-order walk starts.
        eventpoll_leftmost: "eventpoll" ["rbr.rb_leftmost"] 8,
        // The parent pointer shares its word with the node's colour (the low 2 bits).
        rb_parent_color: "rb_node" ["__rb_parent_color"] 8,
        rb_right: "rb_node" ["rb_right"] 8,
        rb_left: "rb_node" ["rb_left"] 8,
        // `rbn` is in an anonymous union with the item's `rcu` head (the node's address
        // minus this is the item's).
        epitem_rbn: "epitem" ["rbn"] 0,
        epitem_file: "epitem" ["ffd.file"] 8,
        epitem_fd: "epitem" ["ffd.fd"] 4,
        // `struct epoll_event` is packed on x86-64: `data` sits 4 bytes in.
        epitem_events: "epitem" ["event.events"] 4,
        epitem_data: "epitem" ["event.data"] 8,
    }
    Timerfd {
        timerfd_clockid: "timerfd_ctx" ["clockid"] 4,
        timerfd_ticks: "timerfd_ctx" ["ticks"] 8,
        timerfd_settime_flags: "timerfd_ctx" ["settime_flags"] 2,
        timerfd_expired: "timerfd_ctx" ["expired"] 2,
        timerfd_tintv: "timerfd_ctx" ["tintv"] 8,
        // `union { struct hrtimer tmr; struct alarm alarm; } t`: an alarm clock's timer
        // is the alarm's own hrtimer, armed at the same expiry on the alarm's base clock.
        timerfd_tmr_expires: "timerfd_ctx" ["t.tmr.node.expires"] 8,
        timerfd_tmr_base: "timerfd_ctx" ["t.tmr.base"] 8,
        timerfd_alarm_expires: "timerfd_ctx" ["t.alarm.timer.node.expires"] 8,
        timerfd_alarm_base: "timerfd_ctx" ["t.alarm.timer.base"] 8,
        // How far the timer's clock is from CLOCK_MONOTONIC (0 for MONOTONIC itself).
        hrtimer_base_offset: "hrtimer_clock_base" ["offset"] 8,
    }
    Signalfd {
        // `sigset_t`: one 64-bit word on x86-64.
        signalfd_sigmask: "signalfd_ctx" ["sigmask"] 8,
    }
}
