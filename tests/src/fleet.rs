//! A fleet's hosts and its etcd: a client, a backend, an etcd host and
//! several gateway nodes, each a network namespace on one LAN (a bridge in a
//! namespace of its own), and a real etcd cluster from Debian's
//! `etcd-server`, three members on the etcd host.
//!
//! ```text
//!   client 10.78.0.2   backend 10.78.0.3 (and 10.77.2.2)   etcd 10.78.0.10
//!   node i 10.78.0.(11+i) (and 10.77.2.(11+i), to reach the backend as in `Topology`)
//! ```
use std::{
    fs,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use crate::*;

pub const ETCD_IP: &str = "10.78.0.10";

pub struct FleetNet {
    lan: String,
    pub etcd: String,
    pub client: String,
    pub backend: String,
    pub nodes: Vec<String>,
}

impl FleetNet {
    pub fn new(nodes: usize) -> Self {
        privileged();
        let id = format!("gwt{}f{}", std::process::id(), NS_SEQ.fetch_add(1, Ordering::Relaxed));
        let net = FleetNet {
            lan: format!("{id}l"),
            etcd: format!("{id}e"),
            client: format!("{id}c"),
            backend: format!("{id}b"),
            nodes: (0..nodes).map(|i| format!("{id}n{i}")).collect(),
        };
        sh(&["ip", "netns", "add", &net.lan]);
        sh(&["ip", "-n", &net.lan, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &net.lan, "link", "set", "br0", "up"]);
        let mut hosts: Vec<(String, Vec<String>)> = vec![
            (net.client.clone(), vec!["10.78.0.2/24".into()]),
            (net.backend.clone(), vec!["10.78.0.3/24".into(), format!("{BACKEND_IP}/24")]),
            (net.etcd.clone(), vec![format!("{ETCD_IP}/24")]),
        ];
        for (i, n) in net.nodes.iter().enumerate() {
            hosts.push((n.clone(), vec![format!("10.78.0.{}/24", 11 + i), format!("10.77.2.{}/24", 11 + i)]));
        }
        for (k, (ns, addrs)) in hosts.iter().enumerate() {
            let port = format!("p{k}");
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&["ip", "link", "add", "e0", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &net.lan]);
            sh(&["ip", "-n", &net.lan, "link", "set", &port, "master", "br0"]);
            sh(&["ip", "-n", &net.lan, "link", "set", &port, "up"]);
            for a in addrs {
                sh(&["ip", "-n", ns, "addr", "add", a, "dev", "e0"]);
            }
            sh(&["ip", "-n", ns, "link", "set", "e0", "up"]);
        }
        net
    }

    /// Node `i` as a `Topology` (client, node, backend), for the daemon,
    /// backend and client helpers. Dropping it deletes nothing.
    pub fn topology(&self, i: usize) -> Topology {
        Topology { client: self.client.clone(), gw: self.nodes[i].clone(), backend: self.backend.clone(), owned: false }
    }

    pub fn node_ip(&self, i: usize) -> String {
        format!("10.78.0.{}", 11 + i)
    }

    /// Cuts node `i` off from etcd (and only from etcd), or joins it again.
    pub fn cut_off_etcd(&self, i: usize, cut: bool) {
        let op = if cut { "add" } else { "del" };
        sh(&["ip", "-n", &self.nodes[i], "route", op, "blackhole", &format!("{ETCD_IP}/32")]);
    }

    fn all(&self) -> Vec<&String> {
        let mut v = vec![&self.client, &self.backend, &self.etcd];
        v.extend(self.nodes.iter());
        v.push(&self.lan);
        v
    }
}

impl Drop for FleetNet {
    fn drop(&mut self) {
        for ns in self.all() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `n` distinct ports free on `ip` in namespace `ns` now (the kernel picks them).
fn free_ports(ns: &str, ip: &'static str, n: usize) -> Vec<u16> {
    Topology::in_ns(ns, move || {
        let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind((ip, 0)).unwrap()).collect();
        held.iter().map(|l| l.local_addr().unwrap().port()).collect()
    })
}

struct Member {
    name: String,
    client: u16,
    child: Option<Child>,
}

/// A three-member etcd cluster on the etcd host; stopped on drop.
pub struct EtcdCluster {
    ns: String,
    dir: PathBuf,
    members: Vec<Member>,
    initial: String,
    token: String,
    peers: Vec<u16>,
}

impl EtcdCluster {
    pub fn start(net: &FleetNet) -> Self {
        assert!(
            Command::new("etcd").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success()),
            "etcd not found (scripts/setup.sh installs etcd-server)"
        );
        let dir = temp_dir("etcd");
        let n = 3;
        // Six ports the kernel picks, held together so that none repeats;
        // nothing else runs on the etcd host to take them meanwhile.
        let ports = free_ports(&net.etcd, ETCD_IP, 2 * n);
        let (clients, peers) = (ports[..n].to_vec(), ports[n..].to_vec());
        let initial = (0..n).map(|i| format!("m{i}=http://{ETCD_IP}:{}", peers[i])).collect::<Vec<_>>().join(",");
        let mut c = EtcdCluster {
            ns: net.etcd.clone(),
            token: net.etcd.clone(),
            dir,
            members: (0..n).map(|i| Member { name: format!("m{i}"), client: clients[i], child: None }).collect(),
            initial,
            peers,
        };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_healthy(&[0, 1, 2]);
        c
    }

    fn start_member(&mut self, i: usize) {
        let m = &self.members[i];
        let log = fs::File::options().create(true).append(true).open(self.dir.join(format!("{}.log", m.name))).unwrap();
        let child = Topology::cmd_in(&self.ns, "etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .args(["--listen-client-urls", &format!("http://{ETCD_IP}:{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://{ETCD_IP}:{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://{ETCD_IP}:{}", self.peers[i])])
            .args(["--initial-advertise-peer-urls", &format!("http://{ETCD_IP}:{}", self.peers[i])])
            .args(["--initial-cluster", &self.initial, "--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new", "--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// Waits until each member in `which` answers that it is healthy.
    pub fn wait_healthy(&self, which: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for &i in which {
            loop {
                let ok = self.etcdctl(&["--endpoints", &self.endpoint(i), "endpoint", "health"]).0;
                if ok {
                    break;
                }
                assert!(Instant::now() < deadline, "etcd member m{i} not healthy after 30 s:\n{}", self.logs());
                thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{ETCD_IP}:{}", self.members[i].client)
    }

    /// The `endpoints` list for a node's `fleet.etcd`.
    pub fn endpoints_yaml(&self) -> String {
        let e: Vec<String> = (0..self.members.len()).map(|i| format!("\"{}\"", self.endpoint(i))).collect();
        format!("[{}]", e.join(", "))
    }

    /// Runs etcdctl against every member: (succeeded, stdout, stderr).
    pub fn etcdctl(&self, args: &[&str]) -> (bool, String, String) {
        let all: Vec<String> = (0..self.members.len()).map(|i| self.endpoint(i)).collect();
        let mut cmd = Topology::cmd_in(&self.ns, "etcdctl");
        if !args.contains(&"--endpoints") {
            cmd.args(["--endpoints", &all.join(",")]);
        }
        let out = cmd.args(["--command-timeout", "5s"]).args(args).output().expect("etcdctl");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// Freezes a member (SIGSTOP: its sockets stay open and silent, as a
    /// hung host's), or lets it go on (SIGCONT).
    pub fn pause(&self, i: usize, frozen: bool) {
        let child = self.members[i].child.as_ref().expect("running");
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: plain kill(2) of our own child (`ip netns exec` execs etcd).
        unsafe { libc::kill(child.id() as i32, sig) };
    }

    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Starts a stopped member again, on its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "m{i} is running");
        self.start_member(i);
    }

    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = fs::read_to_string(self.dir.join(format!("{}.log", m.name))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!("--- etcd {} ---\n{}", m.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if let Some(mut c) = self.members[i].child.take() {
                // SAFETY: plain kill(2) of our own child; a frozen one must go on to die.
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
