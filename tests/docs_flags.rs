//! The flag reference in `docs/` is complete and exact: what clap knows and
//! what the documentation says are the same set of flags.
//!
//! - The proxy's flags (`keyhole::config::Cli`) are documented in
//!   `docs/configuration.md`.
//! - The commands' flags (`keyhole::commands::cli()`, the whole tree) are
//!   documented in `docs/commands.md`, one section per command headed
//!   `## keyhole NAME` (`## keyhole token aws` for a nested one). A command's
//!   own flags go in a flag table of its section; the proxy's flags a command
//!   also takes (`check-config`, `connect`: clap arguments identical to the
//!   proxy's, help text included) are documented once, in
//!   `docs/configuration.md`, and may be left out of the section. Every
//!   command without subcommands, or with flags of its own, has a section;
//!   hidden commands may have one or not.
//! - Target parameters (`config::target::TARGET_PARAMS`, and
//!   `config::cloudsql::INSTANCE_PARAMS` for Cloud SQL instances) are
//!   documented in `docs/targets.md`.
//!
//! **What counts as documented.** A flag is documented when it appears in a
//! *flag table*: a Markdown table whose header row's first cell is `flag`.
//! Every `--long` and `-s` word inside a code span of a row's first cell is a
//! documented flag of that row (`` `-a, --address ADDR` ``); the second cell
//! is the environment variable (`` `KEYHOLE_ADDRESS` ``). Flags mentioned in
//! prose do not count. Likewise a target parameter is documented when a code
//! span `` `name=...` `` opens a first cell of a table whose header's first cell
//! is `parameter`.
//!
//! **Rules.** Every flag clap knows (its long name and visible long aliases)
//! has a row, with its short form when it has one, and, for the proxy, its
//! `KEYHOLE_*` variable (`config::env_name`) in the second cell. Every flag
//! in a flag table exists in clap (as a long name or any alias), with the
//! short form clap gives it. `--help` and `--version` are clap's own and left
//! out. Hidden flags (`hide = true`) may be documented or not; a documented
//! one must exist like any other. Cloud SQL Proxy's names for keyhole
//! options (`--structured-logs`, ...) are flags of their own in clap and so
//! have rows of their own (in `docs/configuration.md`, as aliases).
//!
//! **`KEYHOLE_*` variables.** Every `KEYHOLE_NAME` written in `README.md` or
//! `docs/*.md` is a flag's variable, `KEYHOLE_TARGETS`, or a name that
//! keyhole's sources, scripts or tests use (`KEYHOLE_DNS_SERVER`,
//! `KEYHOLE_SKIP_BENCH`, ...).
//!
//! Every failure names the flag (or parameter, or variable) and the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use keyhole::config::{self, Cli};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// One row of a Markdown table: its cells, trimmed, split on `|` that are
/// not escaped (`auto\|off` stays one cell).
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut out = Vec::new();
    let mut cell = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cell.push('|');
                chars.next();
            }
            '|' => out.push(std::mem::take(&mut cell).trim().to_owned()),
            c => cell.push(c),
        }
    }
    out.push(cell.trim().to_owned());
    out
}

/// The texts of the code spans in `cell`.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// A table row of a Markdown file, with the `## ` section it is under and
/// the first cell of its table's header.
#[derive(Debug)]
struct Row {
    line: usize,
    section: String,
    header: String,
    cells: Vec<String>,
}

/// Every body row of every table in `markdown` (outside code fences).
fn table_rows(markdown: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut section = String::new();
    let mut fenced = false;
    let mut header: Option<String> = None;
    let mut previous_was_table = false;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            fenced = !fenced;
            previous_was_table = false;
            continue;
        }
        if fenced {
            continue;
        }
        if let Some(title) = line.strip_prefix("## ") {
            section = title.trim().to_owned();
        }
        if !trimmed.starts_with('|') {
            previous_was_table = false;
            header = None;
            continue;
        }
        let row = cells(trimmed);
        if !previous_was_table {
            header = Some(row[0].to_lowercase());
        } else if !row
            .iter()
            .all(|c| !c.is_empty() && c.chars().all(|c| "-: ".contains(c)))
        {
            rows.push(Row {
                line: i + 1,
                section: section.clone(),
                header: header.clone().unwrap_or_default(),
                cells: row,
            });
        }
        previous_was_table = true;
    }
    rows
}

/// A documented flag: its long name, the short form written beside it, and
/// the row's environment cell.
#[derive(Debug, Clone)]
struct DocFlag {
    line: usize,
    short: Option<char>,
    env: String,
}

/// The flags of the flag tables in `markdown`, by section (`## ` heading)
/// and long name.
fn documented_flags(markdown: &str) -> BTreeMap<String, BTreeMap<String, DocFlag>> {
    let mut out: BTreeMap<String, BTreeMap<String, DocFlag>> = BTreeMap::new();
    for row in table_rows(markdown) {
        if row.header != "flag" {
            continue;
        }
        let env = row.cells.get(1).cloned().unwrap_or_default();
        let mut short = None;
        let mut longs = Vec::new();
        for span in code_spans(&row.cells[0]) {
            for word in span.split([' ', ',']).filter(|w| !w.is_empty()) {
                if let Some(long) = word.strip_prefix("--") {
                    let name: String = long
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    if !name.is_empty() {
                        longs.push(name);
                    }
                } else if let Some(s) = word.strip_prefix('-') {
                    let mut chars = s.chars();
                    if let (Some(c), None) = (chars.next(), chars.next()) {
                        if c.is_ascii_alphanumeric() {
                            short = Some(c);
                        }
                    }
                }
            }
        }
        for long in longs {
            out.entry(row.section.clone()).or_default().insert(
                long,
                DocFlag {
                    line: row.line,
                    short,
                    env: env.clone(),
                },
            );
        }
    }
    out
}

/// What clap knows of one flag.
struct ClapFlag {
    short: Option<char>,
    hidden: bool,
    /// Names a row must carry: the long name and visible aliases.
    required: Vec<String>,
}

/// The flags of `command` (not its subcommands'), by long name, and every
/// name clap accepts (longs and all aliases) mapped to its long name.
fn clap_flags(command: &clap::Command) -> (BTreeMap<String, ClapFlag>, BTreeMap<String, String>) {
    let mut flags = BTreeMap::new();
    let mut accepted = BTreeMap::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        let mut required = vec![long.to_owned()];
        required.extend(
            arg.get_visible_aliases()
                .unwrap_or_default()
                .into_iter()
                .map(str::to_owned),
        );
        accepted.insert(long.to_owned(), long.to_owned());
        for alias in arg.get_all_aliases().unwrap_or_default() {
            accepted.insert(alias.to_owned(), long.to_owned());
        }
        flags.insert(
            long.to_owned(),
            ClapFlag {
                short: arg.get_short(),
                hidden: arg.is_hide_set(),
                required,
            },
        );
    }
    (flags, accepted)
}

/// Compares the flags of `required` (each must be documented) and of
/// `command` (the documented ones must exist there) with those documented in
/// `doc`; `env` says whether each row must name the flag's `KEYHOLE_*`
/// variable. Returns the problems.
fn compare(
    what: &str,
    required: &clap::Command,
    command: &clap::Command,
    file: &str,
    doc: &BTreeMap<String, DocFlag>,
    env: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (must, _) = clap_flags(required);
    let (flags, accepted) = clap_flags(command);
    for (long, flag) in &must {
        for name in &flag.required {
            match doc.get(name) {
                None if flag.hidden => {}
                None => problems.push(format!(
                    "{file}: --{name} ({what}) is not documented: add a row for it to a flag table \
                     (a table whose header's first cell is `flag`)"
                )),
                Some(row) => {
                    if let Some(s) = flag.short {
                        if row.short != Some(s) {
                            problems.push(format!(
                                "{file}:{}: --{name} ({what}) has the short form -{s}, which its row does not show",
                                row.line
                            ));
                        }
                    }
                    if env && name == long {
                        let var = config::env_name(long);
                        if !code_spans(&row.env).contains(&var.as_str()) {
                            problems.push(format!(
                                "{file}:{}: --{name} ({what}): the row's environment cell does not name `{var}`",
                                row.line
                            ));
                        }
                    }
                }
            }
        }
    }
    for (name, row) in doc {
        match accepted.get(name) {
            None => problems.push(format!(
                "{file}:{}: --{name} is documented, but {what} has no such flag",
                row.line
            )),
            Some(long) => {
                if let Some(s) = row.short {
                    if flags[long].short != Some(s) {
                        problems.push(format!(
                            "{file}:{}: --{name} is documented with -{s}, which {what} does not give it",
                            row.line
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// All the documented flags of a file, over its sections.
fn all_sections(doc: &BTreeMap<String, BTreeMap<String, DocFlag>>) -> BTreeMap<String, DocFlag> {
    doc.values().flat_map(|s| s.clone()).collect()
}

fn fail_on(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "the documentation and clap disagree:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_proxy_flag_is_in_the_flag_reference_and_nothing_else_is() {
    const FILE: &str = "docs/configuration.md";
    let doc = documented_flags(&read(FILE));
    assert!(!doc.is_empty(), "{FILE}: no flag table found");
    let proxy = Cli::command();
    fail_on(compare(
        "keyhole",
        &proxy,
        &proxy,
        FILE,
        &all_sections(&doc),
        true,
    ));
}

/// Whether `arg` of a command is one of the proxy's flags, taken over as it
/// is (same id, same help).
fn is_proxy_flag(proxy: &clap::Command, arg: &clap::Arg) -> bool {
    let help = |a: &clap::Arg| a.get_help().map(|h| h.to_string());
    proxy.get_arguments().any(|p| {
        p.get_id() == arg.get_id() && p.get_long() == arg.get_long() && help(p) == help(arg)
    })
}

#[test]
fn every_command_flag_is_in_the_command_reference_and_nothing_else_is() {
    const FILE: &str = "docs/commands.md";
    let text = read(FILE);
    let doc = documented_flags(&text);
    let sections: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|t| t.trim().to_owned())
        .collect();
    let proxy = Cli::command();
    let mut problems = Vec::new();
    let mut commands = BTreeSet::new();
    let mut stack: Vec<(String, clap::Command)> = keyhole::commands::cli()
        .get_subcommands()
        .map(|c| (format!("keyhole {}", c.get_name()), c.clone()))
        .collect();
    assert!(
        !stack.is_empty(),
        "keyhole::commands::cli() has no commands"
    );
    while let Some((name, command)) = stack.pop() {
        stack.extend(
            command
                .get_subcommands()
                .map(|c| (format!("{name} {}", c.get_name()), c.clone())),
        );
        commands.insert(name.clone());
        let own = clap::Command::new(name.clone()).args(
            command
                .get_arguments()
                .filter(|a| !is_proxy_flag(&proxy, a))
                .cloned(),
        );
        let has_own_flags = !clap_flags(&own).0.is_empty();
        let leaf = command.get_subcommands().next().is_none();
        if !sections.contains(&name) {
            if !command.is_hide_set() && (leaf || has_own_flags) {
                problems.push(format!(
                    "{FILE}: `{name}` has no section: add `## {name}` (and a flag table for its flags)"
                ));
            }
            continue;
        }
        let empty = BTreeMap::new();
        let documented = doc.get(&name).unwrap_or(&empty);
        problems.extend(compare(
            &format!("`{name}`"),
            &own,
            &command,
            FILE,
            documented,
            false,
        ));
    }
    for section in doc.keys() {
        if section.starts_with("keyhole ") && !commands.contains(section) {
            problems.push(format!(
                "{FILE}: section `{section}` documents flags, but keyhole::commands::cli() has no such command"
            ));
        }
    }
    fail_on(problems);
}

/// The target parameters a table of `section` documents.
fn documented_params(markdown: &str, in_section: impl Fn(&str) -> bool) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for row in table_rows(markdown) {
        if row.header != "parameter" || !in_section(&row.section) {
            continue;
        }
        for span in code_spans(&row.cells[0]) {
            if let Some((name, _)) = span.split_once('=') {
                out.insert(name.to_owned(), row.line);
            }
        }
    }
    out
}

#[test]
fn every_target_parameter_is_documented_and_nothing_else_is() {
    const FILE: &str = "docs/targets.md";
    let text = read(FILE);
    let mut problems = Vec::new();
    for (what, known, cloudsql) in [
        ("a target URL", config::target::TARGET_PARAMS, false),
        (
            "a Cloud SQL instance target",
            config::cloudsql::INSTANCE_PARAMS,
            true,
        ),
    ] {
        let doc = documented_params(&text, |s| s.contains("Cloud SQL") == cloudsql);
        for p in known {
            if !doc.contains_key(*p) {
                problems.push(format!(
                    "{FILE}: parameter {p}= of {what} is not documented"
                ));
            }
        }
        for (p, line) in &doc {
            if !known.contains(&p.as_str()) {
                problems.push(format!(
                    "{FILE}:{line}: parameter {p}= is documented for {what}, which has no such parameter"
                ));
            }
        }
    }
    fail_on(problems);
}

/// `KEYHOLE_` names in `text`.
fn keyhole_variables(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("KEYHOLE_") {
        let tail = &rest[at + "KEYHOLE_".len()..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = name.trim_end_matches('_');
        if !name.is_empty() {
            out.insert(format!("KEYHOLE_{name}"));
        }
        rest = tail;
    }
    out
}

/// The text of every source, script and test file (this one left out).
fn code_text() -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.file_name() != Some("docs_flags.rs".as_ref())
                && matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("rs" | "sh" | "py")
                )
            {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let mut out = String::new();
    for dir in ["src", "scripts", "tests", "benches"] {
        walk(&repo().join(dir), &mut out);
    }
    out
}

#[test]
fn every_documented_keyhole_variable_exists() {
    let (flags, _) = clap_flags(&Cli::command());
    let mut known: BTreeSet<String> = flags.keys().map(|l| config::env_name(l)).collect();
    known.insert("KEYHOLE_TARGETS".to_owned());
    let code = keyhole_variables(&code_text());
    let mut files = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut problems = Vec::new();
    for file in &files {
        for var in keyhole_variables(&read(file)) {
            if !known.contains(&var) && !code.contains(&var) {
                problems.push(format!(
                    "{file}: {var} is neither a flag's variable nor a name keyhole's code uses"
                ));
            }
        }
    }
    fail_on(problems);
}

#[test]
fn the_markdown_reader_reads_flag_tables() {
    let md = "\
## A

| flag | environment | meaning |
|---|---|---|
| `-a, --address ADDR` | `KEYHOLE_ADDRESS` | x |
| `--kernel-tls auto\\|off` | `KEYHOLE_KERNEL_TLS` | y |

| parameter | meaning |
|---|---|
| `--not-a-flag` | z |

```
| flag |
|---|
| `--fenced` |
```

## B

| flag | environment |
|---|---|
| `--one`, `--two` | |
";
    let doc = documented_flags(md);
    let a = &doc["A"];
    assert_eq!(a.keys().collect::<Vec<_>>(), ["address", "kernel-tls"]);
    assert_eq!(a["address"].short, Some('a'));
    assert_eq!(a["address"].line, 5);
    assert_eq!(a["kernel-tls"].env, "`KEYHOLE_KERNEL_TLS`");
    assert_eq!(doc["B"].keys().collect::<Vec<_>>(), ["one", "two"]);
    assert_eq!(
        keyhole_variables("`KEYHOLE_<OPTION>`, KEYHOLE_PORT=1 and KEYHOLE_A_B."),
        BTreeSet::from(["KEYHOLE_PORT".to_owned(), "KEYHOLE_A_B".to_owned()])
    );
}
