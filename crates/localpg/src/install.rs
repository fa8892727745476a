//! Finding a PostgreSQL installation (`initdb` and `pg_ctl` side by side) and, where there
//! is none, what to install.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where PostgreSQL's programs usually are when they are not on `PATH`, in the order tried.
/// A `*` matches within one path component; its matches are tried highest version first.
pub const USUAL_PLACES: &[&str] = &[
    // Debian and Ubuntu (the postgresql-N packages), and the PGDG packages.
    "/usr/lib/postgresql/*/bin",
    // Built from source with the default prefix.
    "/usr/local/pgsql/bin",
    // Homebrew on Apple silicon, then on Intel (postgresql@17, postgresql@16, ...).
    "/opt/homebrew/opt/postgresql*/bin",
    "/usr/local/opt/postgresql*/bin",
];

/// When set, the directory that must hold `initdb` and `pg_ctl`: nothing else is searched.
pub const PG_BIN_ENV: &str = "PG_BIN";

/// When set, replaces [`USUAL_PLACES`]: places separated by `:`, each possibly with a `*`.
/// Empty means "no usual places" (only `PATH` is searched). Meant for tests and unusual
/// layouts.
pub const SEARCH_ENV: &str = "SHARDLEASE_PG_SEARCH";

/// A directory holding PostgreSQL's server programs `initdb` and `pg_ctl` (and `postgres`,
/// which `pg_ctl` finds beside itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    bin: PathBuf,
}

impl Installation {
    /// The installation [`Search::from_env`] finds: `$PG_BIN` if set, else the first
    /// directory on `PATH` with both programs, else the first of the usual places.
    pub fn find() -> Result<Installation, NotInstalled> {
        Search::from_env().find()
    }

    /// The installation in `dir`, if both programs are there.
    pub fn at(dir: impl Into<PathBuf>) -> Option<Installation> {
        let dir = dir.into();
        if !(is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"))) {
            return None;
        }
        // A PATH entry may hold symbolic links (/usr/local/bin/initdb ->
        // /usr/lib/postgresql/15/bin/initdb): name the real directory when it has both.
        let real = std::fs::canonicalize(dir.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .filter(|real| is_executable(&real.join("pg_ctl")));
        Some(Installation {
            bin: real.unwrap_or(dir),
        })
    }

    /// The directory of the programs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The `initdb` program.
    pub fn initdb(&self) -> PathBuf {
        self.bin.join("initdb")
    }

    /// The `pg_ctl` program.
    pub fn pg_ctl(&self) -> PathBuf {
        self.bin.join("pg_ctl")
    }

    /// The version, from `pg_ctl --version` (e.g. `15.14`); `None` when that cannot run.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(self.pg_ctl()).arg("--version").output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        // "pg_ctl (PostgreSQL) 15.14 (Debian 15.14-1.pgdg120+1)"
        let rest = text.split_once("(PostgreSQL)")?.1;
        rest.split_whitespace().next().map(str::to_owned)
    }
}

/// Where to look for an installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    /// When set, the only directory tried.
    pub pg_bin: Option<PathBuf>,
    /// The directories of `PATH`, tried first, in order.
    pub path: Vec<PathBuf>,
    /// Then these places (see [`USUAL_PLACES`]).
    pub places: Vec<String>,
}

impl Search {
    /// From the environment: `PG_BIN`, `PATH`, and `SHARDLEASE_PG_SEARCH` or the usual places.
    pub fn from_env() -> Search {
        let pg_bin = std::env::var_os(PG_BIN_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let places = match std::env::var(SEARCH_ENV) {
            Ok(list) => list
                .split(':')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            Err(_) => USUAL_PLACES.iter().map(|s| (*s).to_owned()).collect(),
        };
        Search {
            pg_bin,
            path,
            places,
        }
    }

    /// The first directory with both `initdb` and `pg_ctl`.
    pub fn find(&self) -> Result<Installation, NotInstalled> {
        if let Some(dir) = &self.pg_bin {
            return Installation::at(dir).ok_or_else(|| NotInstalled {
                searched: vec![format!("{PG_BIN_ENV}={}", dir.display())],
            });
        }
        let found = self
            .path
            .iter()
            .filter(|d| d.is_absolute())
            .cloned()
            .chain(self.places.iter().flat_map(|p| expand(p)))
            .find_map(Installation::at);
        found.ok_or_else(|| {
            let mut searched = vec!["PATH".to_owned()];
            searched.extend(self.places.iter().cloned());
            NotInstalled { searched }
        })
    }
}

/// No installation was found: says where it looked and what to install, per platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NotInstalled {
    /// Where it looked.
    pub searched: Vec<String>,
}

/// The install commands, per platform, that [`NotInstalled`] prints.
pub const INSTALL_HINT: &str = concat!(
    "  Debian/Ubuntu:  sudo apt-get install postgresql\n",
    "  Fedora:         sudo dnf install postgresql-server\n",
    "  macOS:          brew install postgresql@17",
);

impl fmt::Display for NotInstalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no PostgreSQL installation found (looked for initdb and pg_ctl in {}).\n\
             Install PostgreSQL, then run this again:\n{INSTALL_HINT}",
            self.searched.join(", ")
        )
    }
}

/// The directories `place` names: itself, or for a `*` in one component, every match that
/// exists, highest version first (the digits of what the `*` matched: `15` before `9.6`,
/// `postgresql@17` before `postgresql@16` before `postgresql`).
fn expand(place: &str) -> Vec<PathBuf> {
    let path = Path::new(place);
    let comps: Vec<&std::ffi::OsStr> = path.iter().collect();
    let Some(star) = comps
        .iter()
        .position(|c| c.to_str().is_some_and(|s| s.contains('*')))
    else {
        return vec![path.to_path_buf()];
    };
    let parent: PathBuf = comps[..star].iter().collect();
    let rest: PathBuf = comps[star + 1..].iter().collect();
    let pattern = comps[star].to_str().unwrap_or_default();
    let (prefix, suffix) = pattern.split_once('*').unwrap_or((pattern, ""));
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let matched = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            Some((version_key(matched), e.path().join(&rest)))
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The numbers in `s`: `"9.6"` → `[9, 6]`, `"@17"` → `[17]`, `""` → `[]`.
fn version_key(s: &str) -> Vec<u32> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A scratch directory removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "shardlease-localpg-test-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        /// `rel/initdb` and `rel/pg_ctl`, executable (only their names matter here).
        fn programs(&self, rel: &str) -> PathBuf {
            let dir = self.0.join(rel);
            std::fs::create_dir_all(&dir).unwrap();
            for p in ["initdb", "pg_ctl"] {
                std::fs::write(dir.join(p), "#!/bin/sh\n").unwrap();
                std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(0o755))
                    .unwrap();
            }
            dir
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn search(places: Vec<String>) -> Search {
        Search {
            pg_bin: None,
            path: Vec::new(),
            places,
        }
    }

    #[test]
    fn the_highest_version_of_a_place_wins() {
        let s = Scratch::new("versions");
        s.programs("lib/postgresql/9.6/bin");
        let v15 = s.programs("lib/postgresql/15/bin");
        s.programs("lib/postgresql/13/bin");
        std::fs::create_dir_all(s.0.join("lib/postgresql/16/bin")).unwrap(); // no programs
        let place = format!("{}/lib/postgresql/*/bin", s.0.display());
        assert_eq!(search(vec![place]).find().unwrap().bin_dir(), v15);
    }

    #[test]
    fn homebrew_versions_before_the_unversioned_formula() {
        let s = Scratch::new("brew");
        s.programs("opt/postgresql/bin");
        let v17 = s.programs("opt/postgresql@17/bin");
        s.programs("opt/postgresql@16/bin");
        let place = format!("{}/opt/postgresql*/bin", s.0.display());
        assert_eq!(search(vec![place]).find().unwrap().bin_dir(), v17);
    }

    #[test]
    fn path_comes_before_the_usual_places_and_needs_both_programs() {
        let s = Scratch::new("path");
        let only_initdb = s.0.join("half");
        std::fs::create_dir_all(&only_initdb).unwrap();
        std::fs::write(only_initdb.join("initdb"), "").unwrap();
        std::fs::set_permissions(
            only_initdb.join("initdb"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let on_path = s.programs("bin");
        let usual = s.programs("usual/bin");
        let found = Search {
            pg_bin: None,
            path: vec![only_initdb.clone(), on_path.clone()],
            places: vec![usual.display().to_string()],
        }
        .find()
        .unwrap();
        assert_eq!(found.bin_dir(), on_path);
        let found = Search {
            pg_bin: None,
            path: vec![only_initdb],
            places: vec![usual.display().to_string()],
        }
        .find()
        .unwrap();
        assert_eq!(found.bin_dir(), usual);
    }

    #[test]
    fn pg_bin_is_the_only_place_tried_when_set() {
        let s = Scratch::new("pgbin");
        let usual = s.programs("usual/bin");
        let err = Search {
            pg_bin: Some(s.0.join("nothing")),
            path: Vec::new(),
            places: vec![usual.display().to_string()],
        }
        .find()
        .unwrap_err();
        assert!(err.to_string().contains("PG_BIN="), "{err}");
    }

    #[test]
    fn nothing_found_names_the_places_and_every_platform_install_command() {
        let err = search(vec!["/nonexistent/*/bin".into()])
            .find()
            .unwrap_err();
        let text = err.to_string();
        for needle in [
            "/nonexistent/*/bin",
            "sudo apt-get install postgresql",
            "sudo dnf install postgresql-server",
            "brew install postgresql@17",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn version_keys_order_numerically() {
        assert!(version_key("15") > version_key("9.6"));
        assert!(version_key("@17") > version_key("@16"));
        assert!(version_key("@16") > version_key(""));
    }
}
