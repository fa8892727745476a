//! The backstop for a cluster whose owner dies without dropping it: a `/bin/sh` waiting for
//! the end of a pipe that only the owner holds. When the owner exits (however: SIGKILL, a
//! `static` never dropped, `std::process::exit`) the kernel closes the pipe; the shell stops
//! the server and removes its directory.

use std::io;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::error::{Error, Result};
use crate::os::{in_own_process_group, shell_quote};

/// The watching shell. Dropping it kills the shell (without cleaning up): the owner does
/// the cleanup itself then.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    // Held only to be closed when this process ends; never written.
    _pipe: ChildStdin,
}

impl Watchdog {
    /// Watch this process: when it ends, run `stop` (a program and its arguments) if the
    /// server is running, then remove `dir`.
    pub(crate) fn spawn(stop: &[String], dir: &Path) -> Result<Watchdog> {
        let dir = dir.display().to_string();
        let pid_file = format!("{dir}/data/postmaster.pid");
        let stop: Vec<String> = stop.iter().map(|a| shell_quote(a)).collect();
        // Ignore the signals a terminal or a process group would send: only the pipe's end
        // (EOF, or an error) makes it act.
        let script = format!(
            "trap '' INT TERM HUP QUIT\n\
             read _ignored\n\
             if [ -f {pid} ]; then {stop} >/dev/null 2>&1; fi\n\
             rm -rf {dir}\n",
            pid = shell_quote(&pid_file),
            stop = stop.join(" "),
            dir = shell_quote(&dir),
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        in_own_process_group(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io("starting the cleanup watchdog (/bin/sh)".into(), e))?;
        let pipe = child.stdin.take().ok_or_else(|| {
            Error::io(
                "starting the cleanup watchdog (/bin/sh)".into(),
                io::Error::other("no stdin pipe"),
            )
        })?;
        Ok(Watchdog { child, _pipe: pipe })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
