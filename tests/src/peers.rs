//! Backends and third-party peers: the tests' own echo backend, Python
//! `websockets`, Node `ws`, curl, nginx, and sockets held open in a namespace.
use std::{
    fs,
    io::{self, BufRead, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::*;

/// A backend on the backend host: runs `handler` on a thread per connection.
pub struct Backend {
    pub addr: SocketAddr,
}

impl Backend {
    pub fn spawn(topo: &Topology, handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> Self {
        Self::serve(topo.backend_listener(), handler)
    }

    /// Serves `handler` on an existing listening socket.
    pub fn serve(l: TcpListener, handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> Self {
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { break };
                let h = handler.clone();
                thread::Builder::new().stack_size(256 * 1024).spawn(move || h(conn)).unwrap();
            }
        });
        Self { addr }
    }

    /// Echoes every byte and forwards half-close.
    pub fn echo(topo: &Topology) -> Self {
        Self::spawn(topo, |mut s| {
            let _ = echo_conn(&mut s);
        })
    }
}

/// A third-party peer process (Node `ws`, Python `websockets`) running in a
/// namespace; stopped on drop.
pub struct Peer {
    pub child: Child,
    pub addr: SocketAddr,
    what: String,
}

impl Peer {
    /// Starts `program args...` in `ns` and waits for its `READY <port>` line;
    /// the peer listens on `ip`.
    pub fn start(ns: &str, ip: &str, program: &str, args: &[&str]) -> Self {
        let what = format!("{program} {}", args.join(" "));
        let mut child = Topology::cmd_in(ns, program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e} (scripts/setup.sh installs the test peers)"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut lines = io::BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the peer never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(l))) => l,
            other => {
                let _ = child.kill();
                panic!("{what} did not print READY within 30 s: {other:?}");
            }
        };
        let port: u16 = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("{what}: expected \"READY <port>\", got {line:?}"));
        Self { child, addr: SocketAddr::new(ip.parse().unwrap(), port), what }
    }

    /// The Node app server (`tests/peers/node/server.js`) on the backend host.
    pub fn node_server(topo: &Topology, name: &str) -> Self {
        let script = repo_path("tests/peers/node/server.js");
        let listen = format!("{BACKEND_IP}:0");
        Self::start(&topo.backend, BACKEND_IP, "node", &[script.to_str().unwrap(), "--listen", &listen, "--name", name])
    }

    /// The Python `ssl` echo server on the backend host, serving `cert`/`key`.
    pub fn tls_echo_server(topo: &Topology, cert: &Path, key: &Path) -> Self {
        let script = repo_path("tests/peers/tls_echo_server.py");
        let listen = format!("{BACKEND_IP}:0");
        let args = [
            script.to_str().unwrap(),
            "--listen",
            &listen,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        Self::start(&topo.backend, BACKEND_IP, "python3", &args)
    }

    /// The Python `websockets` echo server on the backend host.
    pub fn python_server(topo: &Topology) -> Self {
        let script = repo_path("tests/peers/ws_echo_server.py");
        let listen = format!("{BACKEND_IP}:0");
        Self::start(&topo.backend, BACKEND_IP, "python3", &[script.to_str().unwrap(), "--listen", &listen])
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a short-lived peer (client) in `ns`, bounded by `timeout(1)`, and
/// returns its exit status, stdout and stderr.
pub fn run_peer(ns: &str, program: &str, args: &[&str], limit: Duration) -> (bool, String, String) {
    let secs = limit.as_secs().max(1).to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "timeout", &secs, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client peer (`program SCRIPT args...`, the script a path in the
/// repository) run in the client namespace: its last line, as JSON.
pub fn json_peer(topo: &Topology, program: &str, script: &str, args: &[&str]) -> Value {
    let path = repo_path(script);
    let mut all = vec![path.to_str().unwrap()];
    all.extend_from_slice(args);
    let (_, out, err) = run_peer(&topo.client, program, &all, Duration::from_secs(120));
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|_| panic!("{script} {args:?}: no JSON line\nstdout: {out}\nstderr: {err}"))
}

/// The Python `websockets` client (`tests/peers/ws_client.py`) in the client
/// namespace; returns its JSON line (which has `error` on failure).
pub fn py_client(topo: &Topology, args: &[&str]) -> Value {
    json_peer(topo, "python3", "tests/peers/ws_client.py", args)
}

/// The Node `ws` client (`tests/peers/node/client.js`) in the client namespace.
pub fn node_client(topo: &Topology, args: &[&str]) -> Value {
    json_peer(topo, "node", "tests/peers/node/client.js", args)
}

/// The Node `http2` WebSocket client (`tests/peers/node/h2_client.js`,
/// RFC 8441) in the client namespace.
pub fn node_h2_client(topo: &Topology, args: &[&str]) -> Value {
    json_peer(topo, "node", "tests/peers/node/h2_client.js", args)
}

/// curl in the client namespace: returns (status code, headers, body).
pub fn curl(topo: &Topology, args: &[&str]) -> (u16, String, String) {
    let mut all = vec!["-s", "-S", "-i", "--max-time", "30"];
    all.extend_from_slice(args);
    let (_, out, err) = run_peer(&topo.client, "curl", &all, Duration::from_secs(60));
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("curl {args:?}: no response ({err})"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// A long-running client peer whose stdout is read line by line and whose
/// stdin says when to go on (`ws_client.py hold` and `wait-close`).
pub struct Held {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Held {
    pub fn py_client(topo: &Topology, args: &[&str]) -> Self {
        Self::python(topo, "tests/peers/ws_client.py", args)
    }

    /// `python3 SCRIPT args...` (a path in the repository) in the client namespace.
    pub fn python(topo: &Topology, script: &str, args: &[&str]) -> Self {
        Self::program(topo, "python3", script, args)
    }

    /// `node tests/peers/node/h2_client.js args... --hold` in the client namespace.
    pub fn node_h2_client(topo: &Topology, args: &[&str]) -> Self {
        let mut all = args.to_vec();
        all.push("--hold");
        Self::program(topo, "node", "tests/peers/node/h2_client.js", &all)
    }

    fn program(topo: &Topology, program: &str, script: &str, args: &[&str]) -> Self {
        let script = repo_path(script);
        let mut child = Topology::cmd_in(&topo.client, program)
            .arg(&script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} {}: {e}", script.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for l in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line the peer prints, within `limit`.
    pub fn line(&mut self, limit: Duration) -> String {
        self.lines.recv_timeout(limit).unwrap_or_else(|e| panic!("no line from the client peer within {limit:?}: {e}"))
    }

    /// Tells the peer to go on.
    pub fn go_on(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx (Debian's, with the stream module) as a TCP proxy on the gateway
/// host: the third-party baseline a test compares the daemon with. Stopped
/// on drop.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Nginx {
    /// `proxy_pass` from a port on the gateway's client side to `backend`.
    /// The port is one the kernel picked in the gateway's namespace, which
    /// only this test uses.
    pub fn stream(topo: &Topology, backend: SocketAddr) -> Self {
        let port = Topology::in_ns(&topo.gw, || {
            TcpListener::bind((GW_CLIENT_SIDE_IP, 0)).unwrap().local_addr().unwrap().port()
        });
        let dir = temp_dir("nginx");
        let d = dir.display();
        let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
        assert!(Path::new(module).exists(), "{module} missing: scripts/setup.sh installs libnginx-mod-stream");
        let conf = format!(
            "load_module {module};\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             stream {{ server {{ listen {GW_CLIENT_SIDE_IP}:{port}; proxy_pass {backend}; }} }}\n"
        );
        fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Topology::cmd_in(&topo.gw, "nginx")
            .args(["-g", "daemon off;", "-c"])
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("nginx (scripts/setup.sh installs it)");
        let addr = SocketAddr::new(GW_CLIENT_SIDE_IP.parse().unwrap(), port);
        let mut n = Self { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while topo.connect(addr).is_err() {
            if let Ok(Some(st)) = n.child.try_wait() {
                panic!("nginx exited ({st}): {}", fs::read_to_string(n.dir.join("stderr.log")).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "nginx not listening on {addr} after 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        n.child.try_wait().unwrap();
        n
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child (SIGQUIT: nginx's graceful stop).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy (Debian's) in a namespace, on a config of the test's own, in the
/// foreground; stopped on drop.
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    /// Picks a free port on each of `binds` (addresses in `ns`), writes the
    /// config `conf` makes of them, starts haproxy and waits until every
    /// bound address accepts. Returns it with the addresses.
    pub fn start(ns: &str, binds: &[&str], conf: impl FnOnce(&[SocketAddr]) -> String) -> (Self, Vec<SocketAddr>) {
        let addrs: Vec<SocketAddr> = binds
            .iter()
            .map(|ip| {
                let ip: std::net::IpAddr = ip.parse().unwrap();
                Topology::in_ns(ns, move || TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap())
            })
            .collect();
        let dir = temp_dir("haproxy");
        let file = dir.join("haproxy.cfg");
        fs::write(&file, conf(&addrs)).unwrap();
        let child = Topology::cmd_in(ns, "haproxy")
            .args(["-db", "-f"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("haproxy (scripts/setup.sh installs it)");
        let mut h = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        for a in addrs.clone() {
            let ns = ns.to_string();
            while Topology::in_ns(&ns, move || TcpStream::connect_timeout(&a, Duration::from_secs(1))).is_err() {
                if let Ok(Some(st)) = h.child.try_wait() {
                    panic!("haproxy exited ({st}): {}", h.log());
                }
                assert!(Instant::now() < deadline, "haproxy not listening on {a} after 10 s: {}", h.log());
                thread::sleep(Duration::from_millis(20));
            }
        }
        (h, addrs)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
