//! The BTF ids of the names crd looks up, found in one pass over the kernel's types.
//!
//! btf-rs finds a name by decoding every type of the BTF (about 150,000 in a distribution
//! kernel), and crd asks for some 25 names (the structs whose fields the BPF programs
//! read, the iterators' functions, `bpf_func_id`...): 25 scans were a third of the CPU
//! time of a small `crd ls`, more than aya's own parse of the same BTF. This walks the
//! type section once, reading only each type's header, and keeps the ids of the names
//! asked for; any other name is still found by btf-rs.
use std::collections::HashMap;

/// `BTF_MAGIC` as a native-endian `u16`; BTF of the other byte order is left to btf-rs.
const BTF_MAGIC: u16 = 0xeb9f;
/// `sizeof(struct btf_type)`: name offset, info, size or type.
const TYPE_HEADER: usize = 12;

/// The ids of a fixed set of names (every id of each, in id order: a name may be both a
/// struct and a typedef, or a forward declaration and its definition).
#[derive(Debug, Default)]
pub struct NameIndex {
    ids: HashMap<&'static str, Vec<u32>>,
}

impl NameIndex {
    /// Indexes `wanted` in the BTF `bytes`. None if the bytes are not BTF this walk reads
    /// (another byte order, a version or kind it does not know, a truncated section):
    /// the caller then looks names up through btf-rs.
    pub fn build(bytes: &[u8], wanted: &[&'static str]) -> Option<NameIndex> {
        let u16_at = |at: usize| Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
        let u32_at = |at: usize| Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
        if u16_at(0)? != BTF_MAGIC || *bytes.get(2)? != 1 {
            return None;
        }
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types = header_len.checked_add(type_off)?;
        let types_end = types.checked_add(type_len)?;
        let strings = bytes.get(header_len.checked_add(str_off)?..)?.get(..str_len)?;
        if types_end > bytes.len() {
            return None;
        }
        let by_name: HashMap<&[u8], &'static str> = wanted.iter().map(|w| (w.as_bytes(), *w)).collect();
        let longest = wanted.iter().map(|w| w.len()).max().unwrap_or(0);
        let mut ids: HashMap<&'static str, Vec<u32>> = wanted.iter().map(|w| (*w, Vec::new())).collect();
        let (mut at, mut id) = (types, 1u32);
        while at < types_end {
            let name_off = u32_at(at)? as usize;
            let info = u32_at(at + 4)?;
            if name_off != 0 {
                // The name, without reading further than the longest wanted one.
                let rest = strings.get(name_off..)?;
                let window = &rest[..rest.len().min(longest + 1)];
                if let Some(end) = window.iter().position(|&b| b == 0)
                    && let Some(name) = by_name.get(&window[..end])
                {
                    ids.get_mut(name)?.push(id);
                }
            }
            at += TYPE_HEADER + trailer_len(info)?;
            id += 1;
        }
        (at == types_end).then_some(NameIndex { ids })
    }

    /// The ids of `name`, if it was one of the wanted names (`Some(&[])`: not in the BTF).
    pub fn ids(&self, name: &str) -> Option<&[u32]> {
        self.ids.get(name).map(Vec::as_slice)
    }
}

/// The bytes that follow a type's header, by its kind (`BTF_KIND_*`, bits 24-28 of
/// `info`) and member count (`vlen`, bits 0-15), as the kernel's `btf_type_size` has
/// them. None for a kind this walk does not know (a newer kernel's): the walk stops.
fn trailer_len(info: u32) -> Option<usize> {
    let vlen = (info & 0xffff) as usize;
    Some(match (info >> 24) & 0x1f {
        // INT: its encoding; VAR: its linkage; DECL_TAG: its component index.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
        2 | 7..=12 | 16 | 18 => 0,
        // ARRAY: element type, index type, length.
        3 => 12,
        // STRUCT and UNION members, DATASEC variables, ENUM64 values: 12 bytes each.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM values and FUNC_PROTO parameters: 8 bytes each.
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob of `types` (each a header and its trailer) over `strings`.
    fn blob(types: &[(u32, u32, &[u8])], strings: &[u8]) -> Vec<u8> {
        let mut section = Vec::new();
        for (name_off, info, trailer) in types {
            section.extend_from_slice(&name_off.to_ne_bytes());
            section.extend_from_slice(&info.to_ne_bytes());
            section.extend_from_slice(&0u32.to_ne_bytes());
            section.extend_from_slice(trailer);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, section.len() as u32, section.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&section);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn every_id_of_each_wanted_name_is_found_across_kinds_of_every_size() {
        let strings = b"\0file\0int\0files\0fil\0";
        let kind = |k: u32, vlen: u32| (k << 24) | vlen;
        let b = blob(
            &[
                (6, kind(1, 0), &[0; 4]),    // 1: int
                (1, kind(7, 0), &[]),        // 2: fwd file
                (0, kind(4, 2), &[0; 24]),   // 3: anonymous struct of two members
                (10, kind(4, 0), &[]),       // 4: struct files
                (0, kind(13, 3), &[0; 24]),  // 5: a prototype of three parameters
                (1, kind(4, 1), &[0; 12]),   // 6: struct file
                (16, kind(19, 2), &[0; 24]), // 7: enum64 fil
                (1, kind(8, 0), &[]),        // 8: typedef file
            ],
            strings,
        );
        let index = NameIndex::build(&b, &["file", "files", "missing"]).expect("the blob is read");
        assert_eq!(index.ids("file"), Some(&[2, 6, 8][..]));
        assert_eq!(index.ids("files"), Some(&[4][..]), "a longer name is another name");
        assert_eq!(index.ids("missing"), Some(&[][..]));
        assert_eq!(index.ids("int"), None, "a name not asked for is not answered");
    }

    #[test]
    fn bytes_it_cannot_walk_are_left_to_btf_rs() {
        let good = blob(&[(1, 1 << 24, &[0; 4])], b"\0int\0");
        assert!(NameIndex::build(&good, &["int"]).is_some());
        let mut other_order = good.clone();
        other_order.swap(0, 1);
        assert!(NameIndex::build(&other_order, &["int"]).is_none());
        let unknown_kind = blob(&[(1, 31 << 24, &[0; 4])], b"\0int\0");
        assert!(NameIndex::build(&unknown_kind, &["int"]).is_none());
        assert!(NameIndex::build(&good[..good.len() - 8], &["int"]).is_none(), "truncated");
    }

    /// On the running kernel, the index agrees with btf-rs's own look-up.
    #[test]
    fn the_kernel_btf_index_agrees_with_btf_rs() {
        let Ok(bytes) = std::fs::read(super::super::offsets::VMLINUX_BTF) else { return };
        let names = ["task_struct", "file", "bpf_iter_task_file", "bpf_func_id", "sock"];
        let index = NameIndex::build(&bytes, &names).expect("the kernel's BTF is read");
        let btf = btf_rs::Btf::from_bytes(&bytes).unwrap();
        for name in names {
            assert_eq!(index.ids(name).unwrap(), btf.resolve_ids_by_name(name).unwrap(), "{name}");
            assert!(!index.ids(name).unwrap().is_empty(), "{name}");
        }
    }
}
