//! The fuzz targets on stable Rust, in every `cargo test`: each target
//! (`fuzz/targets/`, the same bodies the libFuzzer binaries in
//! `fuzz/fuzz_targets/` run) replays its committed corpus
//! (`fuzz/corpus/<target>/`, seeds from real captures plus regression
//! inputs), then runs a deterministic mutation loop over it: bit flips,
//! byte changes, inserts, deletes, interesting values and splices between
//! corpus entries, from a fixed xorshift seed, for a fixed number of
//! iterations. No coverage feedback (that is what `scripts/fuzz.sh`, with
//! cargo-fuzz on nightly, adds): this keeps every target and every seed
//! honest on each run, in a few seconds per target.
//!
//! - `KEYHOLE_FUZZ_ITERATIONS=N`: mutations per target (default: each
//!   target's own, a few seconds in a debug build);
//! - `KEYHOLE_FUZZ_SEED=N`: another mutation sequence (a failure names the
//!   seed and writes its input under `target/fuzz-replay/` for
//!   `cargo +nightly fuzz run <target> <file>`).

#[allow(dead_code)]
#[path = "../fuzz/targets/mod.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

const DEFAULT_SEED: u64 = 0x6b65_7968_6f6c_6521;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    &[0],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0, 0],
    &[0xff, 0xff],
    &[0, 0, 0, 8],
    &[0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x04, 0xd2, 0x16, 0x2f],
    &[0x17, 0x03, 0x03],
    &[0x40, 0x00],
    &[0x48, 0x00],
    b"-PLUS\0",
    b"user\0",
    b"://",
    b"@",
    b"%",
    b"?via=",
    b"\n",
];

/// One mutation of `input`, with `other` (another corpus entry) for splices.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    let len = input.len();
    match rng.below(8) {
        0 if len > 0 => {
            let at = rng.below(len);
            input[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            input[at] = rng.next() as u8;
        }
        2 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(16));
            input.drain(at..at + n);
        }
        4 => {
            let at = rng.below(len + 1);
            let value = INTERESTING[rng.below(INTERESTING.len())];
            let end = (at + value.len()).min(len);
            input.splice(at..end, value.iter().copied());
        }
        5 if !other.is_empty() => {
            // Splice: our head, their tail.
            let at = rng.below(len + 1);
            let from = rng.below(other.len());
            input.truncate(at);
            input.extend_from_slice(&other[from..]);
        }
        6 if len > 1 => {
            // Copy a chunk of the input over another place in it.
            let from = rng.below(len);
            let n = 1 + rng.below((len - from).min(32));
            let chunk = input[from..from + n].to_vec();
            let at = rng.below(len);
            let end = (at + n).min(len);
            input.splice(at..end, chunk);
        }
        _ if len > 0 => input.truncate(rng.below(len)),
        _ => input.push(rng.next() as u8),
    }
    input.truncate(64 * 1024);
}

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read corpus file");
            (p, bytes)
        })
        .collect()
}

/// Runs `input`, and on a panic saves it and fails with how to reproduce.
fn run_one(name: &str, run: fn(&[u8]), input: &[u8], origin: &str) {
    if catch_unwind(AssertUnwindSafe(|| run(input))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-replay");
    std::fs::create_dir_all(&dir).expect("create target/fuzz-replay");
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let file = dir.join(format!("{name}-{hash:016x}"));
    std::fs::write(&file, input).expect("save the failing input");
    panic!(
        "fuzz target {name} failed on {origin} ({} bytes), saved as {}; \
         reproduce with `cd fuzz && cargo +nightly fuzz run {name} {}`",
        input.len(),
        file.display(),
        file.display()
    );
}

fn replay(name: &str, default_iterations: usize) {
    let run = targets::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, run)| *run)
        .expect("a target of that name");
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
    for (path, bytes) in &seeds {
        run_one(name, run, bytes, &path.display().to_string());
    }
    let iterations = std::env::var("KEYHOLE_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_iterations);
    let seed = std::env::var("KEYHOLE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed | 1);
    let started = std::time::Instant::now();
    for i in 0..iterations {
        let mut input = seeds[rng.below(seeds.len())].1.clone();
        let other = &seeds[rng.below(seeds.len())].1;
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut input, other);
        }
        run_one(
            name,
            run,
            &input,
            &format!("mutation {i} of seed {seed} (KEYHOLE_FUZZ_SEED)"),
        );
    }
    println!(
        "{name}: {} corpus inputs and {iterations} mutations in {:.1?}",
        seeds.len(),
        started.elapsed()
    );
}

#[test]
fn postgres_codec() {
    replay("postgres_codec", 20_000);
}

#[test]
fn postgres_session() {
    replay("postgres_session", 20_000);
}

#[test]
fn mysql_codec() {
    replay("mysql_codec", 20_000);
}

#[test]
fn mysql_session() {
    replay("mysql_session", 20_000);
}

#[test]
fn tls_record() {
    replay("tls_record", 5_000);
}

#[test]
fn tls_differential() {
    replay("tls_differential", 6_000);
}

#[test]
fn config() {
    replay("config", 3_000);
}

#[test]
fn every_target_has_a_test_and_a_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("fuzz/Cargo.toml");
    let this = std::fs::read_to_string(root.join("tests/fuzz_replay.rs")).expect("this file");
    for (name, _) in targets::TARGETS {
        assert!(
            root.join(format!("fuzz/fuzz_targets/{name}.rs")).is_file(),
            "no fuzz/fuzz_targets/{name}.rs"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} is not a [[bin]] in fuzz/Cargo.toml"
        );
        assert!(
            this.contains(&format!("replay(\"{name}\"")),
            "{name} has no test here"
        );
    }
}
