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
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
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
        u32::from_le_bytes(self.data[o..o + 4].try_into().unwrap())
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings.0 + off as usize;
        let rest = &self.data[start.min(self.strings.1)..self.strings.1];
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Byte offset of `member` in `struct strukt` (a direct member).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let mut o = self.types.0;
        while o + 12 <= self.types.1 {
            let name_off = self.u32_at(o);
            let info = self.u32_at(o + 4);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let body = o + 12;
            let extra = match kind {
                1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
                3 => 12,              // ARRAY
                4 | 5 => vlen * 12,   // STRUCT, UNION
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            if kind == KIND_STRUCT && self.name(name_off) == strukt.as_bytes() {
                for m in 0..vlen {
                    let mo = body + m * 12;
                    if self.name(self.u32_at(mo)) == member.as_bytes() {
                        let raw = self.u32_at(mo + 8);
                        let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                        return Ok(bits / 8);
                    }
                }
                return Err(BtfError::NoMember(strukt.into(), member.into()));
            }
            o = body + extra;
        }
        Err(BtfError::NoStruct(strukt.into()))
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
    }
}
