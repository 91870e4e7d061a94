//! Just enough of a BTF reader to find a struct member's byte offset in the
//! running kernel (`/sys/kernel/btf/vmlinux`), so that the verdict reads the
//! TCP sequence number of an skb without hard-coded layout assumptions.
use std::{fs, io, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF: {0}")]
    Io(#[from] io::Error),
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {0} has no member {1}")]
    NoMember(String, String),
}

pub struct Btf {
    data: Vec<u8>,
    types: (usize, usize),
    strings: (usize, usize),
}

const KIND_STRUCT: u32 = 4;

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::parse(fs::read(Path::new("/sys/kernel/btf/vmlinux"))?)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let u32_at = |o: usize| -> Result<u32, BtfError> {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")))
                .ok_or(BtfError::Malformed("truncated header"))
        };
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types = (hdr_len + type_off, hdr_len + type_off + type_len);
        let strings = (hdr_len + str_off, hdr_len + str_off + str_len);
        if types.1 > data.len() || strings.1 > data.len() {
            return Err(BtfError::Malformed("sections past end of data"));
        }
        Ok(Self { data, types, strings })
    }

    fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.data[o..o + 4].try_into().expect("four bytes"))
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings.0 + off as usize;
        let rest = &self.data[start.min(self.strings.1)..self.strings.1];
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Start offsets of every type, indexed by type id (id 0 is void).
    fn type_offsets(&self) -> Result<Vec<usize>, BtfError> {
        let mut offs = vec![0];
        let mut o = self.types.0;
        while o + 12 <= self.types.1 {
            offs.push(o);
            let info = self.u32_at(o + 4);
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            o += 12 + extra;
        }
        Ok(offs)
    }

    /// Byte offset of `member` in `struct strukt`, looking into anonymous
    /// unions and structs as C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let offs = self.type_offsets()?;
        let id = (1..offs.len())
            .find(|&id| {
                let o = offs[id];
                (self.u32_at(o + 4) >> 24) & 0x1f == KIND_STRUCT && self.name(self.u32_at(o)) == strukt.as_bytes()
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        self.find_in(&offs, id, member, 0).ok_or_else(|| BtfError::NoMember(strukt.into(), member.into()))
    }

    fn find_in(&self, offs: &[usize], id: usize, member: &str, depth: u32) -> Option<u32> {
        let o = *offs.get(id)?;
        let info = self.u32_at(o + 4);
        let kind = (info >> 24) & 0x1f;
        if !(kind == 4 || kind == 5) || depth > 8 {
            return None;
        }
        let kind_flag = info >> 31 == 1;
        for m in 0..(info & 0xffff) as usize {
            let mo = o + 12 + m * 12;
            let raw = self.u32_at(mo + 8);
            let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
            let name = self.name(self.u32_at(mo));
            if name == member.as_bytes() {
                return Some(bits / 8);
            }
            if name.is_empty() {
                if let Some(inner) = self.find_in(offs, self.u32_at(mo + 4) as usize, member, depth + 1) {
                    return Some(bits / 8 + inner);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_sk_buff_cb_on_this_kernel() {
        let Ok(btf) = super::Btf::from_sys_fs() else {
            eprintln!("skipping: no /sys/kernel/btf/vmlinux on this host");
            return;
        };
        let cb = btf.member_offset("sk_buff", "cb").unwrap();
        assert!(cb > 0 && cb < 256, "implausible sk_buff.cb offset {cb}");
        assert_eq!(btf.member_offset("tcp_skb_cb", "seq").unwrap(), 0);
        assert!(btf.member_offset("sk_buff", "no_such_member").is_err());
        // `sk` sits in an anonymous union of sk_buff.
        let sk = btf.member_offset("sk_buff", "sk").unwrap();
        assert!(sk > 0 && sk < cb, "implausible sk_buff.sk offset {sk}");
        let acked = btf.member_offset("tcp_sock", "bytes_acked").unwrap();
        assert!(acked > 1000 && acked < 4096, "implausible tcp_sock.bytes_acked offset {acked}");
    }
}
