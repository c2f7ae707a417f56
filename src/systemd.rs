//! systemd's readiness protocol (`sd_notify(3)`): under `Type=notify`,
//! systemd hands the process a datagram socket in `$NOTIFY_SOCKET` and reads
//! state changes from it: `READY=1` once every listener is bound,
//! `RELOADING=1` and `READY=1` around a reload, `STOPPING=1` when a drain
//! starts, and `MAINPID=` from the process that took over in a binary upgrade.
//! Without the variable (not started by systemd), nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once this process has handed its sockets over: the successor speaks
/// for the service from then on.
static SILENT: AtomicBool = AtomicBool::new(false);

/// Every listener is bound: the service is up.
pub fn ready() {
    send("READY=1\nSTATUS=serving");
}

/// A reload starts; `MONOTONIC_USEC` lets systemd tell this reload's
/// `READY=1` from an earlier one (`Type=notify-reload` requires it).
pub fn reloading() {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is valid for writes; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let micros = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    send(&format!("RELOADING=1\nMONOTONIC_USEC={micros}\nSTATUS=reloading"));
}

/// A reload ended (applied or refused: either way the proxy serves).
pub fn reloaded(applied: bool) {
    send(if applied { "READY=1\nSTATUS=serving" } else { "READY=1\nSTATUS=serving; the last reload failed" });
}

/// This process took the listening sockets over in a binary upgrade: it is
/// the service's main process now (the unit needs `NotifyAccess=all`, since
/// systemd still knows the previous process as main until this arrives).
pub fn took_over() {
    send(&format!("MAINPID={}\nREADY=1\nSTATUS=serving (took over)", std::process::id()));
}

/// A stop signal came: the drain starts.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=draining");
}

/// This process handed its sockets over and drains: nothing it does from
/// now on (a reload by its file watcher, its drain) is the service's state.
pub fn handed_over() {
    SILENT.store(true, Ordering::Relaxed);
}

fn send(message: &str) {
    if SILENT.load(Ordering::Relaxed) {
        return;
    }
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(error) = send_to(&path, message) {
        tracing::warn!(%error, socket = ?path, "cannot notify systemd");
    }
}

fn send_to(path: &std::ffi::OsStr, message: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    // A state message is worth less than never blocking the runtime on a
    // full queue at the reader's end.
    socket.set_nonblocking(true)?;
    // `@name` is a socket in the abstract namespace.
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &address)?;
        }
        None => {
            socket.send_to(message.as_bytes(), path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reaches_a_path_socket_and_an_abstract_one() {
        let directory = std::env::temp_dir().join(format!("switchyard-notify-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let by_path = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1").unwrap();
        let mut buffer = [0; 64];
        let length = by_path.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("switchyard-notify-test-{}", std::process::id());
        let abstract_address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let by_name = UnixDatagram::bind_addr(&abstract_address).unwrap();
        send_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let length = by_name.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"STOPPING=1");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
