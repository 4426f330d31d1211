//! Where each SDK keeps its files, by that SDK's own rules, per OS.
//!
//! keyhole lets the SDKs find their own files (aws-config reads the shared
//! AWS files, `ssh` reads its config); this module is for the places keyhole
//! looks itself (gcloud's well-known file) and for messages that tell the
//! user where to look, so that both name the right place on every system.
//!
//! Every function is a pure function of an [`Os`] and an environment lookup
//! ([`Env`]), so tests can ask about any system with any home:
//!
//! | SDK | Linux, macOS | Windows |
//! |---|---|---|
//! | AWS shared files | `$HOME/.aws/{config,credentials}` | the same under `HOME`, else `USERPROFILE`, else `HOMEDRIVE` + `HOMEPATH` |
//! | (overrides) | `AWS_CONFIG_FILE`, `AWS_SHARED_CREDENTIALS_FILE` (a leading `~` is the home above) | the same |
//! | gcloud | `$CLOUDSDK_CONFIG`, else `$HOME/.config/gcloud` | `%CLOUDSDK_CONFIG%`, else `%APPDATA%\gcloud`, else `%SystemDrive%\gcloud` (`C:` without it) |
//! | OpenSSH | `$HOME/.ssh` | `%USERPROFILE%\.ssh` |
//!
//! Paths are joined with the separator of the [`Os`] asked about, not the
//! one keyhole was built for, so every answer can be checked on any system.

use std::collections::HashMap;
use std::path::PathBuf;

/// Which system's rules to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    /// Linux, and every other Unix but macOS: the SDKs treat them alike.
    Linux,
    MacOs,
    Windows,
}

impl Os {
    /// The system keyhole was built for.
    pub const fn current() -> Os {
        if cfg!(windows) {
            Os::Windows
        } else if cfg!(target_os = "macos") {
            Os::MacOs
        } else {
            Os::Linux
        }
    }

    const fn separator(self) -> char {
        match self {
            Os::Windows => '\\',
            Os::Linux | Os::MacOs => '/',
        }
    }

    /// Whether `c` ends a path component here (Windows takes both).
    fn is_separator(self, c: char) -> bool {
        c == '/' || (self == Os::Windows && c == '\\')
    }
}

/// An environment lookup: a variable's value, `None` when it is unset.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// This process's environment, as an [`Env`]. A value that is not UTF-8
/// counts as unset, as it does for the AWS SDK.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// An environment kept in a map (keyhole passes its environment around as
/// one, so tests can supply their own), as an [`Env`].
pub fn map_env(map: &HashMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    |name| map.get(name).cloned()
}

/// The AWS SDKs' shared configuration and credentials files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsFiles {
    /// `AWS_CONFIG_FILE`, else `config` in [`aws_dir`].
    pub config: PathBuf,
    /// `AWS_SHARED_CREDENTIALS_FILE`, else `credentials` in [`aws_dir`].
    pub credentials: PathBuf,
}

impl AwsFiles {
    /// Both files, for a message: `A and B`, or the directory's files as
    /// `DIR/{config,credentials}` when neither was moved.
    pub fn describe(&self, os: Os) -> String {
        let (config, credentials) = (self.config.display(), self.credentials.display());
        let sep = os.separator();
        let config_text = config.to_string();
        match config_text.strip_suffix("config") {
            Some(dir)
                if dir.ends_with(sep) && credentials.to_string() == format!("{dir}credentials") =>
            {
                format!("{dir}{{config,credentials}}")
            }
            _ => format!("{config} and {credentials}"),
        }
    }
}

/// The home directory by the AWS SDKs' rule: `HOME` everywhere; on Windows
/// then `USERPROFILE`, then `HOMEDRIVE` followed by `HOMEPATH`. As in the
/// SDKs, a variable that is set counts even when it is empty.
pub fn aws_home(os: Os, env: Env) -> Option<String> {
    if let Some(home) = env("HOME") {
        return Some(home);
    }
    if os != Os::Windows {
        return None;
    }
    if let Some(profile) = env("USERPROFILE") {
        return Some(profile);
    }
    match (env("HOMEDRIVE"), env("HOMEPATH")) {
        (Some(drive), Some(path)) => Some(drive + &path),
        _ => None,
    }
}

/// The AWS SDKs' directory, `.aws` in [`aws_home`].
pub fn aws_dir(os: Os, env: Env) -> Option<PathBuf> {
    aws_home(os, env).map(|home| join(os, &home, &[".aws"]))
}

/// The shared files the AWS SDKs read. `None` when a file is not moved by
/// its variable and there is no home to find it in (the SDKs then read
/// nothing from it).
pub fn aws_files(os: Os, env: Env) -> Option<AwsFiles> {
    let home = aws_home(os, env);
    let file = |variable: &str, name: &str| match env(variable) {
        Some(path) => Some(expand_tilde(os, &path, home.as_deref())),
        None => home.as_deref().map(|h| join(os, h, &[".aws", name])),
    };
    Some(AwsFiles {
        config: file("AWS_CONFIG_FILE", "config")?,
        credentials: file("AWS_SHARED_CREDENTIALS_FILE", "credentials")?,
    })
}

/// [`aws_files`] for a message: where the AWS SDKs look on `os`, or, with
/// no home to look in, `~/.aws` and the variables that would give one.
pub fn aws_files_shown(os: Os, env: Env) -> String {
    match aws_files(os, env) {
        Some(files) => files.describe(os),
        None if os == Os::Windows => {
            "~\\.aws (no home directory: none of HOME, USERPROFILE, HOMEDRIVE with HOMEPATH is set)"
                .to_owned()
        }
        None => "~/.aws (no home directory: HOME is unset)".to_owned(),
    }
}

/// gcloud's configuration directory (where `gcloud auth
/// application-default login` writes `application_default_credentials.json`):
/// `CLOUDSDK_CONFIG`; else `.config/gcloud` in `HOME` on Linux and macOS, and
/// `gcloud` in `APPDATA` on Windows, or at the root of `SystemDrive` (`C:`
/// when that is unset too) without `APPDATA`, as gcloud and Google's auth
/// libraries do. Empty variables count as unset, as in Google's Go
/// libraries. `None` on Linux and macOS without `HOME`.
pub fn gcloud_dir(os: Os, env: Env) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(config) = set("CLOUDSDK_CONFIG") {
        return Some(PathBuf::from(config));
    }
    match os {
        Os::Linux | Os::MacOs => set("HOME").map(|home| join(os, &home, &[".config", "gcloud"])),
        Os::Windows => Some(match set("APPDATA") {
            Some(appdata) => join(os, &appdata, &["gcloud"]),
            None => {
                let drive = set("SystemDrive").unwrap_or_else(|| "C:".to_owned());
                join(os, &format!("{drive}\\"), &["gcloud"])
            }
        }),
    }
}

/// The user's OpenSSH directory: `.ssh` in `HOME` on Linux and macOS, in
/// `USERPROFILE` on Windows (OpenSSH for Windows). OpenSSH on Unix reads
/// the home directory from the user database rather than `HOME`; the two
/// differ only when `HOME` was changed, and this is for messages. Empty
/// variables count as unset.
pub fn ssh_dir(os: Os, env: Env) -> Option<PathBuf> {
    let variable = match os {
        Os::Linux | Os::MacOs => "HOME",
        Os::Windows => "USERPROFILE",
    };
    env(variable)
        .filter(|v| !v.is_empty())
        .map(|home| join(os, &home, &[".ssh"]))
}

/// The OpenSSH client configuration `ssh` reads without `-F`: `config` in
/// [`ssh_dir`].
pub fn ssh_config_file(os: Os, env: Env) -> Option<PathBuf> {
    ssh_dir(os, env).map(|dir| join(os, &dir.to_string_lossy(), &["config"]))
}

/// [`ssh_config_file`] for a message: the path, or `~/.ssh/config` (as
/// OpenSSH writes it) when there is no home to name.
pub fn ssh_config_shown(os: Os, env: Env) -> String {
    ssh_config_file(os, env).map_or_else(|| "~/.ssh/config".to_owned(), |p| p.display().to_string())
}

/// `base` and then `parts`, with `os`'s separator (one, whatever `base`
/// ends with).
fn join(os: Os, base: &str, parts: &[&str]) -> PathBuf {
    let sep = os.separator();
    let mut path = base.to_owned();
    for part in parts {
        if !path.is_empty() && !path.ends_with(|c| os.is_separator(c)) {
            path.push(sep);
        }
        path.push_str(part);
    }
    PathBuf::from(path)
}

/// A path an AWS variable names, with a leading `~` (alone, or before a
/// separator) replaced by the home directory and its separators made
/// `os`'s, as the AWS SDKs do. Without a home, the path is left as it is.
fn expand_tilde(os: Os, path: &str, home: Option<&str>) -> PathBuf {
    let rest = match path.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with(|c| os.is_separator(c)) => rest,
        _ => return PathBuf::from(path),
    };
    let Some(home) = home else {
        return PathBuf::from(path);
    };
    let parts: Vec<&str> = rest
        .split(|c| os.is_separator(c))
        .filter(|p| !p.is_empty())
        .collect();
    join(os, home, &parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake environment.
    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn path(p: &str) -> Option<PathBuf> {
        Some(PathBuf::from(p))
    }

    const UNIXES: [Os; 2] = [Os::Linux, Os::MacOs];

    #[test]
    fn this_build_is_the_os_it_was_built_for() {
        let os = Os::current();
        assert_eq!(os == Os::Windows, cfg!(windows));
        assert_eq!(os == Os::MacOs, cfg!(target_os = "macos"));
    }

    #[test]
    fn aws_on_unix_is_home_dot_aws() {
        let home = env(&[("HOME", "/home/ana"), ("USERPROFILE", "/nope")]);
        for os in UNIXES {
            assert_eq!(aws_dir(os, &home), path("/home/ana/.aws"), "{os:?}");
            assert_eq!(
                aws_files(os, &home),
                Some(AwsFiles {
                    config: "/home/ana/.aws/config".into(),
                    credentials: "/home/ana/.aws/credentials".into(),
                })
            );
        }
        // A trailing separator is not doubled.
        assert_eq!(
            aws_dir(Os::Linux, &env(&[("HOME", "/home/ana/")])),
            path("/home/ana/.aws")
        );
    }

    #[test]
    fn aws_on_unix_without_home_has_no_place() {
        // Windows' variables mean nothing elsewhere.
        let none = env(&[
            ("USERPROFILE", "C:\\Users\\ana"),
            ("HOMEDRIVE", "C:"),
            ("HOMEPATH", "\\Users\\ana"),
        ]);
        for os in UNIXES {
            assert_eq!(aws_home(os, &none), None);
            assert_eq!(aws_dir(os, &none), None);
            assert_eq!(aws_files(os, &none), None);
        }
    }

    #[test]
    fn aws_on_windows_is_home_then_userprofile_then_homedrive_homepath() {
        let all = env(&[
            ("HOME", "D:\\home"),
            ("USERPROFILE", "C:\\Users\\ana"),
            ("HOMEDRIVE", "E:"),
            ("HOMEPATH", "\\Users\\ana"),
        ]);
        assert_eq!(aws_dir(Os::Windows, &all), path("D:\\home\\.aws"));
        let profile = env(&[
            ("USERPROFILE", "C:\\Users\\ana"),
            ("HOMEDRIVE", "E:"),
            ("HOMEPATH", "\\Users\\ana"),
        ]);
        assert_eq!(aws_dir(Os::Windows, &profile), path("C:\\Users\\ana\\.aws"));
        let drive = env(&[("HOMEDRIVE", "E:"), ("HOMEPATH", "\\Users\\ana")]);
        assert_eq!(aws_dir(Os::Windows, &drive), path("E:\\Users\\ana\\.aws"));
        assert_eq!(
            aws_files(Os::Windows, &drive).map(|f| f.credentials),
            path("E:\\Users\\ana\\.aws\\credentials")
        );
        // Half of the pair is no home.
        assert_eq!(aws_dir(Os::Windows, &env(&[("HOMEDRIVE", "E:")])), None);
        assert_eq!(
            aws_dir(Os::Windows, &env(&[("HOMEPATH", "\\Users\\ana")])),
            None
        );
        assert_eq!(aws_files(Os::Windows, &env(&[])), None);
    }

    #[test]
    fn aws_counts_an_empty_variable_as_set_like_the_sdks() {
        // HOME="" is a home of "" for the SDKs: they read .aws/config from
        // the working directory, and the message should say so.
        assert_eq!(
            aws_dir(
                Os::Windows,
                &env(&[("HOME", ""), ("USERPROFILE", "C:\\Users\\ana")])
            ),
            path(".aws")
        );
        assert_eq!(aws_dir(Os::Linux, &env(&[("HOME", "")])), path(".aws"));
    }

    #[test]
    fn aws_variables_move_each_file_and_expand_a_leading_tilde() {
        let moved = env(&[
            ("HOME", "/home/ana"),
            ("AWS_CONFIG_FILE", "/etc/aws/config"),
            ("AWS_SHARED_CREDENTIALS_FILE", "~/secrets/aws"),
        ]);
        for os in UNIXES {
            assert_eq!(
                aws_files(os, &moved),
                Some(AwsFiles {
                    config: "/etc/aws/config".into(),
                    credentials: "/home/ana/secrets/aws".into(),
                })
            );
        }
        // Only `~` before a separator is the home: `~bob` is a name.
        let named = env(&[("HOME", "/home/ana"), ("AWS_CONFIG_FILE", "~bob/config")]);
        assert_eq!(
            aws_files(Os::Linux, &named).map(|f| f.config),
            path("~bob/config")
        );
        // On Windows both separators follow `~`, and the path takes `\`.
        let windows = env(&[
            ("USERPROFILE", "C:\\Users\\ana"),
            ("AWS_CONFIG_FILE", "~/aws/config"),
            ("AWS_SHARED_CREDENTIALS_FILE", "~\\aws\\credentials"),
        ]);
        assert_eq!(
            aws_files(Os::Windows, &windows),
            Some(AwsFiles {
                config: "C:\\Users\\ana\\aws\\config".into(),
                credentials: "C:\\Users\\ana\\aws\\credentials".into(),
            })
        );
        // On Unix a backslash is part of a name.
        assert_eq!(
            aws_files(
                Os::Linux,
                &env(&[("HOME", "/h"), ("AWS_CONFIG_FILE", "~\\x")])
            )
            .map(|f| f.config),
            path("~\\x")
        );
    }

    #[test]
    fn aws_variables_find_files_without_a_home() {
        let moved = env(&[
            ("AWS_CONFIG_FILE", "/etc/aws/config"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/etc/aws/credentials"),
        ]);
        assert_eq!(
            aws_files(Os::Linux, &moved).map(|f| f.credentials),
            path("/etc/aws/credentials")
        );
        // A `~` with no home stays, as the SDKs leave it.
        let tilde = env(&[
            ("AWS_CONFIG_FILE", "~/config"),
            ("AWS_SHARED_CREDENTIALS_FILE", "~"),
        ]);
        assert_eq!(
            aws_files(Os::MacOs, &tilde),
            Some(AwsFiles {
                config: "~/config".into(),
                credentials: "~".into(),
            })
        );
        // One file moved, the other with no home: no answer.
        assert_eq!(
            aws_files(Os::Linux, &env(&[("AWS_CONFIG_FILE", "/etc/aws/config")])),
            None
        );
    }

    #[test]
    fn aws_files_are_described_briefly_when_together() {
        fn files(os: Os, e: Env) -> Option<String> {
            aws_files(os, e).map(|f| f.describe(os))
        }
        assert_eq!(
            files(Os::Linux, &env(&[("HOME", "/home/ana")])),
            Some("/home/ana/.aws/{config,credentials}".into())
        );
        assert_eq!(
            files(Os::Windows, &env(&[("USERPROFILE", "C:\\Users\\ana")])),
            Some("C:\\Users\\ana\\.aws\\{config,credentials}".into())
        );
        assert_eq!(
            files(
                Os::Linux,
                &env(&[
                    ("HOME", "/home/ana"),
                    ("AWS_CONFIG_FILE", "/etc/aws/config")
                ])
            ),
            Some("/etc/aws/config and /home/ana/.aws/credentials".into())
        );
    }

    #[test]
    fn aws_files_for_a_message_say_why_there_is_no_place() {
        assert_eq!(
            aws_files_shown(Os::MacOs, &env(&[("HOME", "/Users/ana")])),
            "/Users/ana/.aws/{config,credentials}"
        );
        assert_eq!(
            aws_files_shown(Os::Linux, &env(&[("USERPROFILE", "C:\\Users\\ana")])),
            "~/.aws (no home directory: HOME is unset)"
        );
        assert_eq!(
            aws_files_shown(Os::Windows, &env(&[("HOMEDRIVE", "C:")])),
            "~\\.aws (no home directory: none of HOME, USERPROFILE, HOMEDRIVE with HOMEPATH is set)"
        );
    }

    #[test]
    fn gcloud_on_unix_is_home_dot_config_gcloud() {
        let home = env(&[("HOME", "/home/ana"), ("APPDATA", "/nope")]);
        for os in UNIXES {
            assert_eq!(
                gcloud_dir(os, &home),
                path("/home/ana/.config/gcloud"),
                "{os:?}"
            );
            // No home, or an empty one: no place to look.
            assert_eq!(gcloud_dir(os, &env(&[("APPDATA", "/nope")])), None);
            assert_eq!(gcloud_dir(os, &env(&[("HOME", "")])), None);
        }
    }

    #[test]
    fn gcloud_on_windows_is_appdata_then_the_system_drive() {
        let appdata = env(&[
            ("APPDATA", "C:\\Users\\ana\\AppData\\Roaming"),
            ("HOME", "D:\\home"),
            ("USERPROFILE", "C:\\Users\\ana"),
        ]);
        assert_eq!(
            gcloud_dir(Os::Windows, &appdata),
            path("C:\\Users\\ana\\AppData\\Roaming\\gcloud")
        );
        assert_eq!(
            gcloud_dir(Os::Windows, &env(&[("SystemDrive", "E:")])),
            path("E:\\gcloud")
        );
        // Neither: gcloud's own last resort.
        assert_eq!(
            gcloud_dir(Os::Windows, &env(&[("HOME", "D:\\home")])),
            path("C:\\gcloud")
        );
        assert_eq!(
            gcloud_dir(Os::Windows, &env(&[("APPDATA", ""), ("SystemDrive", "")])),
            path("C:\\gcloud")
        );
    }

    #[test]
    fn cloudsdk_config_replaces_the_directory_everywhere_unless_empty() {
        for os in [Os::Linux, Os::MacOs, Os::Windows] {
            let set = env(&[
                ("CLOUDSDK_CONFIG", "/srv/gcloud"),
                ("HOME", "/home/ana"),
                ("APPDATA", "C:\\AppData"),
            ]);
            assert_eq!(gcloud_dir(os, &set), path("/srv/gcloud"), "{os:?}");
            let empty = env(&[
                ("CLOUDSDK_CONFIG", ""),
                ("HOME", "/home/ana"),
                ("APPDATA", "C:\\AppData"),
            ]);
            let expected = match os {
                Os::Windows => "C:\\AppData\\gcloud",
                Os::Linux | Os::MacOs => "/home/ana/.config/gcloud",
            };
            assert_eq!(gcloud_dir(os, &empty), path(expected), "{os:?}");
        }
    }

    #[test]
    fn ssh_is_home_on_unix_and_userprofile_on_windows() {
        let both = env(&[("HOME", "/home/ana"), ("USERPROFILE", "C:\\Users\\ana")]);
        for os in UNIXES {
            assert_eq!(ssh_dir(os, &both), path("/home/ana/.ssh"));
            assert_eq!(ssh_config_file(os, &both), path("/home/ana/.ssh/config"));
            assert_eq!(ssh_config_shown(os, &both), "/home/ana/.ssh/config");
        }
        assert_eq!(ssh_dir(Os::Windows, &both), path("C:\\Users\\ana\\.ssh"));
        assert_eq!(
            ssh_config_file(Os::Windows, &both),
            path("C:\\Users\\ana\\.ssh\\config")
        );
    }

    #[test]
    fn ssh_without_its_variable_is_named_as_openssh_writes_it() {
        // Each OS reads only its own variable.
        let home_only = env(&[("HOME", "/home/ana")]);
        let profile_only = env(&[("USERPROFILE", "C:\\Users\\ana")]);
        assert_eq!(ssh_dir(Os::Windows, &home_only), None);
        assert_eq!(ssh_dir(Os::Linux, &profile_only), None);
        assert_eq!(ssh_dir(Os::MacOs, &env(&[("HOME", "")])), None);
        assert_eq!(ssh_config_shown(Os::Windows, &home_only), "~/.ssh/config");
        assert_eq!(ssh_config_shown(Os::Linux, &env(&[])), "~/.ssh/config");
    }

    #[test]
    fn a_map_and_the_process_are_environments_too() {
        let map: HashMap<String, String> = [("HOME".to_owned(), "/home/ana".to_owned())].into();
        assert_eq!(
            gcloud_dir(Os::Linux, &map_env(&map)),
            path("/home/ana/.config/gcloud")
        );
        // Whatever this process has, the lookup agrees with std.
        assert_eq!(process_env("PATH"), std::env::var("PATH").ok());
    }
}
