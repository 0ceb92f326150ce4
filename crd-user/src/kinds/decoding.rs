//! Where in an image the decoder is, so that an object of a kind this crd does not know
//! is refused with the process and fd that hold it, on one line.
//!
//! The graph's `Task::tgid` and `FdSlot::fd` note themselves here as they are decoded
//! (`#[serde(deserialize_with)]`); a kind's state comes after both, so an unknown kind
//! name can say where it was found.
use std::cell::Cell;

use serde::{Deserialize, Deserializer};

use crate::types::{Fd, Tgid};

thread_local! {
    static AT: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
    /// The format version of the image being decoded.
    static FORMAT: Cell<u32> = const { Cell::new(u32::MAX) };
}

/// Notes the format version of the image about to be decoded on this thread.
pub fn set_format(version: u32) {
    FORMAT.with(|f| f.set(version));
}

/// Decodes a field that format 3 added (an object's ties and the files it carries):
/// an older image does not hold it, so nothing is read and the field is empty. The
/// body's fields are positional, so this is all an older layout needs.
pub fn since_v3<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    if FORMAT.with(Cell::get) < 3 {
        return Ok(T::default());
    }
    T::deserialize(d)
}

/// Decodes a field that format 4 added (an established TCP connection's repair state):
/// an older image does not hold it, so nothing is read and the field is empty.
pub fn since_v4<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    if FORMAT.with(Cell::get) < 4 {
        return Ok(T::default());
    }
    T::deserialize(d)
}

/// Decodes a field that format 5 added (a task's session, a terminal's state): an
/// older image does not hold it, so nothing is read and the field is empty.
pub fn since_v5<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    if FORMAT.with(Cell::get) < 5 {
        return Ok(T::default());
    }
    T::deserialize(d)
}

/// Marks an error message as "unknown kind" for the image layer (the decoder's error
/// may wrap the message in more text: the message lies between the two marks).
pub const UNKNOWN_KIND: &str = "unknown kind: ";
/// Ends an "unknown kind" message.
pub const UNKNOWN_KIND_END: &str = " [end]";

/// Decodes a task's tgid and remembers it.
pub fn tgid<'de, D: Deserializer<'de>>(d: D) -> Result<Tgid, D::Error> {
    let tgid = Tgid::deserialize(d)?;
    AT.with(|at| at.set((tgid.0, at.get().1)));
    Ok(tgid)
}

/// Decodes an fd number and remembers it.
pub fn fd<'de, D: Deserializer<'de>>(d: D) -> Result<Fd, D::Error> {
    let fd = Fd::deserialize(d)?;
    AT.with(|at| at.set((at.get().0, fd.0)));
    Ok(fd)
}

/// The message for an object of kind `name` that this crd does not know.
pub fn unknown_kind(name: &str) -> String {
    let (tgid, fd) = AT.with(Cell::get);
    format!(
        "{UNKNOWN_KIND}PID {tgid} fd {fd} holds an object of kind `{name}`, a kind this crd does not know{UNKNOWN_KIND_END}"
    )
}
