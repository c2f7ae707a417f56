//! Zero-downtime binary upgrade: `switchyard run -c FILE --upgrade` starts a
//! new process that takes the listening sockets over from the running one, as
//! HAProxy's and Pingora's upgrades do.
//!
//! Every `switchyard run` listens on a Unix socket whose path follows from
//! the config file's path ([`socket_path`]; `--upgrade-socket` overrides it),
//! in a directory only its user can enter: `$XDG_RUNTIME_DIR/switchyard`, or
//! `switchyard-<uid>` in the temp dir, created 0700 and checked (owner, mode,
//! not a link) before use. The socket file is 0600, and a process that
//! answers on it is believed to serve the config only if it runs as the same
//! user. A path in a shared directory (`/tmp/switchyard-<hash>.sock` before)
//! could be computed and squatted by any local user, which blocked every
//! later `run`.
//! The new process connects and asks; the old one sends duplicates of its
//! listening sockets (proxy listeners and admin) with `SCM_RIGHTS`. They are
//! the same sockets, not new ones bound beside them, so the connections
//! waiting in their accept queues are accepted by whichever process accepts
//! next and none is reset. The new process serves on them, then says `ready`;
//! only then does the old one stop accepting, drain up to `shutdown_grace`
//! and exit 0. If the new process fails before `ready`, the old one never
//! stopped. Only the sockets carry over: health, ejections, breakers, latency
//! and admin overrides start fresh in the new process.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};

use crate::runtime::{HandedSockets, Runtime};
use crate::server::Inherited;

const REQUEST: &[u8] = b"switchyard-upgrade 1\n";
const READY: &[u8] = b"ready\n";
/// More file descriptors than one message carries (Linux's SCM_MAX_FD).
const MAX_SOCKETS: usize = 253;
/// How long a new process may take, from receiving the sockets to serving on
/// them, before the old one gives up on it and keeps serving.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `switchyard run -c CONFIG` listens for an upgrade:
/// `<private directory>/switchyard-<hash of the config file's absolute
/// path>.sock`, the directory being [`private_directory`]'s.
pub fn socket_path(config: &Path) -> PathBuf {
    let absolute = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let digest = xxhash_rust::xxh3::xxh3_64(absolute.as_os_str().as_bytes());
    private_directory().join(format!("switchyard-{digest:016x}.sock"))
}

/// `$XDG_RUNTIME_DIR/switchyard` (the session's own directory, as systemd
/// makes it), else `switchyard-<uid>` in the temp dir.
fn private_directory() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("switchyard"),
        None => std::env::temp_dir().join(format!("switchyard-{}", effective_uid())),
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Makes `directory` (0700) if it is missing, and checks that it is a
/// directory of this user's that nobody else may enter: whoever can write
/// there could put a socket in our path.
fn ensure_private(directory: &Path) -> Result<(), UpgradeError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(directory) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error.into()),
    }
    let metadata = std::fs::symlink_metadata(directory)?;
    let why = if !metadata.is_dir() {
        Some("it is not a directory (or is a link)".to_owned())
    } else if metadata.uid() != effective_uid() {
        Some(format!("it belongs to user {}, not to this process's user {}", metadata.uid(), effective_uid()))
    } else if metadata.mode() & 0o077 != 0 {
        Some(format!("its mode is {:o}: others may enter it (it must be 0700)", metadata.mode() & 0o777))
    } else {
        None
    };
    match why {
        Some(why) => Err(UpgradeError::NotPrivate { directory: directory.to_owned(), why }),
        None => Ok(()),
    }
}

/// What the old process sends with the descriptors, in their order.
#[derive(Debug, Serialize, Deserialize)]
struct Description {
    /// Each proxy listener's configured bind and how many sockets it has.
    listeners: Vec<(SocketAddr, usize)>,
    admin: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no switchyard process to take over from at {path}: {source}")]
    NoOldProcess { path: PathBuf, source: std::io::Error },
    #[error("another switchyard process serves this config (its upgrade socket is {0}); use --upgrade to replace it")]
    AlreadyServing(PathBuf),
    #[error("the upgrade socket {path} is held by a process of user {uid}, not this process's user: something else squats it")]
    Squatted { path: PathBuf, uid: u32 },
    #[error("the upgrade socket's directory {} is not private: {why}", directory.display())]
    NotPrivate { directory: PathBuf, why: String },
    #[error("the upgrade hand-over failed: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The new process's side: connects to the old one and takes its sockets.
/// The returned [`Handover`] says `ready` once they are served.
pub fn take_over(path: &Path) -> Result<(Inherited, Handover), UpgradeError> {
    let stream =
        UnixStream::connect(path).map_err(|source| UpgradeError::NoOldProcess { path: path.to_owned(), source })?;
    same_user(&stream)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&stream).write_all(REQUEST)?;
    let mut bytes = vec![0u8; 64 * 1024];
    let mut fds: Vec<RawFd> = vec![-1; MAX_SOCKETS];
    let (length, count) = stream.recv_with_fd(&mut bytes, &mut fds)?;
    // Owned at once, so that every descriptor received is closed on any error.
    // SAFETY: the kernel just gave this process these descriptors, and
    // nothing else owns them.
    let mut owned: std::collections::VecDeque<OwnedFd> =
        fds[..count].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    let description: Description = serde_json::from_slice(&bytes[..length])
        .map_err(|e| UpgradeError::Protocol(format!("unreadable description of the sockets: {e}")))?;
    let expected =
        description.listeners.iter().map(|(_, n)| n).sum::<usize>() + usize::from(description.admin.is_some());
    if expected != owned.len() {
        return Err(UpgradeError::Protocol(format!("expected {expected} sockets, received {}", owned.len())));
    }
    let mut inherited = Inherited::default();
    for (bind, sockets) in description.listeners {
        let sockets = owned.drain(..sockets).map(std::net::TcpListener::from).collect();
        inherited.listeners.insert(bind, sockets);
    }
    if let Some(bind) = description.admin {
        inherited.admin = owned.pop_front().map(|fd| (bind, std::net::TcpListener::from(fd)));
    }
    Ok((inherited, Handover(stream)))
}

/// The new process's promise to say when it serves.
pub struct Handover(UnixStream);

impl Handover {
    /// Tells the old process that this one serves on the sockets: it stops
    /// accepting and drains.
    pub fn ready(self) -> std::io::Result<()> {
        (&self.0).write_all(READY)
    }
}

/// The Unix socket on which a running process waits for its successor.
pub struct UpgradeListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// The socket file's inode: the path is ours while it names this file.
    inode: Option<u64>,
}

impl UpgradeListener {
    /// Listens at `path`. A socket file left by a process that is gone is
    /// replaced; a live one means another process serves this config.
    pub fn bind(path: &Path) -> Result<UpgradeListener, UpgradeError> {
        prepare(path)?;
        if path.exists() {
            if let Ok(stream) = UnixStream::connect(path) {
                return Err(match peer_uid(&stream)? {
                    uid if uid == effective_uid() => UpgradeError::AlreadyServing(path.to_owned()),
                    uid => UpgradeError::Squatted { path: path.to_owned(), uid },
                });
            }
            std::fs::remove_file(path)?;
        }
        let listener = tokio::net::UnixListener::bind(path)?;
        owner_only(path)?;
        Ok(UpgradeListener { listener, path: path.to_owned(), inode: inode(path) })
    }

    /// Listens at `path` in place of the process this one took over from: a
    /// socket bound beside it, then renamed over it, so a later upgrade finds
    /// this process and the path never names nothing.
    pub fn replace(path: &Path) -> Result<UpgradeListener, UpgradeError> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(format!(".{}", std::process::id()));
        let temporary = PathBuf::from(temporary);
        prepare(path)?;
        let _ = std::fs::remove_file(&temporary);
        let listener = tokio::net::UnixListener::bind(&temporary)?;
        owner_only(&temporary)?;
        std::fs::rename(&temporary, path)?;
        Ok(UpgradeListener { listener, path: path.to_owned(), inode: inode(path) })
    }

    /// Removes the socket file when the process stops without a successor
    /// (the inode check covers a file replaced by hand meanwhile).
    pub fn remove(self) {
        if self.inode.is_some() && inode(&self.path) == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Serves successors until one takes over: returns once a new process
    /// has the sockets and serves on them. A successor that fails first is
    /// logged, and this process goes on serving (and waiting).
    pub async fn hand_over(&self, runtime: &Runtime) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "upgrade socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let sockets = match runtime.handover_sockets().await {
                Ok(sockets) => sockets,
                Err(error) => {
                    tracing::error!(%error, "cannot duplicate the listening sockets for an upgrade");
                    continue;
                }
            };
            let outcome = async {
                let stream = stream.into_std()?;
                tokio::task::spawn_blocking(move || send_sockets(stream, sockets))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?
            };
            match outcome.await {
                Ok(()) => {
                    tracing::info!("upgrade: the new process serves; draining and exiting");
                    return;
                }
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(error) => {
                    tracing::warn!(%error, "upgrade: the new process did not take over; still serving");
                }
            }
        }
    }
}

/// The old process's side of one hand-over: the request, the sockets, and
/// the wait for `ready`.
fn send_sockets(stream: UnixStream, sockets: HandedSockets) -> std::io::Result<()> {
    same_user(&stream).map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(&stream);
    let mut request = Vec::new();
    reader.read_until(b'\n', &mut request)?;
    if request.is_empty() {
        // A process that only checked whether this one is alive.
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if request != REQUEST {
        return Err(std::io::Error::other("not an upgrade request"));
    }
    let description = Description {
        listeners: sockets.listeners.iter().map(|(bind, fds)| (*bind, fds.len())).collect(),
        admin: sockets.admin.as_ref().map(|(bind, _)| *bind),
    };
    let fds: Vec<RawFd> = sockets
        .listeners
        .iter()
        .flat_map(|(_, fds)| fds.iter())
        .chain(sockets.admin.as_ref().map(|(_, fd)| fd))
        .map(AsRawFd::as_raw_fd)
        .collect();
    if fds.len() > MAX_SOCKETS {
        return Err(std::io::Error::other(format!(
            "{} listening sockets; one hand-over carries {MAX_SOCKETS}",
            fds.len()
        )));
    }
    let bytes = serde_json::to_vec(&description).map_err(std::io::Error::other)?;
    stream.send_with_fd(&bytes, &fds)?;
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut ready = Vec::new();
    reader.read_until(b'\n', &mut ready)?;
    if ready != READY {
        return Err(std::io::Error::other("the new process ended before it served"));
    }
    Ok(())
}

/// The default path's directory made private (a path given with
/// `--upgrade-socket` is the operator's choice, its directory as it is).
fn prepare(path: &Path) -> Result<(), UpgradeError> {
    match path.parent() {
        Some(directory) if directory == private_directory() => ensure_private(directory),
        _ => Ok(()),
    }
}

/// The socket file readable and writable by its owner only.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Refuses a peer run by another user: listening sockets must only ever
/// pass between processes of one user.
fn same_user(stream: &UnixStream) -> Result<(), UpgradeError> {
    let uid = peer_uid(stream)?;
    let me = effective_uid();
    if uid != me {
        return Err(UpgradeError::Protocol(format!("the peer runs as user {uid}, this process as {me}")));
    }
    Ok(())
}

/// The user of the process at the other end (`SO_PEERCRED`).
fn peer_uid(stream: &UnixStream) -> Result<u32, UpgradeError> {
    let mut credentials = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `credentials` and `length` are valid for writes of the sizes given.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(credentials.uid)
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|metadata| metadata.ino())
}
