//! The release files cannot run here (they need GitHub's macOS and Windows
//! runners, Homebrew, Scoop), so this test keeps them in agreement with each
//! other and with what can run here:
//!
//! - `.github/workflows/release.yml` builds exactly the targets
//!   `docs/install.md` lists (and every target the README names), on the
//!   toolchain `Cargo.toml`'s `rust-version` gives, as `.tar.gz` on Unix and
//!   `.zip` on Windows, named `keyhole-VERSION-TARGET`, with a sums file;
//! - `packaging/scoop/keyhole.json` is JSON of Scoop's manifest shape whose
//!   URLs, now and in `autoupdate`, are the Windows asset the workflow makes
//!   and the sums file it publishes;
//! - `packaging/homebrew/keyhole.rb` builds the tag's source tarball, and its
//!   `test do` block's `keyhole check-config` passes with this build, as do the
//!   completion and man page commands its `install` runs;
//! - `scripts/release-manifests.sh`, which the release job runs, fills both
//!   in from a sums file and a tarball.
//!
//! Nothing here touches the network.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const WORKFLOW: &str = ".github/workflows/release.yml";
const FORMULA: &str = "packaging/homebrew/keyhole.rb";
const SCOOP: &str = "packaging/scoop/keyhole.json";
/// The repository's address in the packaging files: the owner is a
/// placeholder that `scripts/release-manifests.sh` fills in.
const HOMEPAGE: &str = "https://github.com/OWNER/keyhole";
const WINDOWS: &str = "x86_64-pc-windows-msvc";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A `key = "value"` line of Cargo.toml's `[package]`.
fn cargo_package(key: &str) -> String {
    let manifest = read("Cargo.toml");
    let prefix = format!("{key} = \"");
    manifest
        .lines()
        .take_while(|l| !l.starts_with("[package.") && *l != "[lib]")
        .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("Cargo.toml: no {key} in [package]"))
        .to_owned()
}

fn version() -> String {
    cargo_package("version")
}

/// The archive of one target: `keyhole-VERSION-TARGET.EXT`.
fn asset(version: &str, target: &str, ext: &str) -> String {
    format!("keyhole-{version}-{target}.{ext}")
}

fn sums_file(version: &str) -> String {
    format!("keyhole-{version}-sha256sums.txt")
}

fn release_url(version: &str, file: &str) -> String {
    format!("{HOMEPAGE}/releases/download/v{version}/{file}")
}

// ---------------------------------------------------------------------------
// The workflow

fn workflow() -> Yaml {
    let docs =
        YamlLoader::load_from_str(&read(WORKFLOW)).unwrap_or_else(|e| panic!("{WORKFLOW}: {e}"));
    assert_eq!(docs.len(), 1, "{WORKFLOW}: one YAML document");
    docs.into_iter().next().expect("a document")
}

fn text<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{WORKFLOW}: {what} is not a string: {y:?}"))
}

/// One entry of the build matrix.
struct Build {
    target: String,
    os: String,
    archive: String,
}

fn matrix(wf: &Yaml) -> Vec<Build> {
    let include = &wf["jobs"]["build"]["strategy"]["matrix"]["include"];
    let entries = include
        .as_vec()
        .unwrap_or_else(|| panic!("{WORKFLOW}: jobs.build.strategy.matrix.include is not a list"));
    entries
        .iter()
        .map(|e| Build {
            target: text(&e["target"], "a matrix target").to_owned(),
            os: text(&e["os"], "a matrix os").to_owned(),
            archive: text(&e["archive"], "a matrix archive").to_owned(),
        })
        .collect()
}

/// Every `run:` script of a job, joined.
fn job_scripts(wf: &Yaml, job: &str) -> String {
    let steps = wf["jobs"][job]["steps"]
        .as_vec()
        .unwrap_or_else(|| panic!("{WORKFLOW}: job {job} has no steps"));
    steps
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rust target triples named in `text`: `ARCH-VENDOR-OS[-ENV]` for the
/// architectures and systems keyhole is released for.
fn targets_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .filter(|w| {
            let parts: Vec<&str> = w.split('-').collect();
            (3..=4).contains(&parts.len())
                && ["x86_64", "aarch64"].contains(&parts[0])
                && ["linux", "darwin", "windows"].contains(&parts[2])
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_workflow_builds_the_documented_targets_on_the_declared_toolchain() {
    let wf = workflow();
    let builds = matrix(&wf);
    let built: BTreeSet<String> = builds.iter().map(|b| b.target.clone()).collect();
    assert_eq!(
        built.len(),
        builds.len(),
        "{WORKFLOW}: a target is built twice"
    );

    let documented = targets_in(&read("docs/install.md"));
    assert_eq!(
        documented, built,
        "docs/install.md lists these targets, {WORKFLOW} builds those"
    );
    let in_readme = targets_in(&read("README.md"));
    assert!(
        in_readme.is_subset(&built),
        "README.md names {:?}, which {WORKFLOW} does not build",
        in_readme.difference(&built).collect::<Vec<_>>()
    );

    // docs/install.md's table of archives: | `TARGET` | `.EXT` | for |
    let install = read("docs/install.md");
    let mut rows = 0;
    for line in install.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(b) = builds
            .iter()
            .find(|b| cells[1] == format!("`{}`", b.target))
        else {
            continue;
        };
        assert_eq!(
            cells[2],
            format!("`.{}`", b.archive),
            "docs/install.md: {} is released as .{}",
            b.target,
            b.archive
        );
        rows += 1;
    }
    assert_eq!(
        rows,
        builds.len(),
        "docs/install.md: one row per release archive"
    );

    for b in &builds {
        let windows = b.target.contains("-windows-");
        assert_eq!(
            b.archive,
            if windows { "zip" } else { "tar.gz" },
            "{WORKFLOW}: {}: .zip for Windows, .tar.gz elsewhere",
            b.target
        );
        let runner_os = match b.target.split('-').nth(1) {
            Some("apple") => "macos-",
            Some("pc") => "windows-",
            _ => "ubuntu-",
        };
        assert!(
            b.os.starts_with(runner_os),
            "{WORKFLOW}: {} runs on {}",
            b.target,
            b.os
        );
    }

    let toolchain = text(&wf["env"]["RUST_VERSION"], "env.RUST_VERSION");
    assert_eq!(
        toolchain,
        cargo_package("rust-version"),
        "{WORKFLOW} builds with another Rust than Cargo.toml's rust-version"
    );
    let on = &wf["on"];
    assert!(
        on["push"]["tags"]
            .as_vec()
            .is_some_and(|t| t.iter().any(|t| t.as_str() == Some("v*"))),
        "{WORKFLOW}: runs on a pushed tag v*"
    );
    assert!(
        !on["workflow_dispatch"].is_badvalue(),
        "{WORKFLOW}: can be run by hand"
    );
}

#[test]
fn the_workflow_names_its_assets_as_the_manifests_expect() {
    let wf = workflow();
    let build = job_scripts(&wf, "build");
    // The pack step names each archive keyhole-VERSION-TARGET.EXT from the matrix.
    assert!(
        build.contains(r#"name="keyhole-$VERSION-${{ matrix.target }}""#),
        "{WORKFLOW}: the pack step no longer names archives keyhole-VERSION-TARGET"
    );
    for ext in [".zip", ".tar.gz"] {
        assert!(
            build.contains(&format!("$name{ext}\"")),
            "{WORKFLOW}: the pack step makes no {ext}"
        );
    }
    // The version is Cargo.toml's, and a tag must agree with it.
    assert!(build.contains(r#"$GITHUB_REF_NAME != "v$version""#));
    let release = job_scripts(&wf, "release");
    assert!(
        release.contains(r#"keyhole-$version-sha256sums.txt"#),
        "{WORKFLOW}: the release job's sums file is not keyhole-VERSION-sha256sums.txt"
    );
    assert!(
        release.contains("scripts/release-manifests.sh"),
        "{WORKFLOW}: the release job does not fill in the formula and the manifest"
    );
    assert!(
        release.contains("/archive/refs/tags/$GITHUB_REF_NAME.tar.gz"),
        "{WORKFLOW}: the release job hashes another tarball than the formula downloads"
    );
    let uploads = wf["jobs"]["release"]["steps"]
        .as_vec()
        .expect("release steps")
        .iter()
        .any(|s| s["with"]["files"].as_str() == Some("dist/*"));
    assert!(uploads, "{WORKFLOW}: the release job attaches dist/*");
}

// ---------------------------------------------------------------------------
// Scoop

#[test]
fn the_scoop_manifest_installs_the_windows_archive() {
    let version = version();
    let builds = matrix(&workflow());
    let windows = builds
        .iter()
        .find(|b| b.target == WINDOWS)
        .unwrap_or_else(|| panic!("{WORKFLOW} does not build {WINDOWS}"));
    let zip = asset(&version, WINDOWS, &windows.archive);

    let manifest: Value =
        serde_json::from_str(&read(SCOOP)).unwrap_or_else(|e| panic!("{SCOOP}: {e}"));
    let field = |pointer: &str| -> &str {
        manifest
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{SCOOP}: no string at {pointer}"))
    };
    assert_eq!(field("/version"), version, "{SCOOP}: Cargo.toml's version");
    assert_eq!(field("/homepage"), HOMEPAGE);
    assert_eq!(field("/license"), cargo_package("license"));
    assert!(!field("/description").is_empty());
    assert_eq!(field("/bin"), "keyhole.exe");
    assert_eq!(
        field("/checkver"),
        "github",
        "{SCOOP}: versions from GitHub releases"
    );

    let arch = "/architecture/64bit";
    assert_eq!(field(&format!("{arch}/url")), release_url(&version, &zip));
    let stem = zip.strip_suffix(".zip").expect("a zip");
    assert_eq!(
        field(&format!("{arch}/extract_dir")),
        stem,
        "{SCOOP}: the archive holds one directory named as itself"
    );
    let hash = field(&format!("{arch}/hash"));
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{SCOOP}: a SHA-256 in hex: {hash}"
    );

    // autoupdate: the same names with $version, the hash from the sums file.
    let auto = "/autoupdate/architecture/64bit";
    assert_eq!(
        field(&format!("{auto}/url")).replace("$version", &version),
        release_url(&version, &zip)
    );
    assert_eq!(
        field(&format!("{auto}/extract_dir")).replace("$version", &version),
        stem
    );
    assert_eq!(
        field("/autoupdate/hash/url").replace("$version", &version),
        format!("$baseurl/{}", sums_file(&version)),
        "{SCOOP}: the hash comes from the release's sums file"
    );
    assert!(field("/autoupdate/hash/regex").contains("$basename"));
}

// ---------------------------------------------------------------------------
// Homebrew

/// The lines of the formula from `start` (trimmed) to its `end`, at the
/// same indentation.
fn ruby_block<'a>(formula: &'a str, start: &str) -> Vec<&'a str> {
    let mut lines = formula.lines();
    let opening = lines
        .by_ref()
        .find(|l| l.trim() == start)
        .unwrap_or_else(|| panic!("{FORMULA}: no `{start}`"));
    let indent = &opening[..opening.len() - opening.trim_start().len()];
    let closing = format!("{indent}end");
    lines.take_while(|l| l.trim_end() != closing).collect()
}

/// The string of `key "VALUE"` in the formula.
fn formula_field(formula: &str, key: &str) -> String {
    let prefix = format!("{key} \"");
    formula
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix)?.split('"').next())
        .unwrap_or_else(|| panic!("{FORMULA}: no {key}"))
        .to_owned()
}

#[test]
fn the_homebrew_formula_builds_the_tagged_source() {
    let formula = read(FORMULA);
    let version = version();
    assert_eq!(formula_field(&formula, "homepage"), HOMEPAGE);
    assert_eq!(
        formula_field(&formula, "url"),
        format!("{HOMEPAGE}/archive/refs/tags/v{version}.tar.gz"),
        "{FORMULA}: the tag's source tarball, at Cargo.toml's version"
    );
    let sha = formula_field(&formula, "sha256");
    assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(formula_field(&formula, "license"), cargo_package("license"));
    let install = ruby_block(&formula, "def install").join("\n");
    for line in [
        r#"depends_on "rust" => :build"#,
        r#"system "cargo", "install", *std_cargo_args"#,
    ] {
        assert!(formula.contains(line), "{FORMULA}: lacks `{line}`");
    }
    // What `install` runs, run here: Homebrew's generate_completions_from_executable
    // runs `keyhole completions SHELL` for bash, zsh and fish, then `keyhole man`.
    assert!(
        install.contains(r#"generate_completions_from_executable(bin/"keyhole", "completions")"#)
    );
    assert!(install.contains(r#"system bin/"keyhole", "man", "--out-dir", "man""#));
    for shell in ["bash", "zsh", "fish"] {
        let out = keyhole(&["completions", shell]);
        assert!(
            !out.is_empty(),
            "keyhole completions {shell} printed nothing"
        );
    }
    // As Homebrew runs it: in the build directory, a relative --out-dir.
    let dir = tempfile::tempdir().expect("a temporary directory");
    keyhole_in(
        dir.path(),
        &["man", "--out-dir", "man"],
        "keyhole man --out-dir man",
    );
    assert!(
        dir.path().join("man/keyhole.1").is_file(),
        "keyhole man --out-dir man wrote no man/keyhole.1, which {FORMULA} installs"
    );
}

/// Runs this build's keyhole in `dir` with no environment; its stdout, or a
/// panic that says `what` was run.
fn keyhole_in(dir: &Path, args: &[&str], what: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keyhole"))
        .args(args)
        .env_clear()
        .current_dir(dir)
        .output()
        .expect("run keyhole");
    assert!(
        out.status.success(),
        "{what} fails with this build:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keyhole(args: &[&str]) -> String {
    keyhole_in(repo(), args, &format!("keyhole {args:?}"))
}

/// The formula's `test do` block, run as Homebrew would: each file it writes
/// into `testpath` is written, each `shell_output("#{bin}/keyhole ...")` is
/// run with this build's binary (in `testpath`, no environment), and every
/// `assert_match "TEXT", output` must find TEXT in the output of the command
/// before it. `version.to_s` is Cargo.toml's version.
#[test]
fn the_homebrew_test_block_passes_with_this_build() {
    let formula = read(FORMULA);
    let block = ruby_block(&formula, "test do");
    let testpath = tempfile::tempdir().expect("a temporary directory");
    let dir = testpath.path().to_str().expect("UTF-8");
    let mut lines = block.iter().map(|l| l.trim());
    let (mut commands, mut files, mut matches) = (0, 0, 0);
    let mut output = String::new();
    while let Some(line) = lines.next() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("(testpath/\"") {
            // (testpath/"NAME").write <<~TAG ... TAG: a squiggly heredoc.
            let (name, rest) = rest.split_once('"').expect("a file name");
            let tag = rest
                .strip_prefix(").write <<~")
                .unwrap_or_else(|| panic!("{FORMULA}: unexpected `{line}`"));
            let body: Vec<&str> = block
                .iter()
                .skip_while(|l| !l.contains(line))
                .skip(1)
                .take_while(|l| l.trim() != tag)
                .copied()
                .collect();
            for _ in 0..=body.len() {
                lines.next();
            }
            let indent = body
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .min()
                .unwrap_or(0);
            let content: String = body
                .iter()
                .map(|l| format!("{}\n", &l[indent.min(l.len())..]))
                .collect();
            std::fs::write(testpath.path().join(name), content).expect("write a test file");
            files += 1;
            continue;
        }
        if let Some(call) = line.split("shell_output(\"").nth(1) {
            let command = call
                .split("\")")
                .next()
                .expect("a closing quote")
                .replace("#{testpath}", dir);
            let args: Vec<&str> = command
                .strip_prefix("#{bin}/keyhole ")
                .unwrap_or_else(|| panic!("{FORMULA}: `{line}` does not run #{{bin}}/keyhole"))
                .split_whitespace()
                .collect();
            output = keyhole_in(testpath.path(), &args, &format!("{FORMULA}: `{line}`"));
            commands += 1;
        }
        if let Some(rest) = line.strip_prefix("assert_match ") {
            let expected = if rest.starts_with("version.to_s") {
                version()
            } else {
                rest.strip_prefix('"')
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_else(|| panic!("{FORMULA}: unexpected `{line}`"))
                    .to_owned()
            };
            assert!(
                output.contains(&expected),
                "{FORMULA}: `{line}`: not in the output:\n{output}"
            );
            matches += 1;
        }
    }
    assert!(files >= 1, "{FORMULA}: the test writes no configuration");
    assert!(
        commands >= 2,
        "{FORMULA}: the test runs --version and check-config"
    );
    assert!(
        block.iter().any(|l| l.contains("keyhole check-config")),
        "{FORMULA}: the test runs no check-config"
    );
    assert!(
        matches >= commands,
        "{FORMULA}: each command's output is checked"
    );
}

// ---------------------------------------------------------------------------
// What the release job attaches

/// scripts/release-manifests.sh, on a made-up sums file and tarball, fills in
/// the owner and both hashes, and leaves files Scoop and Homebrew can read.
#[cfg(unix)]
#[test]
fn the_release_job_fills_in_the_formula_and_the_manifest() {
    use sha2::{Digest, Sha256};

    let version = version();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tarball = dir.path().join("source.tar.gz");
    std::fs::write(&tarball, b"not really a tarball").expect("write");
    let source_hash: String = Sha256::digest(b"not really a tarball")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // One line per archive the workflow makes, as sha256sum writes them.
    let mut sums = String::new();
    let mut zip_hash = String::new();
    for (i, b) in matrix(&workflow()).iter().enumerate() {
        let hash = format!("{:064x}", i + 1);
        if b.target == WINDOWS {
            zip_hash = hash.clone();
        }
        sums.push_str(&format!(
            "{hash}  {}\n",
            asset(&version, &b.target, &b.archive)
        ));
    }
    let sums_path = dir.path().join(sums_file(&version));
    std::fs::write(&sums_path, sums).expect("write");
    let out = dir.path().join("out");

    let run = Command::new("bash")
        .arg(repo().join("scripts/release-manifests.sh"))
        .args([
            out.as_os_str(),
            "someone/keyhole".as_ref(),
            sums_path.as_os_str(),
            tarball.as_os_str(),
        ])
        .output()
        .expect("run bash");
    assert!(
        run.status.success(),
        "scripts/release-manifests.sh failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );

    let formula = std::fs::read_to_string(out.join("keyhole.rb")).expect("keyhole.rb");
    assert_eq!(formula_field(&formula, "sha256"), source_hash);
    assert_eq!(
        formula_field(&formula, "url"),
        format!("https://github.com/someone/keyhole/archive/refs/tags/v{version}.tar.gz")
    );
    assert!(!formula.contains("OWNER"));

    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("keyhole.json")).expect("keyhole.json"),
    )
    .expect("the filled-in manifest is JSON");
    assert_eq!(manifest["architecture"]["64bit"]["hash"], zip_hash.as_str());
    assert_eq!(
        manifest["architecture"]["64bit"]["url"],
        format!(
            "https://github.com/someone/keyhole/releases/download/v{version}/{}",
            asset(&version, WINDOWS, "zip")
        )
        .as_str()
    );
    assert!(
        manifest.get("##").is_none(),
        "the placeholder note is left out"
    );
    assert!(!manifest.to_string().contains("OWNER"));
}
