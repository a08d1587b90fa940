//! Local PostgreSQL clusters for `podrouter demo` and the integration tests.
//!
//! This module owns everything about running the PostgreSQL server binaries of this machine:
//! finding them ([`PgBinaries::find`]); running them as the `postgres` OS user when we are
//! root, because initdb and postgres refuse to run as root ([`PgBinaries::command`],
//! [`chown_for_server`], [`make_traversable`]); a cached, `initdb`'ed template data directory
//! that new clusters are copied from, since initdb is slow ([`template`]); and the lifecycle of
//! one postmaster ([`LocalCluster`]): started as a direct child process, ready once it accepts
//! a real connection, stopped fast, immediately or by SIGKILL, and paused for tests.
//!
//! Every cluster made here has the superuser `postgres`, trusted on its unix socket (in the
//! data directory) and on loopback TCP; every other role logs in over TCP with SCRAM-SHA-256,
//! as tenant roles do behind the router's SCRAM pass-through.

use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use sqlx::{Connection, PgConnection};

/// Environment variable naming the directory of the server binaries; it wins over any search.
pub const BINDIR_ENV: &str = "PODROUTER_PG_BINDIR";
/// The superuser of every cluster made here (`initdb -U postgres`).
pub const SUPERUSER: &str = "postgres";
/// The OS user the server binaries run as when we are root.
pub const SERVER_OS_USER: &str = "postgres";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `start` waits for backends left behind by a killed postmaster to exit.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_TAIL_LINES: usize = 20;

/// Settings every cluster starts with (before the caller's own, which win).
const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "32MB"),
    ("max_connections", "200"),
    ("wal_level", "logical"),
    ("max_wal_senders", "20"),
    ("max_replication_slots", "20"),
    ("logging_collector", "off"),
    // The default since PostgreSQL 14; pinned so tenant roles get SCRAM verifiers on older ones.
    ("password_encryption", "scram-sha-256"),
];

const PG_HBA: &str = "\
# Written by podrouter (localpg). The superuser `postgres` is trusted on the unix socket and on
# loopback; every other role logs in with SCRAM-SHA-256, as tenant roles do behind the router.
local all all trust
local replication all trust
host all postgres 127.0.0.1/32 trust
host all postgres ::1/128 trust
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
";

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, via `pg_config --bindir`, \
         or under /usr/lib/postgresql/*/bin; install them, e.g. `apt-get install postgresql`, \
         or set {BINDIR_ENV} to the directory that holds them"
    )]
    BinariesNotFound,
    #[error(
        "{BINDIR_ENV}={} does not contain both initdb and postgres; point it at the bin directory \
         of a PostgreSQL install (e.g. /usr/lib/postgresql/15/bin) or unset it",
        dir.display()
    )]
    BadBinDir { dir: PathBuf },
    #[error(
        "running as root, but there is no `{SERVER_OS_USER}` OS user to run the PostgreSQL server as \
         (initdb and postgres refuse to run as root); create one (`useradd -r {SERVER_OS_USER}`) \
         or run as a normal user"
    )]
    NoServerUser,
    #[error("could not look up the `{SERVER_OS_USER}` OS user: {0}")]
    UserLookup(Errno),
    #[error(
        "the `{SERVER_OS_USER}` OS user (which runs the server, since we are root) cannot reach {}: \
         {} (mode {mode:o}, owner uid {owner}) is not searchable by it; allow it \
         (`chmod o+x {}`) or use a directory elsewhere",
        path.display(),
        blocker.display(),
        blocker.display()
    )]
    NotReachable {
        path: PathBuf,
        blocker: PathBuf,
        mode: u32,
        owner: u32,
    },
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`{command}` failed ({status}); its output:\n{output}")]
    ToolFailed {
        command: String,
        status: ExitStatus,
        output: String,
    },
    #[error(
        "could not tell the PostgreSQL major version from `{} --version`, which printed {output:?}; \
         check that it is a PostgreSQL server binary",
        tool.display()
    )]
    UnknownVersion { tool: PathBuf, output: String },
    #[error(
        "{} exists but is not a PostgreSQL data directory (it has no PG_VERSION); remove it or choose \
         another directory",
        path.display()
    )]
    NotADataDir { path: PathBuf },
    #[error(
        "template {} is for PostgreSQL {template_version} but the server binaries in {} are \
         PostgreSQL {server_version}; use `localpg::template` with these binaries",
        template.display(),
        bindir.display()
    )]
    TemplateMismatch {
        template: PathBuf,
        template_version: String,
        bindir: PathBuf,
        server_version: String,
    },
    #[error(
        "postgres for {} on port {port} exited during startup ({status}); its log is {}, ending:\n{tail}",
        datadir.display(),
        log.display()
    )]
    ServerExited {
        datadir: PathBuf,
        port: u16,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "postgres for {} on port {port} did not accept connections within {} s (last attempt: \
         {last_error}), so it was shut down; its log is {}, ending:\n{tail}",
        datadir.display(),
        START_TIMEOUT.as_secs(),
        log.display()
    )]
    StartTimeout {
        datadir: PathBuf,
        port: u16,
        last_error: String,
        log: PathBuf,
        tail: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LocalPgError + 'a {
    move |source| LocalPgError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn absolute(path: &Path) -> Result<PathBuf, LocalPgError> {
    std::path::absolute(path).map_err(io_err("resolve", path))
}

fn is_data_dir(dir: &Path) -> bool {
    dir.join("PG_VERSION").is_file()
}

// ---------------------------------------------------------------------------------------------
// Running as root
// ---------------------------------------------------------------------------------------------

/// Whether this process runs as root (effective uid 0), in which case the server binaries run
/// as the `postgres` OS user.
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[derive(Debug)]
struct ServerUser {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    home: PathBuf,
}

/// The OS user to run the server binaries as: `None` when we are not root.
fn server_user() -> Result<Option<&'static ServerUser>, LocalPgError> {
    static USER: OnceLock<Result<Option<ServerUser>, Errno>> = OnceLock::new();
    if !running_as_root() {
        return Ok(None);
    }
    let found = USER.get_or_init(|| {
        let user = User::from_name(SERVER_OS_USER)?;
        Ok(user.map(|u| {
            let groups = CString::new(SERVER_OS_USER)
                .ok()
                .and_then(|name| nix::unistd::getgrouplist(&name, u.gid).ok())
                .unwrap_or_else(|| vec![u.gid]);
            ServerUser {
                uid: u.uid,
                gid: u.gid,
                groups,
                home: u.dir,
            }
        }))
    });
    match found {
        Ok(Some(user)) => Ok(Some(user)),
        Ok(None) => Err(LocalPgError::NoServerUser),
        Err(errno) => Err(LocalPgError::UserLookup(*errno)),
    }
}

/// Gives `path` (one file or directory, not recursively) to the `postgres` OS user when we are
/// root, so that the server can write it; a no-op otherwise.
pub fn chown_for_server(path: &Path) -> Result<(), LocalPgError> {
    if let Some(user) = server_user()? {
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(io_err("change the owner of", path))?;
    }
    Ok(())
}

fn chown_tree(path: &Path, user: &ServerUser) -> Result<(), LocalPgError> {
    std::os::unix::fs::lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .map_err(io_err("change the owner of", path))?;
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err("read", path))? {
            let entry = entry.map_err(io_err("read", path))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// When we are root, makes `dir` (which must exist) searchable by the `postgres` OS user
/// (adds `x` for group and others) and checks that every directory above it is searchable too,
/// so that data directories and templates made under it are reachable by the server. A no-op
/// when not root.
pub fn make_traversable(dir: &Path) -> Result<(), LocalPgError> {
    if server_user()?.is_none() {
        return Ok(());
    }
    let dir = absolute(dir)?;
    let mode = fs::metadata(&dir).map_err(io_err("inspect", &dir))?.mode();
    if mode & 0o011 != 0o011 {
        fs::set_permissions(&dir, fs::Permissions::from_mode((mode & 0o7777) | 0o011))
            .map_err(io_err("change the permissions of", &dir))?;
    }
    check_reachable(&dir)
}

/// When root: fails unless the `postgres` OS user can search `dir` and every directory above.
fn check_reachable(dir: &Path) -> Result<(), LocalPgError> {
    let Some(user) = server_user()? else {
        return Ok(());
    };
    for ancestor in dir.ancestors() {
        let Ok(meta) = fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.mode();
        let bit = if meta.uid() == user.uid.as_raw() {
            0o100
        } else if user.groups.iter().any(|g| g.as_raw() == meta.gid()) {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Err(LocalPgError::NotReachable {
                path: dir.to_owned(),
                blocker: ancestor.to_owned(),
                mode: mode & 0o7777,
                owner: meta.uid(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// Where the PostgreSQL server binaries (initdb, postgres, pg_ctl, pg_dump, ...) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    pub bindir: PathBuf,
}

impl PgBinaries {
    /// Finds a directory holding both `initdb` and `postgres`: `$PODROUTER_PG_BINDIR` if set,
    /// else `pg_config --bindir`, else the real install behind the first PATH entry that has
    /// both, else the newest `/usr/lib/postgresql/*/bin`. When we are root it also checks that
    /// the `postgres` OS user exists, since the server binaries will run as it.
    pub fn find() -> Result<PgBinaries, LocalPgError> {
        let bins = Self::locate()?;
        server_user()?;
        tracing::debug!(bindir = %bins.bindir.display(), "found PostgreSQL server binaries");
        Ok(bins)
    }

    fn locate() -> Result<PgBinaries, LocalPgError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            return if has_server_binaries(&dir) {
                Ok(PgBinaries { bindir: dir })
            } else {
                Err(LocalPgError::BadBinDir { dir })
            };
        }
        let found = pg_config_bindir()
            .filter(|dir| has_server_binaries(dir))
            .or_else(|| std::env::var_os("PATH").and_then(|path| find_on_path(&path)))
            .or_else(|| newest_bindir_under(Path::new("/usr/lib/postgresql")));
        found
            .map(|bindir| PgBinaries { bindir })
            .ok_or(LocalPgError::BinariesNotFound)
    }

    /// The path of one tool of this install, e.g. `tool("pg_dump")`.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// A command for one tool of this install. When we are root it runs as the `postgres` OS
    /// user (uid, gid, no supplementary groups), with HOME, USER and LOGNAME set for it; HOME
    /// is that user's home directory (override it if that is not writable). As root, also pass
    /// absolute paths and set a current directory the `postgres` user can read.
    pub fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.tool(tool));
        if let Ok(Some(user)) = server_user() {
            let home = if user.home.is_dir() {
                user.home.clone()
            } else {
                std::env::temp_dir()
            };
            cmd.uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", home)
                .env("USER", SERVER_OS_USER)
                .env("LOGNAME", SERVER_OS_USER);
        }
        cmd
    }

    /// The major version of these binaries as PostgreSQL names it: `"15"`, or `"9.6"` before 10.
    pub fn major_version(&self) -> Result<String, LocalPgError> {
        let tool = self.tool("postgres");
        let out = Command::new(&tool)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("run", &tool))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match parse_major_version(&text) {
            Some(version) if out.status.success() => Ok(version),
            _ => Err(LocalPgError::UnknownVersion {
                tool,
                output: text.trim().to_owned(),
            }),
        }
    }
}

fn has_server_binaries(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// The first PATH entry with both initdb and postgres, resolved to the directory of the real
/// `postgres` (through symlinks such as /usr/local/bin/postgres) when that one has initdb too,
/// so that the other tools of the same install are found beside it.
fn find_on_path(path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .find_map(|dir| {
            if !has_server_binaries(&dir) {
                return None;
            }
            let real = fs::canonicalize(dir.join("postgres")).ok();
            match real.as_deref().and_then(Path::parent) {
                Some(parent) if has_server_binaries(parent) => Some(parent.to_owned()),
                _ => Some(dir),
            }
        })
}

/// The `<version>/bin` with server binaries under `root` with the highest version.
fn newest_bindir_under(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// `postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)` → `15`; `... 9.6.24` → `9.6`;
/// `... 17beta1` → `17`.
fn parse_major_version(text: &str) -> Option<String> {
    let word = text
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let mut parts = word.split('.');
    let major: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if major.parse::<u32>().ok()? >= 10 {
        return Some(major);
    }
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!minor.is_empty()).then(|| format!("{major}.{minor}"))
}

fn run_tool(mut cmd: Command) -> Result<(), LocalPgError> {
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LocalPgError::Io {
            action: "run",
            path: PathBuf::from(cmd.get_program()),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut output = String::from_utf8_lossy(&out.stderr).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stdout));
    Err(LocalPgError::ToolFailed {
        command,
        status: out.status,
        output: output.trim_end().to_owned(),
    })
}

/// A fresh sibling path for `target` to build in before renaming it into place.
fn scratch_sibling(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

// ---------------------------------------------------------------------------------------------
// Template
// ---------------------------------------------------------------------------------------------

/// Returns `cache_root/pg-template-<major>`, an initdb'ed data directory (superuser `postgres`,
/// UTF8, C locale, podrouter's pg_hba.conf) to copy clusters from, creating it the first time.
/// Safe to call concurrently from threads and processes: each initdb runs in a scratch
/// directory that is renamed into place, and the loser of a race uses the winner's.
pub fn template(bins: &PgBinaries, cache_root: &Path) -> Result<PathBuf, LocalPgError> {
    // Threads of one process take turns, so that only one of them runs initdb.
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let _turn = IN_PROCESS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());

    let cache_root = absolute(cache_root)?;
    let version = bins.major_version()?;
    let target = cache_root.join(format!("pg-template-{version}"));
    if is_data_dir(&target) {
        return Ok(target);
    }
    fs::create_dir_all(&cache_root).map_err(io_err("create", &cache_root))?;
    check_reachable(&cache_root)?;
    let scratch = scratch_sibling(&target);
    let made = initdb(bins, &scratch).and_then(|()| install_template(&scratch, &target));
    if made.is_err() {
        let _ = fs::remove_dir_all(&scratch);
    }
    made?;
    tracing::info!(template = %target.display(), "created PostgreSQL template data directory");
    Ok(target)
}

fn initdb(bins: &PgBinaries, dir: &Path) -> Result<(), LocalPgError> {
    fs::create_dir(dir).map_err(io_err("create", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("change the permissions of", dir))?;
    chown_for_server(dir)?;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let mut cmd = bins.command("initdb");
    cmd.arg("-D")
        .arg(dir)
        .args([
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "-A",
            "trust",
            "--no-sync",
        ])
        .current_dir(parent);
    if running_as_root() {
        cmd.env("HOME", parent);
    }
    run_tool(cmd)?;
    let hba = dir.join("pg_hba.conf");
    fs::write(&hba, PG_HBA).map_err(io_err("write", &hba))?;
    chown_for_server(&hba)
}

/// Renames the complete template `scratch` to `target`; if another thread or process got there
/// first, removes `scratch` and keeps theirs.
fn install_template(scratch: &Path, target: &Path) -> Result<(), LocalPgError> {
    match fs::rename(scratch, target) {
        Ok(()) => Ok(()),
        Err(_) if is_data_dir(target) => {
            let _ = fs::remove_dir_all(scratch);
            Ok(())
        }
        // Only complete templates are ever renamed into place, so this is not one of ours.
        Err(_) if target.exists() => Err(LocalPgError::NotADataDir {
            path: target.to_owned(),
        }),
        Err(e) => Err(io_err("rename into place", target)(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Standbys
// ---------------------------------------------------------------------------------------------

/// Makes `datadir` a streaming standby of the cluster on 127.0.0.1:`primary_port`, cloned
/// with `pg_basebackup -R` (WAL streamed during the copy; `standby.signal` and a
/// `primary_conninfo` carrying `application_name=<application_name>`, the name a primary's
/// `synchronous_standby_names` uses) into a scratch directory renamed into place. The clone
/// does not keep the primary's `synchronous_standby_names`: promoted, it would wait for
/// standbys that follow someone else, or for itself. A `datadir` that already holds a data
/// directory is left as it is, to be reused. Start it with [`LocalCluster::start`].
pub fn clone_standby(
    bins: &PgBinaries,
    primary_port: u16,
    datadir: &Path,
    application_name: &str,
) -> Result<(), LocalPgError> {
    assert!(
        !application_name.is_empty()
            && application_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "a standby's application_name is a plain word: {application_name:?}"
    );
    let datadir = absolute(datadir)?;
    if is_data_dir(&datadir) {
        return Ok(());
    }
    if datadir.exists() {
        fs::remove_dir(&datadir).map_err(|_| LocalPgError::NotADataDir {
            path: datadir.clone(),
        })?;
    }
    let parent = datadir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    check_reachable(parent)?;
    let scratch = scratch_sibling(&datadir);
    let made = (|| {
        fs::create_dir(&scratch).map_err(io_err("create", &scratch))?;
        fs::set_permissions(&scratch, fs::Permissions::from_mode(0o700))
            .map_err(io_err("change the permissions of", &scratch))?;
        chown_for_server(&scratch)?;
        let mut cmd = bins.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&scratch)
            .arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={primary_port} user={SUPERUSER} application_name={application_name}"
            ))
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .current_dir(parent);
        if running_as_root() {
            cmd.env("HOME", parent);
        }
        run_tool(cmd)?;
        let auto = scratch.join("postgresql.auto.conf");
        let text = fs::read_to_string(&auto).map_err(io_err("read", &auto))?;
        let kept: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("synchronous_standby_names"))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&auto, kept).map_err(io_err("write", &auto))?;
        fs::rename(&scratch, &datadir).map_err(io_err("rename into place", &datadir))
    })();
    if made.is_err() {
        let _ = fs::remove_dir_all(&scratch);
    }
    made
}

// ---------------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------------

/// One running postmaster, a direct child of this process. Dropping it shuts the server down
/// immediately (SIGQUIT, then SIGKILL after 5 s); [`LocalCluster::stop`] is the clean way.
#[derive(Debug)]
pub struct LocalCluster {
    child: Option<Child>,
    pid: u32,
    port: u16,
    datadir: PathBuf,
    log: PathBuf,
    paused: AtomicBool,
}

/// The log file of a data directory: `<parent>/<dirname>.log`, beside it.
fn log_path_for(datadir: &Path) -> PathBuf {
    let name = datadir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".into());
    datadir.with_file_name(format!("{name}.log"))
}

impl LocalCluster {
    /// Makes `datadir` a copy of `template` (made by [`template`] with the same binaries),
    /// owned by the `postgres` OS user when we are root. A `datadir` that already holds a data
    /// directory is left as it is, to be reused.
    pub fn create(bins: &PgBinaries, template: &Path, datadir: &Path) -> Result<(), LocalPgError> {
        let datadir = absolute(datadir)?;
        if is_data_dir(&datadir) {
            return Ok(());
        }
        if datadir.exists() {
            let empty = fs::read_dir(&datadir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(LocalPgError::NotADataDir { path: datadir });
            }
            fs::remove_dir(&datadir).map_err(io_err("remove", &datadir))?;
        }
        let template = absolute(template)?;
        let version_file = template.join("PG_VERSION");
        let template_version = fs::read_to_string(&version_file)
            .map_err(|_| LocalPgError::NotADataDir {
                path: template.clone(),
            })?
            .trim()
            .to_owned();
        let server_version = bins.major_version()?;
        if template_version != server_version {
            return Err(LocalPgError::TemplateMismatch {
                template,
                template_version,
                bindir: bins.bindir.clone(),
                server_version,
            });
        }
        let parent = datadir.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        check_reachable(parent)?;

        let scratch = scratch_sibling(&datadir);
        let copied = copy_data_dir(&template, &scratch);
        let placed = copied.and_then(|()| {
            fs::rename(&scratch, &datadir).map_err(io_err("rename into place", &datadir))
        });
        match placed {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = fs::remove_dir_all(&scratch);
                // Someone else created the same cluster meanwhile: theirs is as good.
                if is_data_dir(&datadir) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Starts `postgres` on `datadir` (listening on 127.0.0.1:`port` and on a unix socket in
    /// `datadir`) with podrouter's test-friendly settings and then `settings` (as `-c k=v`,
    /// overriding them), logging to `<parent>/<dirname>.log`, and waits up to 30 s until it
    /// accepts a connection. A `postmaster.pid` left by a dead server is removed first, after
    /// waiting for its orphaned backends to exit.
    pub async fn start(
        bins: &PgBinaries,
        datadir: &Path,
        port: u16,
        settings: &[(&str, String)],
    ) -> Result<LocalCluster, LocalPgError> {
        let datadir = absolute(datadir)?;
        if !is_data_dir(&datadir) {
            return Err(LocalPgError::NotADataDir { path: datadir });
        }
        check_reachable(&datadir)?;
        clear_stale_pid_file(&datadir).await?;

        let log = log_path_for(&datadir);
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err("open", &log))?;
        chown_for_server(&log)?;
        let log_start = log_file.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log_file.try_clone().map_err(io_err("open", &log))?;

        let mut cmd = bins.command("postgres");
        cmd.arg("-D").arg(&datadir).arg("-p").arg(port.to_string());
        for (key, value) in SERVER_SETTINGS {
            cmd.arg("-c").arg(format!("{key}={value}"));
        }
        cmd.arg("-c").arg(socket_dir_setting(&datadir));
        for (key, value) in settings {
            cmd.arg("-c").arg(format!("{key}={value}"));
        }
        let parent = datadir.parent().unwrap_or(Path::new("/"));
        cmd.stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .current_dir(parent);
        if running_as_root() {
            cmd.env("HOME", parent);
        }
        let child = cmd.spawn().map_err(io_err("run", &bins.tool("postgres")))?;
        let mut cluster = LocalCluster {
            pid: child.id(),
            child: Some(child),
            port,
            datadir,
            log,
            paused: AtomicBool::new(false),
        };
        cluster.wait_ready(log_start).await?;
        tracing::debug!(datadir = %cluster.datadir.display(), port, pid = cluster.pid, "postgres is up");
        Ok(cluster)
    }

    /// Waits until the server accepts a connection; on failure `self` is dropped by the caller,
    /// which shuts the server down.
    async fn wait_ready(&mut self, log_start: u64) -> Result<(), LocalPgError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.url_db("postgres");
        let expected_dir = fs::canonicalize(&self.datadir).unwrap_or_else(|_| self.datadir.clone());
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(LocalPgError::ServerExited {
                        datadir: self.datadir.clone(),
                        port: self.port,
                        status,
                        log: self.log.clone(),
                        tail: log_tail(&self.log, log_start),
                    });
                }
            }
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, probe(&url)).await {
                Ok(Ok(dir))
                    if fs::canonicalize(&dir).unwrap_or_else(|_| PathBuf::from(&dir))
                        == expected_dir =>
                {
                    return Ok(());
                }
                Ok(Ok(dir)) => format!(
                    "port {} is answered by another server (data directory {dir})",
                    self.port
                ),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            };
            if Instant::now() >= deadline {
                return Err(LocalPgError::StartTimeout {
                    datadir: self.datadir.clone(),
                    port: self.port,
                    last_error,
                    log: self.log.clone(),
                    tail: log_tail(&self.log, log_start),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser URL without a database: `postgres://postgres@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}", self.port)
    }

    /// The superuser URL of one database.
    pub fn url_db(&self, db: &str) -> String {
        format!("{}/{db}", self.url())
    }

    /// The data directory, as an absolute path.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// The server's log file, beside the data directory.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the postmaster is still running (it may have died on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn postmaster(&self) -> Pid {
        Pid::from_raw(self.pid as i32)
    }

    /// Sends a signal meant to end the postmaster, and wakes it and its children if paused so
    /// that they can act on it (a stopped orphan would otherwise live forever).
    fn signal_end(&self, signal: Signal) {
        let paused = self.paused.swap(false, Ordering::SeqCst);
        let children = if paused {
            children_of(self.postmaster())
        } else {
            Vec::new()
        };
        let _ = kill(self.postmaster(), signal);
        if paused {
            let _ = kill(self.postmaster(), Signal::SIGCONT);
            for child in children {
                let _ = kill(child, Signal::SIGCONT);
            }
        }
    }

    /// Fast shutdown: SIGINT to the postmaster (clients are disconnected, a checkpoint is
    /// written), SIGKILL if it has not exited within 10 s. Idempotent.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        self.signal_end(Signal::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(datadir = %self.datadir.display(), "postgres ignored a fast shutdown for 10 s; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Crash: SIGKILL to the postmaster only; its backends notice and exit on their own. The
    /// next [`LocalCluster::start`] on the same data directory runs crash recovery. Clusters
    /// run with `synchronous_commit=off`, so transactions committed just before the crash may
    /// be lost unless the session (or `settings`) turned it on.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            self.signal_end(Signal::SIGKILL);
        }
        let _ = child.wait();
    }

    /// Freezes the server: SIGSTOP to the postmaster and all its children. Connections stay
    /// open but get no answers until [`LocalCluster::resume`].
    pub fn pause(&self) {
        if self.child.is_none() {
            return;
        }
        self.paused.store(true, Ordering::SeqCst);
        let postmaster = self.postmaster();
        let _ = kill(postmaster, Signal::SIGSTOP);
        // Rescan, in case a fork was under way when the postmaster stopped.
        let mut stopped = Vec::new();
        for _ in 0..3 {
            for child in children_of(postmaster) {
                if !stopped.contains(&child) {
                    let _ = kill(child, Signal::SIGSTOP);
                    stopped.push(child);
                }
            }
        }
    }

    /// Undoes [`LocalCluster::pause`]: SIGCONT to the postmaster's children and then to it.
    pub fn resume(&self) {
        if self.child.is_none() {
            return;
        }
        let postmaster = self.postmaster();
        for child in children_of(postmaster) {
            let _ = kill(child, Signal::SIGCONT);
        }
        let _ = kill(postmaster, Signal::SIGCONT);
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        // Immediate shutdown: the postmaster SIGQUITs its backends and exits without a checkpoint.
        self.signal_end(Signal::SIGQUIT);
        let deadline = Instant::now() + DROP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `unix_socket_directories=<datadir>`, quoted when the path would otherwise be split.
fn socket_dir_setting(datadir: &Path) -> OsString {
    let mut setting = OsString::from("unix_socket_directories=");
    let text = datadir.to_string_lossy();
    if text.contains([',', ' ', '\t', '"']) {
        setting.push(format!("\"{}\"", text.replace('"', "\"\"")));
    } else {
        setting.push(datadir);
    }
    setting
}

/// Connects as the superuser and returns the server's data directory.
async fn probe(url: &str) -> Result<String, sqlx::Error> {
    let mut conn = PgConnection::connect(url).await?;
    let dir: String = sqlx::query_scalar("SELECT current_setting('data_directory')")
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(dir)
}

/// The last lines written to `log` after byte `from`.
fn log_tail(log: &Path, from: u64) -> String {
    let mut text = Vec::new();
    let read = File::open(log).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_end(&mut text)
    });
    if let Err(e) = read {
        return format!("(could not read {}: {e})", log.display());
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    if tail.is_empty() {
        "(nothing)".to_owned()
    } else {
        tail
    }
}

/// Removes `datadir/postmaster.pid` unless the postmaster it names is still running there.
/// Backends orphaned by a killed postmaster still hold its shared memory, so first wait (up to
/// 10 s) for every process working in `datadir` to exit; if some remain, the file stays and
/// postgres itself reports them.
async fn clear_stale_pid_file(datadir: &Path) -> Result<(), LocalPgError> {
    let pidfile = datadir.join("postmaster.pid");
    let Ok(text) = fs::read_to_string(&pidfile) else {
        return Ok(());
    };
    let pid = text
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0);
    if pid.is_some_and(|pid| postmaster_running_in(Pid::from_raw(pid), datadir)) {
        return Ok(());
    }
    let deadline = Instant::now() + ORPHAN_TIMEOUT;
    while !processes_in(datadir).is_empty() {
        if Instant::now() >= deadline {
            tracing::warn!(datadir = %datadir.display(), "processes of a dead postmaster are still running there");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match fs::remove_file(&pidfile) {
        Ok(()) => {
            tracing::debug!(pidfile = %pidfile.display(), "removed stale postmaster.pid");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", &pidfile)(e)),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `pid` is alive, not a zombie, and a postmaster working in `datadir` (its current
/// directory), or looks like a postgres process when its current directory cannot be read.
fn postmaster_running_in(pid: Pid, datadir: &Path) -> bool {
    if matches!(kill(pid, None), Err(Errno::ESRCH)) {
        return false;
    }
    let Some((comm, state, _)) = proc_stat(pid.as_raw()) else {
        return false;
    };
    if state == 'Z' {
        return false;
    }
    let postgres = comm == "postgres" || comm == "postmaster";
    match fs::read_link(format!("/proc/{}/cwd", pid.as_raw())) {
        Ok(cwd) => postgres && same_dir(&cwd, datadir),
        Err(_) => postgres,
    }
}

/// Live postgres processes whose current directory is `datadir` (backends work there).
fn processes_in(datadir: &Path) -> Vec<i32> {
    proc_pids()
        .filter(|pid| {
            proc_stat(*pid).is_some_and(|(comm, state, _)| comm == "postgres" && state != 'Z')
        })
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| same_dir(&cwd, datadir))
        })
        .collect()
}

fn children_of(parent: Pid) -> Vec<Pid> {
    proc_pids()
        .filter(|pid| proc_stat(*pid).is_some_and(|(_, _, ppid)| ppid == parent.as_raw()))
        .map(Pid::from_raw)
        .collect()
}

fn proc_pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
}

/// `(comm, state, ppid)` from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(String, char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may itself contain spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding 127.0.0.1:0 for a free port")
}

/// Copies a data directory with `cp -a`, keeping modes (and owners when root); when root and
/// the copy is not owned by the `postgres` OS user, gives it all to that user.
fn copy_data_dir(from: &Path, to: &Path) -> Result<(), LocalPgError> {
    let mut cp = Command::new("cp");
    cp.arg("-a").arg("--").arg(from).arg(to);
    run_tool(cp)?;
    if let Some(user) = server_user()? {
        let owner = fs::metadata(to).map_err(io_err("inspect", to))?.uid();
        if owner != user.uid.as_raw() {
            chown_tree(to, user)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory the server can reach even when the tests run as root.
    fn scratch() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        make_traversable(dir.path()).expect("make the tempdir traversable");
        dir
    }

    async fn connect(url: &str) -> PgConnection {
        PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    fn accepts_tcp(port: u16) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }

    #[test]
    fn clusters_can_live_in_tasks() {
        fn send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<LocalCluster>();
        send_sync::<LocalPgError>();
        let bins = PgBinaries {
            bindir: PathBuf::new(),
        };
        send(&LocalCluster::start(
            &bins,
            Path::new("/nonexistent"),
            1,
            &[],
        ));
    }

    #[test]
    fn parses_major_versions() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)\n")
                .as_deref(),
            Some("15")
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 9.6.24").as_deref(),
            Some("9.6")
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17beta1").as_deref(),
            Some("17")
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 16devel").as_deref(),
            Some("16")
        );
        assert_eq!(parse_major_version("something else"), None);
    }

    #[test]
    fn parses_proc_stat_with_odd_comm() {
        let (comm, state, ppid) = proc_stat(std::process::id() as i32).expect("own /proc stat");
        assert!(!comm.is_empty());
        assert!(state == 'R' || state == 'S');
        assert_eq!(ppid, nix::unistd::getppid().as_raw());
    }

    #[test]
    fn finds_the_real_install_behind_symlinks_on_path() {
        let bins = PgBinaries::find().expect("PostgreSQL server binaries");
        let real = fs::canonicalize(&bins.bindir).unwrap();
        let links = tempfile::tempdir().unwrap();
        for tool in ["initdb", "postgres"] {
            std::os::unix::fs::symlink(real.join(tool), links.path().join(tool)).unwrap();
        }
        let empty = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([empty.path(), links.path()]).unwrap();
        assert_eq!(find_on_path(&path), Some(real.clone()));
        assert!(
            real.join("pg_dump").is_file(),
            "tools of the same install are beside it"
        );
    }

    #[test]
    fn losing_a_template_race_keeps_the_winner() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("pg-template-99");
        for (i, content) in ["winner", "loser"].iter().enumerate() {
            let scratch = root.path().join(format!("scratch{i}"));
            fs::create_dir(&scratch).unwrap();
            fs::write(scratch.join("PG_VERSION"), content).unwrap();
            install_template(&scratch, &target).unwrap();
            assert!(!scratch.exists());
        }
        assert_eq!(
            fs::read_to_string(target.join("PG_VERSION")).unwrap(),
            "winner"
        );

        // A non-template in the way is reported, not replaced.
        let junk = root.path().join("pg-template-98");
        fs::create_dir(&junk).unwrap();
        fs::write(junk.join("file"), "x").unwrap();
        let scratch = root.path().join("scratch9");
        fs::create_dir(&scratch).unwrap();
        fs::write(scratch.join("PG_VERSION"), "98").unwrap();
        assert!(matches!(
            install_template(&scratch, &junk),
            Err(LocalPgError::NotADataDir { .. })
        ));
    }

    #[test]
    fn concurrent_template_calls_agree() {
        let bins = PgBinaries::find().expect("PostgreSQL server binaries");
        let dir = scratch();
        let cache = dir.path().join("cache");
        let made: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| template(&bins, &cache).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(made.iter().all(|t| *t == made[0]));
        assert!(is_data_dir(&made[0]));
        let hba = fs::read_to_string(made[0].join("pg_hba.conf")).unwrap();
        assert!(hba.contains("host all all 127.0.0.1/32 scram-sha-256"));
        let leftovers: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "only the template is left: {leftovers:?}"
        );
    }

    #[tokio::test]
    async fn cluster_serves_superuser_and_scram_roles_then_stops() {
        let bins = PgBinaries::find().expect("PostgreSQL server binaries");
        let dir = scratch();
        let template = template(&bins, &dir.path().join("cache")).unwrap();
        let datadir = dir.path().join("pod1");
        LocalCluster::create(&bins, &template, &datadir).unwrap();
        let port = free_port();
        let mut cluster =
            LocalCluster::start(&bins, &datadir, port, &[("work_mem", "8MB".to_owned())])
                .await
                .unwrap();
        assert_eq!(cluster.port(), port);
        assert_eq!(
            cluster.url(),
            format!("postgres://postgres@127.0.0.1:{port}")
        );
        assert!(cluster.log_path().is_file());
        assert!(cluster.is_running());

        let mut su = connect(&cluster.url_db("postgres")).await;
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut su)
            .await
            .unwrap();
        assert_eq!(user, "postgres");
        let work_mem: String = sqlx::query_scalar("SHOW work_mem")
            .fetch_one(&mut su)
            .await
            .unwrap();
        assert_eq!(work_mem, "8MB");
        let wal_level: String = sqlx::query_scalar("SHOW wal_level")
            .fetch_one(&mut su)
            .await
            .unwrap();
        assert_eq!(wal_level, "logical");

        sqlx::query("CREATE ROLE x LOGIN PASSWORD 'pw'")
            .execute(&mut su)
            .await
            .unwrap();
        let verifier: String =
            sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = 'x'")
                .fetch_one(&mut su)
                .await
                .unwrap();
        assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
        let mut x = connect(&format!("postgres://x:pw@127.0.0.1:{port}/postgres")).await;
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut x)
            .await
            .unwrap();
        assert_eq!(user, "x");
        x.close().await.unwrap();
        let wrong =
            PgConnection::connect(&format!("postgres://x:nope@127.0.0.1:{port}/postgres")).await;
        assert!(wrong.is_err(), "a wrong password must be refused");
        su.close().await.unwrap();

        cluster.stop().await;
        assert!(!cluster.is_running());
        assert!(
            !accepts_tcp(port),
            "port {port} still accepts connections after stop"
        );
        assert!(!datadir.join("postmaster.pid").exists());
        cluster.stop().await; // idempotent
    }

    #[tokio::test]
    async fn restarts_reuse_the_data_directory_even_after_a_crash() {
        let bins = PgBinaries::find().expect("PostgreSQL server binaries");
        let dir = scratch();
        let template = template(&bins, &dir.path().join("cache")).unwrap();
        let datadir = dir.path().join("pod");
        LocalCluster::create(&bins, &template, &datadir).unwrap();

        let mut first = LocalCluster::start(&bins, &datadir, free_port(), &[])
            .await
            .unwrap();
        let mut c = connect(&first.url_db("postgres")).await;
        for sql in ["CREATE TABLE kept (v int)", "INSERT INTO kept VALUES (42)"] {
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
        c.close().await.unwrap();
        first.stop().await;

        // A pid file naming a live process that is no postmaster (pid 1) is stale.
        fs::write(datadir.join("postmaster.pid"), "1\n").unwrap();
        // Creating again leaves the existing cluster alone.
        LocalCluster::create(&bins, &template, &datadir).unwrap();
        let mut second = LocalCluster::start(&bins, &datadir, free_port(), &[])
            .await
            .unwrap();
        let mut c = connect(&second.url_db("postgres")).await;
        let v: i32 = sqlx::query_scalar("SELECT v FROM kept")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(v, 42);
        // Clusters run with synchronous_commit=off: ask for a flushed commit before crashing.
        sqlx::query("SET synchronous_commit = on")
            .execute(&mut c)
            .await
            .unwrap();
        sqlx::query("INSERT INTO kept VALUES (43)")
            .execute(&mut c)
            .await
            .unwrap();

        // Crash: the postmaster dies, its pid file stays, a backend may linger for a moment.
        let crashed_port = second.port();
        second.kill9();
        assert!(datadir.join("postmaster.pid").exists());
        drop(c);
        let third = LocalCluster::start(&bins, &datadir, free_port(), &[])
            .await
            .unwrap();
        let mut c = connect(&third.url_db("postgres")).await;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 2);
        c.close().await.unwrap();
        assert!(!accepts_tcp(crashed_port));

        // Dropping shuts the server down too.
        let port = third.port();
        drop(third);
        assert!(!accepts_tcp(port));
    }

    #[tokio::test]
    async fn pause_freezes_the_server_until_resume() {
        let bins = PgBinaries::find().expect("PostgreSQL server binaries");
        let dir = scratch();
        let template = template(&bins, &dir.path().join("cache")).unwrap();
        let datadir = dir.path().join("pod");
        LocalCluster::create(&bins, &template, &datadir).unwrap();
        let mut cluster = LocalCluster::start(&bins, &datadir, free_port(), &[])
            .await
            .unwrap();
        let mut c = connect(&cluster.url_db("postgres")).await;

        cluster.pause();
        let frozen = tokio::time::timeout(
            Duration::from_millis(500),
            sqlx::query("SELECT 1").execute(&mut c),
        )
        .await;
        assert!(frozen.is_err(), "a paused server answered");
        let fresh = tokio::time::timeout(
            Duration::from_millis(500),
            PgConnection::connect(&cluster.url_db("postgres")),
        );
        assert!(fresh.await.is_err(), "a paused server accepted a session");
        cluster.resume();
        drop(c); // its half-done query cannot be resumed
        let mut c = connect(&cluster.url_db("postgres")).await;
        sqlx::query("SELECT 1").execute(&mut c).await.unwrap();
        c.close().await.unwrap();

        // Stopping a paused server works too.
        cluster.pause();
        cluster.stop().await;
        assert!(!accepts_tcp(cluster.port()));
    }

    #[tokio::test]
    async fn a_server_that_cannot_start_reports_its_log() {
        let bins = PgBinaries::find().expect("PostgreSQL server binaries");
        let dir = scratch();
        let template = template(&bins, &dir.path().join("cache")).unwrap();
        let datadir = dir.path().join("pod");
        LocalCluster::create(&bins, &template, &datadir).unwrap();
        let err = LocalCluster::start(
            &bins,
            &datadir,
            free_port(),
            &[("no_such_setting", "1".to_owned())],
        )
        .await
        .expect_err("an unknown setting must stop the server");
        let text = err.to_string();
        assert!(matches!(err, LocalPgError::ServerExited { .. }), "{text}");
        assert!(text.contains("no_such_setting"), "{text}");
    }
}
