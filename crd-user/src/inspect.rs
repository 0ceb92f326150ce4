//! Inspect: an image as text (a table for people), JSON (for scripts) or DOT (a
//! Graphviz picture of the objref graph).
use std::fmt::Write;

use crate::{
    graph::{Encounter, FileDesc, Graph, Inode},
    image::ImageBody,
    types::ObjRef,
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

/// Objects by objref, from their first encounters.
struct Objects<'a> {
    files: std::collections::BTreeMap<ObjRef, &'a FileDesc>,
    inodes: std::collections::BTreeMap<ObjRef, &'a Inode>,
}

impl<'a> Objects<'a> {
    fn of(graph: &'a Graph) -> Self {
        let mut files = std::collections::BTreeMap::new();
        let mut inodes = std::collections::BTreeMap::new();
        for (_, slot) in graph.slots() {
            if let Encounter::First { objref, object } = &slot.file {
                files.insert(*objref, object);
                if let Encounter::First { objref, object } = &object.inode {
                    inodes.insert(*objref, object);
                }
            }
        }
        Self { files, inodes }
    }
}

fn inode_detail(inode: &Inode) -> String {
    let mut s = match &inode.path {
        Some(p) => p.clone(),
        None => format!("{}:[{}]", inode.kind, inode.ino),
    };
    if let Some(pipe) = &inode.pipe {
        let _ = write!(s, " capacity {} queued {}", pipe.capacity, pipe.data.len());
        if pipe.held_outside {
            s.push_str(" EXTERNAL");
        }
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
    let objects = Objects::of(g);
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
    let _ = writeln!(out, "\n(#N: object saved here; #N*: a later reference to it)");
    for t in &g.tasks {
        let Encounter::First { objref, object: table } = &t.fd_table else {
            continue;
        };
        let _ = writeln!(out, "\nfd table {objref} of PID {} ({} fds)", t.tgid, table.fds.len());
        let _ = writeln!(
            out,
            "{:>6} {:>4} {:>6} {:>3} {:>8} {:>10} {:>6} {:<6} OBJECT",
            "FD", "CLOE", "FILE", "ACC", "FLAGS", "POS", "INODE", "KIND"
        );
        for slot in &table.fds {
            let file = objects.files.get(&slot.file.objref());
            let (acc, flags, pos, inode_ref, outside) = match file {
                Some(f) if slot.file.first().is_some() => (
                    f.access.to_string(),
                    format!("{:o}", f.flags),
                    f.pos.to_string(),
                    first_or_ref(&f.inode),
                    f.held_outside,
                ),
                Some(f) => (
                    f.access.to_string(),
                    format!("{:o}", f.flags),
                    f.pos.to_string(),
                    f.inode.objref().to_string(),
                    f.held_outside,
                ),
                None => ("?".into(), "?".into(), "?".into(), "?".into(), false),
            };
            let inode = file.and_then(|f| objects.inodes.get(&f.inode.objref()));
            let _ = writeln!(
                out,
                "{:>6} {:>4} {:>6} {:>3} {:>8} {:>10} {:>6} {:<6} {}{}",
                slot.fd,
                if slot.close_on_exec { "yes" } else { "-" },
                first_or_ref(&slot.file),
                acc,
                flags,
                pos,
                inode_ref,
                inode.map(|i| i.kind.to_string()).unwrap_or_default(),
                inode.map(|i| inode_detail(i)).unwrap_or_default(),
                if outside { "  (description held outside)" } else { "" }
            );
        }
    }
    let shared: Vec<_> = g.users().into_iter().filter(|(_, users)| users.len() > 1).collect();
    if !shared.is_empty() {
        let _ = writeln!(out, "\nshared objects:");
        for (objref, users) in shared {
            let what = if objects.files.contains_key(&objref) {
                "open file".to_string()
            } else if let Some(inode) = objects.inodes.get(&objref) {
                inode.kind.to_string()
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
    let outside = g.held_outside();
    if !outside.is_empty() {
        let _ = writeln!(out, "\nexternal (shared with processes outside the image):");
        for line in outside {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn dot(g: &Graph) -> String {
    let objects = Objects::of(g);
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
    for (objref, file) in &objects.files {
        let _ = writeln!(
            out,
            "  obj{} [shape=ellipse,label=\"file {objref}\\n{} pos {}\"{}];",
            objref.0,
            file.access,
            file.pos,
            if file.held_outside { ",color=red" } else { "" }
        );
        let _ = writeln!(out, "  obj{} -> obj{};", objref.0, file.inode.objref().0);
    }
    for (objref, inode) in &objects.inodes {
        let outside = inode.pipe.as_ref().is_some_and(|p| p.held_outside);
        let _ = writeln!(
            out,
            "  obj{} [shape=note,label=\"{} {objref}\\n{}\"{}];",
            objref.0,
            inode.kind,
            inode_detail(inode).replace('"', "'"),
            if outside { ",color=red" } else { "" }
        );
    }
    out.push_str("}\n");
    out
}
