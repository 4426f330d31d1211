//! `keyhole completions SHELL` and `keyhole man`: shell completions and man
//! pages generated from [`super::cli`], the clap definitions keyhole parses
//! its command line with, so neither can drift from the flags.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Arg, Command};
use clap_complete::Shell;

use super::{EXIT_FAILED, EXIT_USAGE};

pub(super) fn completions_command() -> Command {
    Command::new("completions")
        .about("Print shell completions for keyhole and its commands")
        .long_about(
            "Print shell completions for keyhole and its commands.\n\n\
             bash:  keyhole completions bash > ~/.local/share/bash-completion/completions/keyhole\n\
             zsh:   keyhole completions zsh > \"${fpath[1]}/_keyhole\"\n\
             fish:  keyhole completions fish > ~/.config/fish/completions/keyhole.fish",
        )
        .arg(
            Arg::new("shell")
                .value_name("SHELL")
                .required(true)
                .value_parser(clap::value_parser!(Shell)),
        )
}

pub(super) fn man_command() -> Command {
    Command::new("man")
        .about("Print keyhole(1), or write every man page (keyhole.1, keyhole-connect.1, ...) into a directory")
        .arg(
            Arg::new("out-dir")
                .long("out-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Write keyhole.1 and one page per command into DIR instead of keyhole(1) to stdout"),
        )
}

pub fn completions(args: &[OsString]) -> ExitCode {
    let matches = match parse(completions_command(), args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let Some(shell) = matches.get_one::<Shell>("shell").copied() else {
        return ExitCode::from(EXIT_USAGE);
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut super::cli(), "keyhole", &mut out);
    write_stdout("completions", &out)
}

pub fn man(args: &[OsString]) -> ExitCode {
    let matches = match parse(man_command(), args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    match matches.get_one::<PathBuf>("out-dir") {
        Some(dir) => match write_pages(dir) {
            Ok(names) => {
                for name in names {
                    println!("{}", dir.join(name).display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keyhole man: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        },
        None => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(super::cli()).render(&mut out) {
                Ok(()) => write_stdout("man", &out),
                Err(e) => {
                    eprintln!("keyhole man: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
    }
}

/// Every page: keyhole.1, then keyhole-COMMAND.1 for each visible command.
/// Returns the file names written.
pub fn write_pages(dir: &Path) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cli = super::cli();
    // Subcommands' pages name themselves `keyhole-COMMAND`, as git's and
    // cargo's do.
    cli.build();
    let mut written = Vec::new();
    let mut pages = vec![cli.clone()];
    pages.extend(
        cli.get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.clone().name(format!("keyhole-{}", c.get_name()))),
    );
    for page in pages {
        let name = format!("{}.1", page.get_name());
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut out)
            .map_err(|e| format!("cannot render {name}: {e}"))?;
        let path = dir.join(&name);
        std::fs::write(&path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(name);
    }
    Ok(written)
}

fn parse(command: Command, args: &[OsString]) -> Result<clap::ArgMatches, ExitCode> {
    let name = command.get_name().to_owned();
    match command
        .bin_name(format!("keyhole {name}"))
        .try_get_matches_from(args)
    {
        Ok(m) => Ok(m),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

fn write_stdout(command: &str, bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyhole {command}: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every long flag of keyhole and of its visible commands.
    fn long_flags() -> Vec<String> {
        let cli = super::super::cli();
        let mut flags: Vec<String> = cli
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        for sub in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
            flags.extend(
                sub.get_arguments()
                    .filter_map(|a| a.get_long().map(|l| format!("--{l}"))),
            );
        }
        flags.sort();
        flags.dedup();
        flags
    }

    fn generated(shell: Shell) -> String {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut super::super::cli(), "keyhole", &mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    /// `SHELL -n`-style syntax check of a script; `None` when the shell is
    /// not installed (scripts/test.sh installs them).
    fn syntax_check(program: &str, flag: &str, script: &str) -> Option<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("completion");
        std::fs::write(&path, script).expect("write");
        let out = std::process::Command::new(program)
            .arg(flag)
            .arg(&path)
            .output()
            .ok()?;
        Some(format!(
            "{}{}",
            if out.status.success() { "" } else { "failed: " },
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    #[test]
    fn completions_know_every_flag_and_command_and_parse_in_their_shell() {
        let flags = long_flags();
        assert!(flags.contains(&"--ca-file".to_owned()), "{flags:?}");
        assert!(
            flags.contains(&"--db-user".to_owned()),
            "connect's own: {flags:?}"
        );
        for (shell, program, flag) in [
            (Shell::Bash, "bash", "-n"),
            (Shell::Zsh, "zsh", "-n"),
            (Shell::Fish, "fish", "--no-execute"),
        ] {
            let script = generated(shell);
            for name in [
                "check-config",
                "connect",
                "wait",
                "shutdown",
                "token",
                "completions",
                "man",
            ] {
                assert!(script.contains(name), "{shell}: no {name}");
            }
            assert!(
                !script.contains("tunnel-fd"),
                "{shell}: offers the hidden tunnel-fd"
            );
            for flag in &flags {
                // fish names long options without their dashes (-l ca-file).
                let bare = flag.trim_start_matches('-');
                assert!(
                    script.contains(flag.as_str())
                        || (shell == Shell::Fish && script.contains(&format!("-l {bare}"))),
                    "{shell} completion lacks {flag}"
                );
            }
            match syntax_check(program, flag, &script) {
                Some(said) => assert!(said.is_empty(), "{program} {flag}: {said}"),
                None => {
                    eprintln!("{program} is not installed: its completion's syntax is not checked")
                }
            }
        }
    }

    #[test]
    fn man_pages_cover_every_command_and_flag_and_groff_reads_them_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write_pages(dir.path()).expect("pages");
        assert_eq!(
            written,
            [
                "keyhole.1",
                "keyhole-check-config.1",
                "keyhole-connect.1",
                "keyhole-wait.1",
                "keyhole-shutdown.1",
                "keyhole-token.1",
                "keyhole-completions.1",
                "keyhole-man.1"
            ]
        );
        let all: String = written
            .iter()
            .map(|n| std::fs::read_to_string(dir.path().join(n)).expect("page"))
            .collect();
        for flag in long_flags() {
            // roff escapes each dash.
            let roff = flag.replace('-', "\\-");
            assert!(all.contains(&roff), "no man page documents {flag}");
        }
        let connect = std::fs::read_to_string(dir.path().join("keyhole-connect.1")).expect("page");
        assert!(connect.contains(".TH keyhole-connect 1"), "{connect}");
        for name in &written {
            let out = std::process::Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(dir.path().join(name))
                .output();
            match out {
                Ok(out) => assert!(
                    out.status.success() && out.stderr.is_empty(),
                    "groff on {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(_) => eprintln!("groff is not installed: {name} is not checked"),
            }
        }
    }
}
