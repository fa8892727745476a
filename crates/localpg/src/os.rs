//! The operating-system pieces: which user runs the server, commands as that user, process
//! groups, free ports.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::install::is_executable;

/// The OS users tried, in order, when this process is root (PostgreSQL refuses root).
pub(crate) const SERVER_USERS: &[&str] = &["postgres", "nobody"];

/// Who runs the server's programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RunAs {
    /// This process's own user.
    Me,
    /// Another user, through `runuser` (this process is root).
    User {
        name: String,
        uid: u32,
        runuser: PathBuf,
    },
}

/// `Me`, unless `dir` (just created by this process, so owned by its effective user) belongs
/// to root: then the first of [`SERVER_USERS`] that exists.
pub(crate) fn run_as_for(dir: &Path) -> Result<RunAs> {
    let owner = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("reading the owner of {}", dir.display()), e))?
        .uid();
    if owner != 0 {
        return Ok(RunAs::Me);
    }
    let runuser = [
        "/usr/sbin/runuser",
        "/sbin/runuser",
        "/usr/bin/runuser",
        "/bin/runuser",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| is_executable(p))
    .ok_or_else(|| {
        Error::Root(
            "runuser (util-linux) was not found to start it as another user; run as a \
                 user other than root"
                .into(),
        )
    })?;
    for name in SERVER_USERS {
        if let Some(uid) = uid_of(name) {
            return Ok(RunAs::User {
                name: (*name).to_owned(),
                uid,
                runuser,
            });
        }
    }
    Err(Error::Root(format!(
        "none of the OS users {} exists to run it; create one (useradd postgres) or run as \
         a user other than root",
        SERVER_USERS.join(", ")
    )))
}

/// The uid of OS user `name`, from `id -u` (so NSS users count too), else `/etc/passwd`.
fn uid_of(name: &str) -> Option<u32> {
    let from_id = ["/usr/bin/id", "/bin/id"]
        .iter()
        .find(|p| is_executable(Path::new(p)))
        .and_then(|id| Command::new(id).args(["-u", name]).output().ok())
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok());
    from_id.or_else(|| {
        std::fs::read_to_string("/etc/passwd")
            .ok()?
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(2)?.parse().ok())
    })
}

/// The words before a program's path that run it as `run_as`.
pub(crate) fn prefix_as(run_as: &RunAs) -> Vec<String> {
    match run_as {
        RunAs::Me => Vec::new(),
        RunAs::User { name, runuser, .. } => vec![
            runuser.display().to_string(),
            "-u".into(),
            name.clone(),
            "--".into(),
        ],
    }
}

/// A command that runs `program` as `run_as`.
pub(crate) fn command_as(run_as: &RunAs, program: &Path) -> Result<Command> {
    Ok(match run_as {
        RunAs::Me => Command::new(program),
        RunAs::User { name, runuser, .. } => {
            let mut c = Command::new(runuser);
            c.args(["-u", name, "--"]).arg(program);
            c
        }
    })
}

/// Put the command's process (and so the server it starts) in a process group of its own:
/// a Ctrl-C at the terminal then reaches only this process.
pub(crate) fn in_own_process_group(cmd: &mut Command) {
    cmd.process_group(0);
}

/// A port of 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port on 127.0.0.1".into(), e))
}

/// `s` quoted for `/bin/sh`.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        let nasty = "a b'c$d";
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(nasty)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), nasty);
    }

    #[test]
    fn root_runs_the_server_as_an_existing_other_user() {
        let dir = Path::new("/");
        match run_as_for(dir) {
            // "/" belongs to root everywhere: this tests the root branch for any caller.
            Ok(RunAs::User { name, uid, .. }) => {
                assert!(SERVER_USERS.contains(&name.as_str()));
                assert_ne!(uid, 0);
            }
            Ok(RunAs::Me) => panic!("{} is owned by root", dir.display()),
            Err(e) => assert!(matches!(e, Error::Root(_)), "{e}"),
        }
    }
}
