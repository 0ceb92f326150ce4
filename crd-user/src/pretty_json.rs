//! JSON laid out exactly as `serde_json::to_writer_pretty` lays it out (two spaces a
//! level), each line break and its indentation written in one piece.
//!
//! `crd ls --all --json` at 100,000 fds is ~2.4 million lines; serde_json's own pretty
//! formatter writes a line's indentation two bytes at a time, one `write_all` per level,
//! which made writing the document the largest part of the command after the harvest.
use std::io;

use serde::Serialize;
use serde_json::ser::Formatter;

/// Writes `value` to `out` as pretty JSON (no final newline), byte for byte what
/// `serde_json::to_writer_pretty` writes.
pub fn to_writer<W: io::Write>(out: W, value: &impl Serialize) -> serde_json::Result<()> {
    value.serialize(&mut serde_json::Serializer::with_formatter(out, Pretty::default()))
}

/// A line break then the indentation of up to `DEEPEST` levels, after a comma.
const DEEPEST: usize = 32;
const BREAKS: [u8; 2 + 2 * DEEPEST] = {
    let mut bytes = [b' '; 2 + 2 * DEEPEST];
    bytes[0] = b',';
    bytes[1] = b'\n';
    bytes
};

#[derive(Default)]
struct Pretty {
    depth: usize,
    has_value: bool,
}

impl Pretty {
    /// A line break (after a comma unless `first`) and the indentation of this depth.
    fn line<W: ?Sized + io::Write>(&self, out: &mut W, comma: bool) -> io::Result<()> {
        let start = if comma { 0 } else { 1 };
        if self.depth <= DEEPEST {
            return out.write_all(&BREAKS[start..2 + 2 * self.depth]);
        }
        out.write_all(&BREAKS[start..2])?;
        for _ in 0..self.depth {
            out.write_all(b"  ")?;
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, out: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        out.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, out: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.line(out, false)?;
        }
        out.write_all(bracket)
    }
}

// Scalars (numbers, strings and their escapes) are the trait's own, as in serde_json's
// `PrettyFormatter`; only the layout methods differ.
impl Formatter for Pretty {
    fn begin_array<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        self.open(out, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        self.close(out, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(&mut self, out: &mut W, first: bool) -> io::Result<()> {
        self.line(out, !first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _out: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        self.open(out, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        self.close(out, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, out: &mut W, first: bool) -> io::Result<()> {
        self.line(out, !first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        out.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _out: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_serde_jsons_pretty_one_byte_for_byte() {
        let deep = (0..40)
            .fold(serde_json::json!("leaf"), |inner, i| serde_json::json!({ format!("k{i}"): [inner, i] }));
        let values = [
            serde_json::json!({}),
            serde_json::json!([]),
            serde_json::json!({"a": [], "b": {}, "c": [1, 2, {"d": null}], "e": "x\n\"y\"", "f": -1.5}),
            serde_json::json!([[[]], [{}], {"z": [true, false]}]),
            deep,
        ];
        for value in values {
            let mut ours = Vec::new();
            to_writer(&mut ours, &value).unwrap();
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string_pretty(&value).unwrap());
        }
    }
}
