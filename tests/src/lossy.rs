//! Lossy links: a tc classifier that drops a share of the segments on every
//! veth end, and the retransmits it causes.
use std::{fs, path::PathBuf};

use crate::*;

/// Lossy links: the `test-lossy` tc classifier on the ingress of every veth
/// end, dropping `per_mille`/1000 of the TCP segments that carry payload.
/// GSO is turned off on the links so one drop loses one MSS, not 64 KB.
pub struct LossyLinks {
    _programs: Vec<aya::Ebpf>,
}

impl Topology {
    pub fn make_lossy(&self, per_mille: u32) -> LossyLinks {
        let obj = std::env::var_os("GATEWAY_EBPF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_path("gateway-ebpf/target/bpfel-unknown-none/release"))
            .join("test-lossy");
        let bytes =
            fs::read(&obj).unwrap_or_else(|e| panic!("{}: {e} (cargo xtask build-ebpf builds it)", obj.display()));
        let mut programs = Vec::new();
        for (ns, devs) in [(&self.client, &["c0"][..]), (&self.gw, &["g0", "g1"][..]), (&self.backend, &["b0"][..])] {
            let bytes = bytes.clone();
            let devs: Vec<String> = devs.iter().map(|d| d.to_string()).collect();
            for d in &devs {
                sh(&["ip", "-n", ns, "link", "set", "dev", d, "gso_max_segs", "1"]);
            }
            programs.push(Self::in_ns(ns, move || {
                use aya::programs::{tc, SchedClassifier, TcAttachType};
                let mut ebpf = aya::Ebpf::load(&bytes).expect("load test-lossy");
                let mut loss: aya::maps::Array<_, u32> =
                    aya::maps::Array::try_from(ebpf.map_mut("LOSS").expect("LOSS map")).unwrap();
                loss.set(0, per_mille, 0).unwrap();
                let prog: &mut SchedClassifier = ebpf.program_mut("lossy").unwrap().try_into().unwrap();
                prog.load().unwrap();
                for d in &devs {
                    let _ = tc::qdisc_add_clsact(d);
                    prog.attach(d, TcAttachType::Ingress).unwrap_or_else(|e| panic!("attach to {d}: {e}"));
                }
                ebpf
            }));
        }
        LossyLinks { _programs: programs }
    }
}

/// TCP segments retransmitted so far by the sockets of namespace `ns`
/// (`RetransSegs` of its /proc/net/snmp).
pub fn tcp_retransmits(ns: &str) -> u64 {
    let out = Topology::cmd_in(ns, "cat").arg("/proc/net/snmp").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    let i = names.split_whitespace().position(|n| n == "RetransSegs").expect("RetransSegs");
    values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0)
}
