//! systemd's readiness protocol, read as systemd reads it: a datagram socket
//! in `NOTIFY_SOCKET` with `SO_PASSCRED`, so that every message comes with the
//! pid that sent it (what `NotifyAccess=` and `MAINPID=` are judged by).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::support::*;

/// systemd's end of `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with an int option value.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_PASSCRED: {}", std::io::Error::last_os_error());
        NotifySocket { socket, path, _dir: dir }
    }

    /// The next message and the pid that sent it, waiting up to `limit`
    /// (`None` when nothing came).
    fn next_within(&self, limit: Duration) -> Option<(libc::pid_t, String)> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut data = [0u8; 4096];
        // u64s: the control buffer must be aligned for cmsghdr.
        let mut control = [0u64; 16];
        let mut part = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
        // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = &mut part;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `header` points at live buffers of the lengths it gives.
        let length = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut header, 0) };
        if length < 0 {
            let error = std::io::Error::last_os_error();
            assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock, "recvmsg: {error}");
            return None;
        }
        let mut sender = None;
        // SAFETY: the CMSG macros walk the control data the kernel wrote.
        unsafe {
            let mut message = libc::CMSG_FIRSTHDR(&header);
            while !message.is_null() {
                if (*message).cmsg_level == libc::SOL_SOCKET && (*message).cmsg_type == libc::SCM_CREDENTIALS {
                    let credentials: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(message).cast());
                    sender = Some(credentials.pid);
                }
                message = libc::CMSG_NXTHDR(&header, message);
            }
        }
        let text = String::from_utf8(data[..length as usize].to_vec()).unwrap();
        Some((sender.expect("the kernel passes the sender's credentials"), text))
    }

    fn next(&self, what: &str) -> (libc::pid_t, String) {
        tokio::task::block_in_place(|| self.next_within(Duration::from_secs(30)))
            .unwrap_or_else(|| panic!("no notification: {what}"))
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_the_new_main_pid_on_an_upgrade_and_stopping_in_order() {
    let bot = Backend::start("bot").await;
    let admin = format!("127.0.0.1:{}", free_port());
    let yaml = PoolConfig::new(&[&bot]).on_chosen_port().yaml();
    let yaml = format!("admin: {{ bind: \"{admin}\" }}\n{yaml}");
    let notify = NotifySocket::bind();
    let mut proxy = ProxyProcess::spawn_with(&yaml, |command| {
        command.env("NOTIFY_SOCKET", &notify.path);
    });
    let config = std::path::absolute(&proxy.path).unwrap();
    let _successors = KillOnDrop(config.clone());
    let first = proxy.child.id() as libc::pid_t;

    // READY=1 once it serves: the listener and the admin API accept at
    // once, without a retry.
    let (pid, ready) = notify.next("READY at start");
    assert_eq!(pid, first);
    assert!(has_line(&ready, "READY=1"), "{ready:?}");
    tokio::net::TcpStream::connect(proxy.addr).await.expect("the listener is bound at READY");
    let healthz = get(&client(), &format!("http://{admin}/healthz")).await;
    assert_eq!(healthz.status, 200, "the admin API answers at READY");

    // A reload is bracketed, RELOADING=1 with the monotonic time, then READY=1.
    proxy.signal(libc::SIGHUP);
    let (pid, reloading) = notify.next("RELOADING on SIGHUP");
    assert_eq!(pid, first);
    assert!(has_line(&reloading, "RELOADING=1"), "{reloading:?}");
    let micros = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC");
    assert!(micros.parse::<u64>().unwrap() > 0);
    let (pid, reloaded) = notify.next("READY after the reload");
    assert_eq!(pid, first);
    assert!(has_line(&reloaded, "READY=1"), "{reloaded:?}");

    // SIGUSR2: the successor says it is the main process now; the old one,
    // which drains and exits, says nothing (not STOPPING: the service goes on).
    let get_ok = get(&client(), &proxy.url("/")).await.status;
    assert_eq!(get_ok, 200);
    proxy.signal(libc::SIGUSR2);
    let (successor, took_over) = notify.next("MAINPID from the successor");
    assert_ne!(successor, first);
    assert!(has_line(&took_over, &format!("MAINPID={successor}")), "{took_over:?}");
    assert!(has_line(&took_over, "READY=1"), "{took_over:?}");
    assert_eq!(proxy.wait_for_exit(Duration::from_secs(60), "the old process to exit").await.code(), Some(0));
    assert_eq!(processes_of(&config), vec![successor], "the successor serves alone");
    assert_eq!(get(&client(), &proxy.url("/")).await.status, 200);

    // A stop: STOPPING=1 from the successor, then nothing more from anyone.
    // SAFETY: kill(2) on the successor, which serves this test's config.
    assert_eq!(unsafe { libc::kill(successor, libc::SIGTERM) }, 0);
    let (pid, stopping) = notify.next("STOPPING on SIGTERM");
    assert_eq!(pid, successor);
    assert!(has_line(&stopping, "STOPPING=1"), "{stopping:?}");
    wait_until("the successor to exit", Duration::from_secs(30), || processes_of(&config).is_empty()).await;
    let left = notify.next_within(Duration::from_millis(1));
    assert!(left.is_none(), "a message after STOPPING: {left:?}");
}
