//! Who may read keyhole's key and credential files, and the private
//! directories keyhole makes for its sockets.
//!
//! On Unix (macOS included) a file's mode says who may read it: keyhole
//! warns about a secret others may read, and makes its own directories 0700
//! from the start. Windows has no modes (access is the file's ACL, which
//! keyhole does not read): there [`mode`] is `None`, the check is skipped,
//! and a private directory is a plain one, private as far as the directory
//! it is made in is (the user's temporary directory is).

use std::fs::Metadata;
use std::io;
use std::path::Path;

/// The mode keyhole's private directories are made with, where there are
/// modes: the owner alone may list, enter and create.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// The permission bits of a file (`rwxrwxrwx`, the low nine bits of its
/// mode), or `None` on a system without modes (Windows).
pub fn mode(meta: &Metadata) -> Option<u32> {
    #[cfg(keyhole_unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Some(meta.permissions().mode() & 0o777)
    }
    #[cfg(not(keyhole_unix))]
    {
        let _ = meta;
        None
    }
}

/// Whether permission bits let anyone but the owner (its group, others)
/// read, write or run the file: what `chmod 600` takes away.
pub const fn others_may_access(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// The file's permission bits when they let others than its owner in (for
/// the warning about a secret file), else `None`; always `None` where
/// there are no modes (Windows: the check is skipped).
pub fn open_to_others(meta: &Metadata) -> Option<u32> {
    mode(meta).filter(|&m| others_may_access(m))
}

/// Creates the directory `path` (not its parents) for the owner alone: mode
/// [`PRIVATE_DIR_MODE`] from the start on Unix, so that there is no moment
/// where others may enter (the umask can only take bits away); a plain
/// directory on Windows, which inherits its parent's ACL. Fails, as
/// `create_dir` does, if `path` exists.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    #[cfg(keyhole_unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(PRIVATE_DIR_MODE)
            .create(path)
    }
    #[cfg(not(keyhole_unix))]
    {
        std::fs::DirBuilder::new().create(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_or_other_bits_are_access_by_others() {
        for private in [0o600, 0o400, 0o700, 0o000] {
            assert!(!others_may_access(private), "{private:o}");
        }
        for open in [0o644, 0o640, 0o604, 0o660, 0o606, 0o601, 0o610, 0o777] {
            assert!(others_may_access(open), "{open:o}");
        }
        // Bits above the permissions (setuid, the file type) are not access.
        assert!(!others_may_access(0o100600));
        assert!(!others_may_access(0o4600));
    }

    #[cfg(keyhole_unix)]
    #[test]
    fn a_file_readable_by_others_is_reported_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        std::fs::write(&file, b"x").expect("written");
        let set = |m: u32| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m)).expect("chmod");
            std::fs::metadata(&file).expect("metadata")
        };
        let meta = set(0o644);
        assert_eq!(mode(&meta), Some(0o644));
        assert_eq!(open_to_others(&meta), Some(0o644));
        let meta = set(0o600);
        assert_eq!(mode(&meta), Some(0o600));
        assert_eq!(open_to_others(&meta), None);
    }

    #[cfg(not(keyhole_unix))]
    #[test]
    fn without_modes_nothing_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = std::fs::metadata(dir.path()).expect("metadata");
        assert_eq!(mode(&meta), None);
        assert_eq!(open_to_others(&meta), None);
    }

    #[test]
    fn a_private_directory_is_made_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = dir.path().join("private");
        create_private_dir(&private).expect("created");
        let meta = std::fs::metadata(&private).expect("exists");
        assert!(meta.is_dir());
        #[cfg(keyhole_unix)]
        assert_eq!(mode(&meta), Some(PRIVATE_DIR_MODE));
        let again = create_private_dir(&private).expect_err("exists already");
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        // Its parents are not made.
        let deep = dir.path().join("a").join("b");
        assert!(create_private_dir(&deep).is_err());
    }
}
