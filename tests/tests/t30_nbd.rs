//! t30: the NBD export, checked with real clients (`nbdinfo`, `qemu-io`, `qemu-img`,
//! `nbdcopy`, `nbdfuse` + `losetup` + `mkfs.ext4` + `mount` + `fsck.ext4`) and with a tiny
//! raw client for what the tools cannot show (errors that keep the connection, refusals
//! and their timing, protocol violations, forced disconnect, many connections).
//!
//! Each test starts the NBD server in-process (its own tokio runtime) on a unix socket
//! (`<tmp>/md0.nbd`, scope md0) and a TCP listener on 127.0.0.1:0 (all exports), over a
//! `FileDevice` in a tempdir. Every external command runs under `timeout`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mdcluster_agent::blockdev::FileDevice;
use mdcluster_agent::nbd::proto::{self, Request};
use mdcluster_agent::nbd::{
    spawn_tcp, spawn_unix, ExportState, MapExports, NbdUnixListener, Scope, ServeError,
    ServerConfig, ServerHandle,
};
use mdcluster_tests::standalone::{noise, Cleanup, FuseMount};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 64 << 20;
const MIB: usize = 1 << 20;
/// Bound of every external command.
const TOOL_TIMEOUT: &str = "60";

/// The in-process server under test.
struct Server {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    exports: Arc<MapExports>,
    sock: PathBuf,
    tcp: SocketAddr,
    image: PathBuf,
    shutdown: CancellationToken,
    handles: Vec<ServerHandle>,
}

impl Server {
    fn start() -> Server {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "mdcluster_agent=info".into()),
            )
            .with_test_writer()
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("md0.img");
        let exports = Arc::new(MapExports::new());
        exports.insert(
            "md0",
            Arc::new(FileDevice::create(&image, SIZE).unwrap()),
            ExportState::Active,
        );
        let sock = dir.path().join("md0.nbd");
        let shutdown = CancellationToken::new();
        let config = ServerConfig::default();
        let (handles, addr) = rt.block_on(async {
            let unix = spawn_unix(
                &sock,
                Scope::Only("md0".into()),
                exports.clone(),
                config.clone(),
                &shutdown,
            )
            .await
            .unwrap();
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = tcp.local_addr().unwrap();
            let tcp = spawn_tcp(tcp, exports.clone(), config, &shutdown);
            (vec![unix, tcp], addr)
        });
        Server {
            rt,
            dir,
            exports,
            sock,
            tcp: addr,
            image,
            shutdown,
            handles,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn unix_uri(&self) -> String {
        format!("nbd+unix:///md0?socket={}", self.sock.display())
    }

    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.tcp.port())
    }

    /// Adds another file-backed export in `state`.
    fn add_export(&self, name: &str, size: u64, state: ExportState) {
        let dev = FileDevice::create(&self.path(&format!("{name}.img")), size).unwrap();
        self.exports.insert(name, Arc::new(dev), state);
    }

    /// Stops both listeners; returns how long it took.
    fn shutdown(&mut self) -> Duration {
        let t = Instant::now();
        let handles = std::mem::take(&mut self.handles);
        self.rt.block_on(async {
            for h in handles {
                h.stop().await.expect("listener stops without error");
            }
        });
        t.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Cancelling the parent token stops every listener; `stop` then waits (bounded).
        self.shutdown.cancel();
        let handles = std::mem::take(&mut self.handles);
        self.rt.block_on(async {
            for h in handles {
                let _ = h.stop().await;
            }
        });
    }
}

/// Runs `args` under `timeout`; returns its output whatever the exit status.
fn run(args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", TOOL_TIMEOUT])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run {args:?}: {e}"))
}

/// Runs `args` under `timeout` and returns stdout; panics with stderr on failure.
fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn md5(path: &Path) -> String {
    run_ok(&["md5sum", path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// A tiny raw NBD client (blocking std sockets with timeouts).

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

struct Raw {
    s: Box<dyn Conn>,
}

/// The answer to NBD_OPT_GO.
#[derive(Debug)]
enum Go {
    Ok { size: u64, flags: u16 },
    Err { reply: u32, message: String },
}

impl Raw {
    fn unix(path: &Path) -> Raw {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw::handshake(Box::new(s))
    }

    fn tcp(addr: SocketAddr) -> Raw {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw::handshake(Box::new(s))
    }

    fn handshake(mut s: Box<dyn Conn>) -> Raw {
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        assert_eq!(flags & 1, 1, "server must offer fixed newstyle");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Raw { s }
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads option replies until ACK or an error reply.
    fn option_replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(&h[0..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
            let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            self.s.read_exact(&mut data).unwrap();
            let last = reply == proto::REP_ACK || reply & (1 << 31) != 0;
            replies.push((reply, data));
            if last {
                return replies;
            }
        }
    }

    fn go(&mut self, name: &str) -> Go {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(proto::OPT_GO, &d);
        let replies = self.option_replies(proto::OPT_GO);
        let (last, data) = replies.last().unwrap();
        if *last != proto::REP_ACK {
            return Go::Err {
                reply: *last,
                message: String::from_utf8_lossy(data).into_owned(),
            };
        }
        let export = replies
            .iter()
            .find(|(r, d)| *r == proto::REP_INFO && d[0..2] == [0, 0])
            .expect("NBD_INFO_EXPORT is sent");
        Go::Ok {
            size: u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
            flags: u16::from_be_bytes(export.1[10..12].try_into().unwrap()),
        }
    }

    fn go_ok(mut self, name: &str) -> Raw {
        match self.go(name) {
            Go::Ok { size, .. } => assert!(size > 0),
            Go::Err { reply, message } => panic!("GO {name} refused: {reply:#x} {message}"),
        }
        self
    }

    fn send(&mut self, command: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let req = Request {
            flags: 0,
            command,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&proto::encode_request(&req)).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// Reads one simple reply header: (cookie, error).
    fn reply(&mut self) -> (u64, u32) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
        )
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(proto::CMD_READ, cookie, offset, len, &[]);
        let (c, err) = self.reply();
        assert_eq!(c, cookie);
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        Ok(data)
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(proto::CMD_WRITE, cookie, offset, data.len() as u32, data);
        let (c, err) = self.reply();
        assert_eq!(c, cookie);
        err
    }

    /// True if the server closed the connection (EOF) within the read timeout.
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Real clients.

#[test]
fn nbdinfo_shows_size_flags_block_sizes_and_list() {
    let srv = Server::start();
    srv.add_export("md1", 8 << 20, ExportState::Active);
    srv.add_export("md2", 8 << 20, ExportState::Stopping);

    let info: serde_json::Value =
        serde_json::from_str(&run_ok(&["nbdinfo", "--json", &srv.unix_uri()])).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], SIZE, "{info:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} in {info:#}");
    }
    assert_eq!(e["is_read_only"], false, "{info:#}");
    assert_eq!(e["block_size_minimum"], 1, "{info:#}");
    assert_eq!(e["block_size_preferred"], 4096, "{info:#}");
    assert_eq!(e["block_size_maximum"], 32 << 20, "{info:#}");

    // The per-array socket serves md0 under the empty name too.
    let size = run_ok(&[
        "nbdinfo",
        "--size",
        &format!("nbd+unix:///?socket={}", srv.sock.display()),
    ]);
    assert_eq!(size.trim(), SIZE.to_string());

    // TCP lists the active exports only; the unix socket lists its own array only.
    let list: serde_json::Value =
        serde_json::from_str(&run_ok(&["nbdinfo", "--list", "--json", &srv.tcp_uri("")])).unwrap();
    let mut names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["md0", "md1"], "{list:#}");
    let list = run_ok(&["nbdinfo", "--list", &srv.unix_uri()]);
    assert!(list.contains("md0") && !list.contains("md1"), "{list}");

    // Socket is owner-only.
    let mode = std::fs::metadata(&srv.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn qemu_io_patterns_verify_over_unix_and_tcp() {
    let srv = Server::start();
    let unix = srv.unix_uri();
    let tcp = srv.tcp_uri("md0");
    // Writes over the unix socket: plain, FUA, many in flight (aio), zeroes, discard.
    let out = run_ok(&[
        "qemu-io",
        "-f",
        "raw",
        &unix,
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -f -P 0xcd 1M 64k",
        "-c",
        "aio_write -P 0x11 4M 256k",
        "-c",
        "aio_write -P 0x22 5M 256k",
        "-c",
        "aio_write -P 0x33 6M 256k",
        "-c",
        "aio_write -P 0x44 7M 256k",
        "-c",
        "aio_flush",
        "-c",
        "write -P 0x55 8M 4M",
        "-c",
        "write -z 9M 1M",
        "-c",
        "discard 10M 1M",
        "-c",
        "flush",
    ]);
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    // Reads over TCP verify every pattern.
    let out = run_ok(&[
        "qemu-io",
        "-f",
        "raw",
        &tcp,
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0xcd 1M 64k",
        "-c",
        "read -P 0x11 4M 256k",
        "-c",
        "read -P 0x22 5M 256k",
        "-c",
        "read -P 0x33 6M 256k",
        "-c",
        "read -P 0x44 7M 256k",
        "-c",
        "read -P 0x55 8M 1M",
        "-c",
        "read -P 0 9M 1M",
        "-c",
        "read -P 0x55 11M 1M",
        "-c",
        "read -P 0 20M 1M",
    ]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 10, "{out}");
    // A wrong pattern is noticed (the check can fail).
    let bad = run(&["qemu-io", "-f", "raw", &tcp, "-c", "read -P 0xee 0 4k"]);
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"),
        "{bad:?}"
    );
    // The bytes are in the backing file.
    let image = std::fs::read(&srv.image).unwrap();
    assert!(image[..MIB].iter().all(|&b| b == 0xab));
    assert!(image[MIB..MIB + 65536].iter().all(|&b| b == 0xcd));
    assert!(image[9 * MIB..10 * MIB].iter().all(|&b| b == 0));
}

#[test]
fn qemu_img_convert_in_and_out_matches_md5() {
    let srv = Server::start();
    let src = srv.path("src.img");
    std::fs::write(&src, noise(SIZE as usize, 30)).unwrap();
    run_ok(&[
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &srv.unix_uri(),
    ]);
    assert_eq!(md5(&srv.image), md5(&src), "written through NBD");
    let out = srv.path("out.img");
    run_ok(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &srv.tcp_uri("md0"),
        out.to_str().unwrap(),
    ]);
    assert_eq!(md5(&out), md5(&src), "read back through NBD");
    let cmp = run_ok(&[
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &srv.unix_uri(),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn nbdcopy_in_and_out_over_several_connections() {
    let srv = Server::start();
    let src = srv.path("src.img");
    std::fs::write(&src, noise(SIZE as usize, 31)).unwrap();
    run_ok(&[
        "nbdcopy",
        "--connections=4",
        "--requests=16",
        "--flush",
        src.to_str().unwrap(),
        &srv.tcp_uri("md0"),
    ]);
    assert_eq!(md5(&srv.image), md5(&src));
    let out = srv.path("out.img");
    run_ok(&[
        "nbdcopy",
        "--connections=4",
        &srv.unix_uri(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(md5(&out), md5(&src));
}

#[test]
fn ext4_over_nbdfuse_and_loop_survives_fsck() {
    let srv = Server::start();
    let fuse_dir = srv.path("fuse");
    let mnt = srv.path("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let fuse = FuseMount::mount(&srv.sock, &fuse_dir);
    let disk = fuse.disk();
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), SIZE);

    let lo = run_ok(&["losetup", "-f", "--show", disk.to_str().unwrap()])
        .trim()
        .to_owned();
    assert!(lo.starts_with("/dev/loop"), "{lo}");
    let lo_guard = Cleanup(vec!["losetup".into(), "-d".into(), lo.clone()]);

    run_ok(&["mkfs.ext4", "-q", "-F", &lo]);
    run_ok(&["mount", &lo, mnt.to_str().unwrap()]);
    let mount_guard = Cleanup(vec!["umount".into(), mnt.display().to_string()]);
    let mut files = Vec::new();
    for i in 0..12u64 {
        let data = noise(((i as usize) * 333_333) % (3 * MIB) + 1, 100 + i);
        let path = mnt.join(format!("f{i}"));
        std::fs::write(&path, &data).unwrap();
        files.push((format!("f{i}"), data));
    }
    run_ok(&["sync"]);
    for (name, data) in &files {
        assert_eq!(&std::fs::read(mnt.join(name)).unwrap(), data, "{name}");
    }
    run_ok(&["umount", mnt.to_str().unwrap()]);
    std::mem::forget(mount_guard);
    let fsck = run(&["fsck.ext4", "-fn", &lo]);
    assert!(
        fsck.status.success(),
        "fsck over NBD: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    drop(lo_guard);
    drop(fuse);

    // The filesystem is in the backing file itself: fsck it and read the files back.
    run_ok(&["fsck.ext4", "-fn", srv.image.to_str().unwrap()]);
    run_ok(&[
        "mount",
        "-o",
        "loop,ro",
        srv.image.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    let _mount_guard = Cleanup(vec!["umount".into(), mnt.display().to_string()]);
    for (name, data) in &files {
        assert_eq!(&std::fs::read(mnt.join(name)).unwrap(), data, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Errors, refusals, lifecycle: raw client.

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let srv = Server::start();
    let mut c = Raw::unix(&srv.sock).go_ok("md0");
    assert_eq!(c.write(1, 0, b"hello"), 0);
    // Read past the end: EINVAL, connection continues.
    assert_eq!(c.read(2, SIZE, 1), Err(proto::EINVAL));
    assert_eq!(c.read(3, SIZE - 2, 4), Err(proto::EINVAL));
    assert_eq!(c.read(4, 0, 5).unwrap(), b"hello");
    // Write past the end: ENOSPC, its payload is drained, connection continues.
    assert_eq!(c.write(5, SIZE - 1, b"xy"), proto::ENOSPC);
    assert_eq!(c.read(6, 0, 5).unwrap(), b"hello");
    // Too large (over 32 MiB): EINVAL, for a write after draining its payload.
    assert_eq!(c.read(7, 0, (32 << 20) + 1), Err(proto::EINVAL));
    let big = vec![7u8; (32 << 20) + 4096];
    assert_eq!(c.write(8, 0, &big), proto::EINVAL);
    assert_eq!(c.read(9, 0, 5).unwrap(), b"hello");
    // Unknown command: EINVAL.
    c.send(42, 10, 0, 0, &[]);
    assert_eq!(c.reply(), (10, proto::EINVAL));
    // Flush, trim, write zeroes over the whole device (split inside the server).
    c.send(proto::CMD_FLUSH, 11, 0, 0, &[]);
    assert_eq!(c.reply(), (11, 0));
    c.send(proto::CMD_WRITE_ZEROES, 12, 0, SIZE as u32, &[]);
    assert_eq!(c.reply(), (12, 0));
    assert_eq!(c.read(13, 0, 5).unwrap(), vec![0u8; 5]);
    c.send(proto::CMD_TRIM, 14, 0, SIZE as u32, &[]);
    assert_eq!(c.reply(), (14, 0));
    // A protocol violation (bad magic) closes this connection only.
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed_by_server(), "server closes on a bad request magic");
    let mut d = Raw::tcp(srv.tcp).go_ok("md0");
    assert_eq!(d.write(1, 4096, b"still here"), 0);
    assert_eq!(d.read(2, 4096, 10).unwrap(), b"still here");
    // DISC: the server closes after answering what is in flight.
    d.send(proto::CMD_WRITE, 3, 8192, 3, b"abc");
    d.send(proto::CMD_DISC, 4, 0, 0, &[]);
    assert_eq!(d.reply(), (3, 0));
    assert!(d.closed_by_server());
    assert_eq!(&std::fs::read(&srv.image).unwrap()[8192..8195], b"abc");
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let srv = Server::start();
    let mut c = Raw::tcp(srv.tcp).go_ok("md0");
    // 200 writes sent before reading any reply (more than the in-flight cap: the server
    // stops reading, then goes on as replies drain).
    let blocks: Vec<Vec<u8>> = (0..200).map(|i| noise(16384, 1000 + i)).collect();
    let mut payload = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let req = Request {
            flags: if i % 7 == 0 { proto::CMD_FLAG_FUA } else { 0 },
            command: proto::CMD_WRITE,
            cookie: 1000 + i as u64,
            offset: i as u64 * 16384,
            len: 16384,
        };
        payload.extend_from_slice(&proto::encode_request(&req));
        payload.extend_from_slice(b);
    }
    // Replies are 16 bytes each: they fit in the socket buffers while we keep writing.
    c.s.write_all(&payload).unwrap();
    let mut seen: Vec<u64> = (0..200)
        .map(|_| {
            let (cookie, error) = c.reply();
            assert_eq!(error, 0);
            cookie
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (1000..1200).collect::<Vec<u64>>());
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(
            &c.read(5000 + i as u64, i as u64 * 16384, 16384).unwrap(),
            b
        );
    }
}

#[test]
fn many_concurrent_connections() {
    let srv = Server::start();
    let sock = srv.sock.clone();
    let tcp = srv.tcp;
    let threads: Vec<_> = (0..32u64)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = if i % 2 == 0 {
                    Raw::unix(&sock)
                } else {
                    Raw::tcp(tcp)
                }
                .go_ok("md0");
                let data = noise(65536, i);
                let off = i * (1 << 20);
                for round in 0..8u64 {
                    assert_eq!(c.write(round, off + round * 65536, &data), 0);
                }
                for round in 0..8u64 {
                    assert_eq!(
                        c.read(100 + round, off + round * 65536, 65536).unwrap(),
                        data
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let image = std::fs::read(&srv.image).unwrap();
    for i in 0..32usize {
        assert_eq!(
            &image[i * MIB..i * MIB + 65536],
            &noise(65536, i as u64)[..]
        );
    }
}

#[test]
fn absent_export_is_refused_at_once_with_enoent() {
    let srv = Server::start();
    let t = Instant::now();
    let mut c = Raw::tcp(srv.tcp);
    match c.go("nope") {
        Go::Err { reply, message } => {
            assert_eq!(reply, proto::REP_ERR_UNKNOWN);
            assert!(message.contains("ENOENT"), "{message}");
        }
        ok => panic!("absent export opened: {ok:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    // The refusal did not create anything, and the connection may try again.
    assert!(srv.exports.clients("nope").is_none());
    assert!(matches!(
        c.go("md0"),
        Go::Ok {
            size: SIZE,
            flags: proto::EXPORT_FLAGS
        }
    ));
    // The per-array socket serves only its own array.
    let mut u = Raw::unix(&srv.sock);
    assert!(matches!(
        u.go("md1"),
        Go::Err {
            reply: proto::REP_ERR_UNKNOWN,
            ..
        }
    ));
    // A real client fails fast too.
    let t = Instant::now();
    let out = run(&["nbdinfo", &srv.tcp_uri("nope")]);
    assert!(!out.status.success());
    // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file or directory"),
        "{out:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn busy_export_is_refused_within_100ms_naming_its_state() {
    let srv = Server::start();
    for (state, word) in [
        (ExportState::Stopping, "stopping"),
        (ExportState::Assembling, "assembling"),
    ] {
        srv.exports.set_state("md0", state);
        for mut c in [Raw::tcp(srv.tcp), Raw::unix(&srv.sock)] {
            let t = Instant::now();
            match c.go("md0") {
                Go::Err { reply, message } => {
                    assert_eq!(reply, proto::REP_ERR_SHUTDOWN);
                    assert!(
                        message.contains("EBUSY") && message.contains(word),
                        "{message}"
                    );
                }
                ok => panic!("{word} export opened: {ok:?}"),
            }
            assert!(
                t.elapsed() < Duration::from_millis(100),
                "{:?}",
                t.elapsed()
            );
        }
        let out = run(&["qemu-io", "-f", "raw", &srv.unix_uri(), "-c", "read 0 4k"]);
        assert!(!out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("read "));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("EBUSY"),
            "{out:?}"
        );
        // libnbd reports NBD_REP_ERR_SHUTDOWN as ESHUTDOWN: distinct from the ENOENT of
        // an absent export.
        let t = Instant::now();
        let out = run(&["nbdinfo", &srv.tcp_uri("md0")]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("shutdown"),
            "{out:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    srv.exports.set_state("md0", ExportState::Active);
    assert!(matches!(Raw::unix(&srv.sock).go("md0"), Go::Ok { .. }));
}

#[test]
fn stop_sees_clients_waits_bounded_and_forces_them_off() {
    let srv = Server::start();
    let clients = srv.exports.clients("md0").unwrap();
    let mut a = Raw::unix(&srv.sock).go_ok("md0");
    let mut b = Raw::tcp(srv.tcp).go_ok("md0");
    assert_eq!(a.write(1, 0, b"a"), 0);
    assert_eq!(clients.len(), 2);
    let peers: Vec<String> = clients.list().into_iter().map(|c| c.peer).collect();
    assert!(peers.iter().any(|p| p.starts_with("unix:")), "{peers:?}");
    assert!(
        peers.iter().any(|p| p.starts_with("tcp:127.0.0.1")),
        "{peers:?}"
    );

    // Stop: state first, so a new open fails at once, then a bounded wait that names who
    // is still connected.
    srv.exports.set_state("md0", ExportState::Stopping);
    assert!(matches!(Raw::unix(&srv.sock).go("md0"), Go::Err { .. }));
    let t = Instant::now();
    let left = srv
        .rt
        .block_on(clients.wait_empty(Duration::from_millis(200)))
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(left.len(), 2);

    // A client that leaves by itself is seen leaving.
    b.send(proto::CMD_DISC, 9, 0, 0, &[]);
    assert!(b.closed_by_server());
    // --force: the other one is disconnected.
    clients.disconnect_all();
    assert!(
        a.closed_by_server(),
        "forced client sees its connection closed"
    );
    srv.rt
        .block_on(clients.wait_empty(Duration::from_secs(5)))
        .expect("no client left after the forced disconnect");
}

#[test]
fn shutdown_closes_connections_and_removes_the_socket() {
    let mut srv = Server::start();
    let mut c = Raw::unix(&srv.sock).go_ok("md0");
    assert_eq!(c.write(1, 0, b"x"), 0);
    let took = srv.shutdown();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(c.closed_by_server());
    assert!(!srv.sock.exists(), "socket file removed on shutdown");
    assert!(std::net::TcpStream::connect(srv.tcp).is_err());
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_is_not() {
    let srv = Server::start();
    let rt = &srv.rt;
    // Live: refused.
    let err = rt.block_on(NbdUnixListener::bind(&srv.sock)).err().unwrap();
    assert!(matches!(err, ServeError::InUse { .. }), "{err}");
    // Stale: a socket file with no listener behind it.
    let stale = srv.path("stale.nbd");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let l = rt.block_on(NbdUnixListener::bind(&stale)).unwrap();
    assert_eq!(
        std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(l);
    assert!(!stale.exists(), "dropping the listener removes its socket");
    // Not a socket: left alone.
    let file = srv.path("regular");
    std::fs::write(&file, b"keep").unwrap();
    let err = rt.block_on(NbdUnixListener::bind(&file)).err().unwrap();
    assert!(matches!(err, ServeError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}
