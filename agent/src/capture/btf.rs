//! Just enough of a BTF reader to find struct member offsets in the running kernel.
//!
//! The kernel programs are plain Rust without CO-RE relocations, so the few kernel struct
//! offsets they need (the syscall capture source walks a task's file table to find a file
//! descriptor's socket; both sources read a socket's local port) are looked up here in
//! `/sys/kernel/btf/vmlinux` and handed to them through the `LAYOUT` map. Anonymous structs and
//! unions are searched through, as the kernel nests many members in them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    /// Bit offset.
    offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// Size, or the referenced type for typedef / const / volatile / pointer.
    size_or_type: u32,
    members: Vec<Member>,
}

/// Parsed type information of one BTF blob.
pub struct Btf {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("reading BTF from {}", path.display()))?;
        Self::parse(&data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let u16_at = |at: usize| -> Result<u16> {
            Ok(u16::from_le_bytes(data.get(at..at + 2).context("truncated BTF")?.try_into()?))
        };
        let u32_at = |at: usize| -> Result<u32> {
            Ok(u32::from_le_bytes(data.get(at..at + 4).context("truncated BTF")?.try_into()?))
        };
        if u16_at(0)? != MAGIC {
            bail!("not BTF (bad magic; big-endian BTF is not supported)");
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();

        let mut types = vec![Type { name: 0, kind: 0, size_or_type: 0, members: Vec::new() }];
        let mut at = hdr_len + type_off;
        let end = at + type_len;
        while at < end {
            let name = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let size_or_type = u32_at(at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            let mut members = Vec::new();
            at += match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let raw = u32_at(m + 8)?;
                        // With kflag, the low 24 bits are the bit offset, the high 8 a
                        // bitfield size.
                        let offset = if kflag { raw & 0x00ff_ffff } else { raw };
                        members.push(Member { name: u32_at(m)?, type_id: u32_at(m + 4)?, offset });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
                _ => 0,
            };
            types.push(Type { name, kind, size_or_type, members });
        }
        if at != end {
            bail!("BTF type section does not end on a type boundary");
        }
        let mut btf = Btf { types, strings, structs_by_name: HashMap::new() };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && !t.members.is_empty() {
                let name = btf.name(t.name).to_string();
                if !name.is_empty() {
                    btf.structs_by_name.entry(name).or_insert(id as u32);
                }
            }
        }
        Ok(btf)
    }

    fn name(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or(&[]);
        let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..len]).unwrap_or("")
    }

    /// Follow typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type,
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of `member` in the type `id`, searching anonymous structs and unions.
    fn member_bits(&self, id: u32, member: &str, depth: usize) -> Option<u32> {
        let t = self.resolve(id)?;
        if depth > 8 || (t.kind != KIND_STRUCT && t.kind != KIND_UNION) {
            return None;
        }
        for m in &t.members {
            let name = self.name(m.name);
            if name == member {
                return Some(m.offset);
            }
            if name.is_empty()
                && let Some(inner) = self.member_bits(m.type_id, member, depth + 1)
            {
                return Some(m.offset + inner);
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name`.
    pub fn offset_of(&self, name: &str, member: &str) -> Result<u32> {
        let id = *self.structs_by_name.get(name).with_context(|| format!("BTF has no struct {name}"))?;
        let bits =
            self.member_bits(id, member, 0).with_context(|| format!("BTF: struct {name} has no member {member}"))?;
        if bits % 8 != 0 {
            bail!("BTF: {name}.{member} is a bitfield");
        }
        Ok(bits / 8)
    }
}

/// The struct offsets the kernel programs need, from the running kernel's BTF.
pub fn kernel_offsets(btf: &Btf) -> Result<vigie_common::KernelLayout> {
    Ok(vigie_common::KernelLayout {
        fd_walk: 1,
        task_files: btf.offset_of("task_struct", "files")?,
        files_fdt: btf.offset_of("files_struct", "fdt")?,
        fdt_max_fds: btf.offset_of("fdtable", "max_fds")?,
        fdt_fd: btf.offset_of("fdtable", "fd")?,
        file_inode: btf.offset_of("file", "f_inode")?,
        inode_mode: btf.offset_of("inode", "i_mode")?,
        file_private_data: btf.offset_of("file", "private_data")?,
        socket_type: btf.offset_of("socket", "type")?,
        socket_sk: btf.offset_of("socket", "sk")?,
        skc_family: btf.offset_of("sock_common", "skc_family")?,
        skc_num: btf.offset_of("sock_common", "skc_num")?,
        sk_socket: btf.offset_of("sock", "sk_socket")?,
        socket_file: btf.offset_of("socket", "file")?,
        sk_protocol: btf.offset_of("sock", "sk_protocol")?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets vigie has always assumed, checked against this machine's kernel.
    #[test]
    fn the_running_kernel_has_the_layout_vigie_assumes() {
        let btf = Btf::from_file(Path::new(VMLINUX)).expect("this machine's kernel has BTF");
        let layout = kernel_offsets(&btf).expect("every member is found");
        assert_eq!(layout.skc_num, 14);
        assert_eq!(layout.skc_family, 16);
        // Offsets are distinct where members are distinct.
        assert_ne!(layout.file_inode, layout.file_private_data);
        assert_ne!(layout.fdt_max_fds, layout.fdt_fd);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = Btf::parse(b"not btf at all, clearly").err().expect("refused");
        assert!(format!("{err:#}").contains("magic"), "{err:#}");
        assert!(Btf::parse(&[0x9f, 0xeb]).is_err());
    }
}
