//! Inspect: an image as text (a table for people), JSON (for scripts) or DOT (a
//! Graphviz picture of the objref graph).
//!
//! Sockets are shown with what the graph nests in them (see [`Object::tied`] and
//! [`Object::carried`]): the objects each is tied to — a unix socket's peer and its
//! listener, the socket a queued datagram came from — and the files in flight in its
//! queue, which no fd table holds and which restore sends again.
use std::{collections::BTreeMap, fmt::Write};

use crate::{
    graph::{Encounter, Graph, GraphIndex, Object},
    image::ImageBody,
    kinds::Tie,
    types::{Fd, ObjRef, Pid},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Dot,
}

pub fn render(body: &ImageBody, format: Format) -> String {
    match format {
        Format::Text => text(body),
        Format::Json => serde_json::to_string_pretty(body).unwrap_or_default() + "\n",
        Format::Dot => dot(&body.graph),
    }
}

fn object_detail(object: &Object) -> String {
    let mut s = object.name();
    if let Some(detail) = object.state.detail() {
        s.push(' ');
        s.push_str(&detail);
    }
    if object.held_outside {
        s.push_str(" EXTERNAL");
    }
    s
}

fn first_or_ref<T>(e: &Encounter<T>) -> String {
    match e {
        Encounter::First { objref, .. } => objref.to_string(),
        Encounter::Again(objref) => format!("{objref}*"),
    }
}

fn text(body: &ImageBody) -> String {
    let h = &body.header;
    let g = &body.graph;
    let index = g.index();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "crd image: root PID {}{}, {} tasks; source {}, kernel {}, crd {}, created {} (unix time)",
        g.root,
        if h.tree { " with descendants" } else { "" },
        g.tasks.len(),
        h.source,
        h.kernel_release,
        h.crd_version,
        h.created
    );
    let _ = writeln!(out, "\n{:>8} {:>8} {:>8}  {:<16} FD TABLE", "PID", "TGID", "PARENT", "COMM");
    for t in &g.tasks {
        let _ = writeln!(
            out,
            "{:>8} {:>8} {:>8}  {:<16} {}",
            t.pid,
            t.tgid,
            t.parent,
            t.comm,
            first_or_ref(&t.fd_table)
        );
    }
    // Job control, per process (its leader thread), as restore recreates it.
    let known: Vec<_> = g.tasks.iter().filter(|t| t.pid.0 == t.tgid.0 && t.session.sid != 0).collect();
    if !known.is_empty() {
        let _ = writeln!(
            out,
            "\nsessions (old PIDs; restore recreates them where their leaders are in the image):"
        );
        for t in known {
            let s = &t.session;
            let terminal = match s.tty {
                Some(tty) if (136..=143).contains(&tty.major) => {
                    format!(
                        "terminal /dev/pts/{} (foreground group {})",
                        (tty.major - 136) * 256 + tty.minor,
                        s.foreground
                    )
                }
                Some(tty) => format!("terminal {tty} (foreground group {})", s.foreground),
                None => "no terminal".into(),
            };
            let _ = writeln!(out, "  PID {}: session {}, group {}, {terminal}", t.tgid, s.sid, s.pgid);
        }
    }
    let _ = writeln!(out, "\n(#N: object saved here; #N*: a later reference to it)");
    for t in &g.tasks {
        let Encounter::First { objref, object: table } = &t.fd_table else {
            continue;
        };
        let _ = writeln!(out, "\nfd table {objref} of PID {} ({} fds)", t.tgid, table.fds.len());
        let _ = writeln!(
            out,
            "{:>6} {:>4} {:>6} {:>3} {:>8} {:>10} {:>6} {:<7} NAME",
            "FD", "CLOE", "FILE", "ACC", "FLAGS", "POS", "OBJECT", "KIND"
        );
        for slot in &table.fds {
            let file = index.files.get(&slot.file.objref());
            let (acc, flags, pos, object_ref, outside) = match file {
                Some(f) if slot.file.first().is_some() => (
                    f.access.to_string(),
                    format!("{:o}", f.flags),
                    f.pos.to_string(),
                    first_or_ref(&f.object),
                    f.held_outside,
                ),
                Some(f) => (
                    f.access.to_string(),
                    format!("{:o}", f.flags),
                    f.pos.to_string(),
                    f.object.objref().to_string(),
                    f.held_outside,
                ),
                None => ("?".into(), "?".into(), "?".into(), "?".into(), false),
            };
            let object = file.and_then(|f| index.objects.get(&f.object.objref()));
            let _ = writeln!(
                out,
                "{:>6} {:>4} {:>6} {:>3} {:>8} {:>10} {:>6} {:<7} {}{}",
                slot.fd,
                if slot.close_on_exec { "yes" } else { "-" },
                first_or_ref(&slot.file),
                acc,
                flags,
                pos,
                object_ref,
                object.map(|o| o.kind().to_string()).unwrap_or_default(),
                object.map(object_detail).unwrap_or_default(),
                if outside { "  (description held outside)" } else { "" }
            );
        }
    }
    let shared: Vec<_> = g.users().into_iter().filter(|(_, users)| users.len() > 1).collect();
    if !shared.is_empty() {
        let _ = writeln!(out, "\nshared objects:");
        for (objref, users) in shared {
            let what = if index.files.contains_key(&objref) {
                "open file".to_string()
            } else if let Some(object) = index.objects.get(&objref) {
                object.kind().to_string()
            } else {
                "fd table".to_string()
            };
            let list: Vec<String> = users
                .iter()
                .map(|(pid, fd)| match fd {
                    Some(fd) => format!("{pid}:{fd}"),
                    None => format!("thread {pid}"),
                })
                .collect();
            let _ = writeln!(out, "  {objref:>5} {what:<10} {}", list.join(", "));
        }
    }
    ties_and_flight(&mut out, &index, &g.users());
    let outside = g.held_outside();
    if !outside.is_empty() {
        let _ = writeln!(out, "\nexternal (shared with processes outside the image):");
        for line in outside {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// How a tie is said: `peer`, `listener`, `sender`.
fn tie_label(tie: &Tie) -> &'static str {
    match tie {
        Tie::Peer(_) => "peer",
        Tie::Listener(_) => "listener",
        Tie::Address(_) => "sender",
        Tie::Pty(end) if end.master => "master",
        Tie::Pty(_) => "slave",
    }
}

/// What a tie names when the graph did not find it (not in the image).
fn tie_target(tie: &Tie) -> String {
    match tie {
        Tie::Peer(ino) => format!("socket:[{ino}]"),
        Tie::Listener(name) => name.to_string(),
        Tie::Address(addr) => addr.to_string(),
        Tie::Pty(end) if end.master => format!("pty {} master", end.index),
        Tie::Pty(end) => format!("/dev/pts/{}", end.index),
    }
}

/// The section on objects that nest others: each with its ties (objref, what it is,
/// the PID:FDs holding it) and the files in flight in it (objref, access, what they
/// open). Files in flight are the only place an image names a file no fd holds.
fn ties_and_flight(
    out: &mut String,
    index: &GraphIndex<'_>,
    users: &BTreeMap<ObjRef, Vec<(Pid, Option<Fd>)>>,
) {
    let nesting: Vec<_> =
        index.objects.iter().filter(|(_, o)| !o.state.ties().is_empty() || !o.carried.is_empty()).collect();
    if nesting.is_empty() {
        return;
    }
    let held_by = |objref: &ObjRef| {
        let fds: Vec<String> = users
            .get(objref)
            .into_iter()
            .flatten()
            .filter_map(|(pid, fd)| fd.map(|fd| format!("{pid}:{fd}")))
            .collect();
        if fds.is_empty() { "no fd".to_string() } else { fds.join(", ") }
    };
    // Sockets (peers, listeners, files in flight), epolls (the files they watch) and
    // pty ends (the other end).
    let _ = writeln!(out, "\nnesting: what each object is tied to, and the files it carries:");
    for (objref, object) in nesting {
        let _ =
            writeln!(out, "  {objref} {} {} ({})", object.kind(), object_detail(object), held_by(&objref));
        for (tie, found) in object.ties() {
            let what = match found.and_then(|r| index.objects.get(&r).map(|o| (r, o))) {
                Some((r, o)) => format!("{r} {} {} ({})", o.kind(), o.name(), held_by(&r)),
                None => format!("{}: not in the image", tie_target(&tie)),
            };
            let _ = writeln!(out, "    {:<9} {what}", tie_label(&tie));
        }
        for file in &object.carried {
            let what = match index.open(file.objref()) {
                Some((desc, inner, o)) => {
                    format!(
                        "file {} ({}) of {inner} {} {}",
                        file.objref(),
                        desc.access,
                        o.kind(),
                        object_detail(o)
                    )
                }
                None => format!("file {}", file.objref()),
            };
            let _ = writeln!(out, "    {:<9} {what}", object.kind().carried_label());
        }
    }
}

fn dot(g: &Graph) -> String {
    let index = g.index();
    let mut out = String::from("digraph crd {\n  rankdir=LR;\n  node [fontname=\"monospace\"];\n");
    for t in &g.tasks {
        let _ = writeln!(
            out,
            "  task{} [shape=box,label=\"{} {}\\npid {}\"];",
            t.pid,
            t.comm.replace('"', "'"),
            t.tgid,
            t.pid
        );
        let _ = writeln!(out, "  task{} -> obj{};", t.pid, t.fd_table.objref().0);
        if let Encounter::First { objref, object } = &t.fd_table {
            let _ = writeln!(out, "  obj{} [shape=folder,label=\"fd table {objref}\"];", objref.0);
            for slot in &object.fds {
                let _ = writeln!(
                    out,
                    "  obj{} -> obj{} [label=\"fd {}\"];",
                    objref.0,
                    slot.file.objref().0,
                    slot.fd
                );
            }
        }
    }
    for (objref, file) in index.files.iter() {
        let _ = writeln!(
            out,
            "  obj{} [shape=ellipse,label=\"file {objref}\\n{} pos {}\"{}];",
            objref.0,
            file.access,
            file.pos,
            if file.held_outside { ",color=red" } else { "" }
        );
        let _ = writeln!(out, "  obj{} -> obj{};", objref.0, file.object.objref().0);
    }
    for (objref, object) in index.objects.iter() {
        let _ = writeln!(
            out,
            "  obj{} [shape=note,label=\"{} {objref}\\n{}\"{}];",
            objref.0,
            object.kind(),
            object_detail(object).replace('"', "'"),
            if object.held_outside { ",color=red" } else { "" }
        );
        // Ties are not ownership: dashed, so the fd → file → object paths stand out.
        for (tie, found) in object.ties() {
            if let Some(target) = found {
                let _ = writeln!(
                    out,
                    "  obj{} -> obj{} [style=dashed,label=\"{}\"];",
                    objref.0,
                    target.0,
                    tie_label(&tie)
                );
            }
        }
        for file in &object.carried {
            let _ = writeln!(
                out,
                "  obj{} -> obj{} [color=blue,label=\"{}\"];",
                objref.0,
                file.objref().0,
                object.kind().carried_label()
            );
        }
    }
    out.push_str("}\n");
    out
}
