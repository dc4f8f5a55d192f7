//! Bounded randomized fuzzing of every parser that reads bytes another party controls:
//! the md superblock, a member's bitmap header and slots (read through a real file, as
//! an agent reads a member), the NBD request and option parsers, and the cluster
//! message codec.
//!
//! Each target mutates valid inputs (bit flips, random bytes, and the fields that size
//! things set to boundary values, with the superblock checksum fixed up half of the
//! time so the mutation reaches the checks behind it) for a fixed time
//! (`MDCLUSTER_FUZZ_SECS`, default 3 s per target; CI budget ≤ 30 s), prints how many
//! inputs it ran, and fails on a panic. Every input that ever panicked is kept under
//! `tests/fuzz/<target>/` and runs first, every time. `MDCLUSTER_FUZZ_SEED` repeats a
//! run (the seed is printed).

use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mdcluster_agent::cluster::{ClusterMsg, ResyncInfo};
use mdcluster_agent::format::bitmap::{slot_offset, BitmapSuper};
use mdcluster_agent::format::create::{plan, BitmapMode, CreateSpec};
use mdcluster_agent::format::io::read_member;
use mdcluster_agent::format::superblock::{checksum, Superblock};
use mdcluster_agent::nbd::proto;

/// xorshift64*: small, seeded, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    255,
    512,
    4096,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX / 2,
    u64::MAX,
];

/// Mutates `buf` in place: 1..=8 edits; `fields` are offsets worth hitting (little- or
/// big-endian fields that size things), picked half of the time.
fn mutate(rng: &mut Rng, buf: &mut [u8], fields: &[usize], big_endian: bool) {
    if buf.is_empty() {
        return;
    }
    for _ in 0..1 + rng.below(8) {
        match rng.below(4) {
            0 => {
                let i = rng.below(buf.len());
                buf[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(buf.len());
                buf[i] = rng.next() as u8;
            }
            _ => {
                let at = if !fields.is_empty() && rng.below(2) == 0 {
                    fields[rng.below(fields.len())]
                } else {
                    rng.below(buf.len()) & !3
                };
                let v = if rng.below(4) == 0 {
                    rng.next()
                } else {
                    INTERESTING[rng.below(INTERESTING.len())]
                };
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let bytes = if big_endian {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                let src = if big_endian {
                    &bytes[8 - width..]
                } else {
                    &bytes[..width]
                };
                for (k, b) in src.iter().enumerate() {
                    if let Some(x) = buf.get_mut(at + k) {
                        *x = *b;
                    }
                }
            }
        }
    }
}

fn fuzz_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz")
        .join(target)
}

fn seed() -> u64 {
    std::env::var("MDCLUSTER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

fn budget() -> Duration {
    let secs: f64 = std::env::var("MDCLUSTER_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs.clamp(0.1, 30.0))
}

/// Runs the regression inputs of `target`, then mutations of `seeds` for the time
/// budget; a panicking input is saved and fails the test.
fn run(
    target: &str,
    seeds: &[Vec<u8>],
    fields: &[usize],
    big_endian: bool,
    fix: impl Fn(&mut Rng, &mut [u8]),
    exec: impl Fn(&[u8]),
) {
    let dir = fuzz_dir(target);
    let mut regressions = 0;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let input = std::fs::read(&f).unwrap();
            let r = catch_unwind(AssertUnwindSafe(|| exec(&input)));
            assert!(
                r.is_ok(),
                "{target}: regression input {} panics",
                f.display()
            );
            regressions += 1;
        }
    }
    let seed = seed();
    let mut rng = Rng(seed);
    let deadline = Instant::now() + budget();
    let mut execs = 0u64;
    // Quiet panics while fuzzing: a panic is reported below with its input.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut crash = None;
    while Instant::now() < deadline {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut input, fields, big_endian);
        fix(&mut rng, &mut input);
        execs += 1;
        if catch_unwind(AssertUnwindSafe(|| exec(&input))).is_err() {
            crash = Some(input);
            break;
        }
    }
    std::panic::set_hook(hook);
    eprintln!("fuzz {target}: seed {seed}, {regressions} regression inputs, {execs} executions");
    if let Some(input) = crash {
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("crash-{seed:016x}-{execs}.bin"));
        std::fs::write(&path, &input).unwrap();
        let e = catch_unwind(AssertUnwindSafe(|| exec(&input))).unwrap_err();
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "fuzz {target}: input {} panics: {msg} (kept as a regression input)",
            path.display()
        );
    }
}

/// The first 4 KiB of a member (superblock, then its bitmap area) of a fresh array.
fn member_images(mode: BitmapMode) -> Vec<Vec<u8>> {
    let mut spec = CreateSpec::new("fuzz:md0", 2, 1, mode);
    if mode == BitmapMode::Clustered {
        spec.nodes = Some(4);
        spec.cluster_name = "c".into();
    }
    let images = plan(&spec, &[64 << 20, 64 << 20, 80 << 20]).unwrap();
    images
        .iter()
        .map(|m| {
            // Bytes 4096.. : superblock at 0, bitmap slots from 4096.
            let mut area = vec![0u8; MEMBER_AREA];
            for (off, data) in m.writes().unwrap() {
                let off = off as usize - 4096;
                if off < area.len() {
                    let n = data.len().min(area.len() - off);
                    area[off..off + n].copy_from_slice(&data[..n]);
                }
            }
            area
        })
        .collect()
}

/// How much of a member the member target writes (superblock and the first slots).
const MEMBER_AREA: usize = 6 * 4096;

/// Superblock fields that size or place things (offsets in the 4 KiB block).
const SB_FIELDS: [usize; 13] = [80, 88, 92, 96, 104, 128, 136, 144, 152, 160, 188, 208, 220];
/// Bitmap superblock fields (offsets in its 256 bytes).
const BM_FIELDS: [usize; 7] = [4, 40, 48, 52, 56, 60, 68];

/// Puts a correct checksum on a mutated superblock half of the time.
fn fix_checksum(rng: &mut Rng, buf: &mut [u8]) {
    if buf.len() >= 4096 && rng.below(2) == 0 {
        let max_dev = u32::from_le_bytes(buf[220..224].try_into().unwrap()).min(1920);
        let c = checksum(&buf[..4096], max_dev);
        buf[216..220].copy_from_slice(&c.to_le_bytes());
    }
}

/// What an agent derives from a parsed superblock.
fn use_superblock(sb: &Superblock) {
    let _ = sb.bitmap_start_bytes();
    let _ = sb.name();
    for d in 0..sb.max_dev.min(4096) {
        let _ = sb.role_of(d);
    }
    let _ = sb.encode();
}

#[test]
fn fuzz_superblock() {
    let seeds: Vec<Vec<u8>> = member_images(BitmapMode::Internal)
        .into_iter()
        .chain(member_images(BitmapMode::Clustered))
        .map(|a| a[..4096].to_vec())
        .collect();
    run("superblock", &seeds, &SB_FIELDS, false, fix_checksum, |b| {
        if let Ok(sb) = Superblock::parse(b) {
            use_superblock(&sb);
        }
    });
}

#[test]
fn fuzz_bitmap_header() {
    let seeds: Vec<Vec<u8>> = member_images(BitmapMode::Clustered)
        .into_iter()
        .chain(member_images(BitmapMode::Internal))
        .map(|a| a[4096..4096 + 256].to_vec())
        .collect();
    let sb = Superblock::parse(&member_images(BitmapMode::Clustered)[0][..4096]).unwrap();
    run(
        "bitmap",
        &seeds,
        &BM_FIELDS,
        false,
        |_, _| {},
        |b| {
            if let Ok(bm) = BitmapSuper::parse(b) {
                let _ = (bm.slots(), bm.chunks(), bm.bits_bytes(), bm.slot_bytes());
                for slot in [0, 1, bm.slots().saturating_sub(1), bm.slots()] {
                    let _ = slot_offset(&sb, &bm, slot);
                }
                let _ = bm.encode();
            }
        },
    );
}

/// A whole member read as an agent reads it (`read_member` on a file): superblock and
/// bitmap fields mutated together, so the geometry checks between them are reached.
#[test]
fn fuzz_member() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("member");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 << 20).unwrap();
    let seeds: Vec<Vec<u8>> = member_images(BitmapMode::Clustered)
        .into_iter()
        .chain(member_images(BitmapMode::Internal))
        .collect();
    let fields: Vec<usize> = SB_FIELDS
        .iter()
        .copied()
        .chain(BM_FIELDS.iter().map(|f| 4096 + f))
        .collect();
    run("member", &seeds, &fields, false, fix_checksum, |b| {
        let mut area = b.to_vec();
        area.resize(MEMBER_AREA, 0);
        file.write_all_at(&area, 4096).unwrap();
        if let Ok(m) = read_member(&path) {
            use_superblock(&m.sb);
            for s in &m.bitmap {
                let _ = (s.sb.chunks(), s.bits.len());
            }
        }
    });
}

#[test]
fn fuzz_nbd() {
    // Request (28 bytes), option header (16), INFO/GO data, export name, client flags:
    // one input, cut where each parser starts.
    let mut seed = proto::encode_request(&proto::Request {
        flags: 0,
        command: proto::CMD_READ,
        cookie: 7,
        offset: 4096,
        len: 4096,
    })
    .to_vec();
    seed.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    seed.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    seed.extend_from_slice(&10u32.to_be_bytes());
    seed.extend_from_slice(&3u32.to_be_bytes());
    seed.extend_from_slice(b"md0");
    seed.extend_from_slice(&1u16.to_be_bytes());
    seed.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    let fields = [4, 8, 16, 24, 28, 36, 40, 44, 51];
    run(
        "nbd",
        &[seed],
        &fields,
        true,
        |_, _| {},
        |b| {
            let mut b = b.to_vec();
            b.resize(60, 0);
            let size = u64::from_be_bytes(b[8..16].try_into().unwrap());
            if let Ok(req) = proto::parse_request(b[..28].try_into().unwrap()) {
                let _ = proto::classify(&req, size, 32 << 20);
                let _ = proto::classify(&req, 1 << 30, u32::MAX);
            }
            let _ = proto::parse_option_header(b[28..44].try_into().unwrap());
            let _ = proto::parse_info_request(&b[44..]);
            let _ = proto::parse_name(&b[48..]);
            let _ = proto::parse_client_flags(b[44..48].try_into().unwrap());
        },
    );
}

#[test]
fn fuzz_cluster_msg() {
    let mut m = ClusterMsg::new(mdcluster_agent::cluster::MsgType::Resyncing, 1);
    m.low = 1 << 20;
    m.high = 2 << 20;
    let mut seed = m.encode().to_vec();
    seed.extend_from_slice(
        &ResyncInfo {
            lo: 1,
            hi: 1 << 30,
            pr_key: 0,
        }
        .encode(),
    );
    run(
        "cluster_msg",
        &[seed],
        &[0, 4, 8, 16, 40, 48, 56],
        false,
        |_, _| {},
        |b| {
            let n = mdcluster_agent::cluster::msg::CLUSTER_MSG_BYTES;
            if let Ok(m) = ClusterMsg::decode(&b[..n.min(b.len())]) {
                assert_eq!(ClusterMsg::decode(&m.encode()).ok(), Some(m), "round trip");
            }
            if b.len() >= n + 16 {
                let r = ResyncInfo::decode(&b[n..n + 16]);
                let _ = (r.active(), r.overlaps(0, u64::MAX), r.overlaps(u64::MAX, 0));
                assert_eq!(ResyncInfo::decode(&r.encode()), r, "round trip");
            }
        },
    );
}
