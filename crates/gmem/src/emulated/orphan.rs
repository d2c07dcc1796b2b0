//! A receiver whose owner has gone: the `gmem-orphan` thread ([`watch`]).
//!
//! A process a file was handed to registers its host mappings with a userfaultfd that the
//! owner's guard reads and serves, as it serves that process's fork children, whose
//! userfaultfds come to the owner with the fork events ([`super::handoff`]). When the owner
//! exits, is killed or executes another program, nothing reads them any more: the
//! receiver's next fault on a page it had not mapped, its `munmap` and its `fork` would wait
//! for ever (seen when a stress run's owner crashed: its receivers stayed in `D` state), and
//! a fork child's userfaultfd, held by the owner alone, would close with it — the kernel
//! unregisters that child's mappings, and it would read every page, private ones included.
//!
//! So the owner hands each such child's userfaultfd to the receiver as it learns of it, over
//! the *custody* stream made with the link, and this thread of the receiver keeps them
//! (private descriptors), dropping those whose address space has gone. When the custody
//! stream ends (the owner's end closed: it exited, was killed, or executed another program)
//! the thread serves them all, the receiver's own userfaultfd included, fail-closed: every
//! fault is refused (a poison marker: SIGBUS, EFAULT to a system call) — no process knows
//! the attributes any more, and a refusal never exposes a private page; what was mapped
//! stays mapped (every page the owner had made private was taken out before its conversion
//! returned) — every event is read, so `munmap`, `mremap` and `fork` return, and a fork's
//! child is served alike. Conversions answer EOPNOTSUPP (the link is closed too). Faults the
//! owner had read but not answered when it died are woken first, to fault again here.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::fork::PrivateStream;
use crate::error::{Errno, KernelResult};
use crate::sys::{peer, PoisonFd, UffdEvent, PAGE_SIZE};

/// The custody stream's one record: a tag, sent with one userfaultfd.
pub(super) const CUSTODY_RECORD: [u8; 8] = *b"GMEMCUST";

/// How often address spaces that have gone are dropped.
const SWEEP: Duration = Duration::from_secs(1);

/// The userfaultfds the thread keeps, each recorded as private (a fork child of the receiver
/// gets the hole file in its place) and forgotten as it closes.
struct Held(Vec<PoisonFd>);

impl Held {
    fn push(&mut self, fd: OwnedFd) {
        super::fork::track_fd(fd.as_raw_fd());
        let uffd = PoisonFd::adopt(fd);
        uffd.ensure_initialised();
        self.0.push(uffd);
    }

    /// Drops (closes) the userfaultfds whose address space has gone; the first, the
    /// receiver's own, is kept. `quiet`: under [`super::fork::quiet`] — not once this thread
    /// serves, when a fork may be waiting for it to read the fork's event while the forking
    /// thread holds the fork handlers' locks (a fork child then inherits a descriptor of a
    /// space that has gone, which can do nothing).
    fn sweep(&mut self, quiet: bool) {
        let mut i = 1;
        while i < self.0.len() {
            if self.0[i].space_alive() {
                i += 1;
            } else if quiet {
                super::fork::close_private_uffd(self.0.swap_remove(i));
            } else {
                let uffd = self.0.swap_remove(i);
                super::fork::untrack_fd(uffd.raw_fd());
                uffd.close_raw();
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for uffd in self.0.drain(..) {
            super::fork::close_private_uffd(uffd);
        }
    }
}

/// Starts the thread that watches the owner of a received file: `own` is a duplicate of the
/// receiver's userfaultfd (recorded as private), `custody` this process's end of the
/// custody stream. EAGAIN if the thread cannot start (both are closed then).
pub(super) fn watch(own: PoisonFd, custody: PrivateStream) -> KernelResult<()> {
    let held = Held(vec![own]);
    std::thread::Builder::new()
        .name("gmem-orphan".into())
        .spawn(move || run(held, &custody))
        .map(drop)
        .map_err(|_| Errno::EAGAIN)
}

/// Keeps what comes over the custody stream until it ends, then serves.
fn run(mut held: Held, custody: &PrivateStream) {
    let Some(s) = custody.get() else {
        return;
    };
    let mut last_sweep = Instant::now();
    loop {
        let mut p = [libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ready = peer::poll(&mut p, 1000).unwrap_or(0) > 0;
        let p = p[0];
        if ready && p.revents & libc::POLLIN != 0 {
            let mut rec = [0u8; CUSTODY_RECORD.len()];
            let taken = {
                // No fork between the descriptor's arrival and its record (held by no lock
                // a fork waits on: this thread reads no userfaultfd yet).
                let _quiet = super::fork::quiet();
                peer::recv_with_fds(s.as_fd(), &mut rec, 1).map(|(n, fds)| {
                    let got = !fds.is_empty();
                    for fd in fds {
                        held.push(fd);
                    }
                    n > 0 || got
                })
            };
            match taken {
                Ok(true) => continue,
                // The end of the stream: the owner's end has closed.
                Ok(false) => break,
                // A record whose descriptor could not be installed (the descriptor table
                // full): a pause, so that an error that persists does not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        } else if ready && p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            break;
        }
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = Instant::now();
            held.sweep(true);
        }
    }
    serve(held);
}

/// Wakes every fault waiting on `uffd` (read by the dead owner, never answered): each
/// faults again, to be served here.
fn wake_all(uffd: &PoisonFd) {
    let start = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0x10000)
        .max(PAGE_SIZE)
        .next_multiple_of(PAGE_SIZE);
    let end = crate::sys::TASK_SIZE;
    if start < end {
        let _ = uffd.wake(start, end - start);
    }
}

/// Serves every kept userfaultfd, fail-closed, for the life of the process.
fn serve(mut held: Held) {
    for uffd in &held.0 {
        wake_all(uffd);
    }
    let mut last_sweep = Instant::now();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        fds.clear();
        fds.extend(held.0.iter().map(|u| libc::pollfd {
            fd: u.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        let r = peer::poll(&mut fds, 1000);
        if r.is_ok_and(|n| n > 0) {
            let mut born = Vec::new();
            for (i, p) in fds.iter().enumerate() {
                if p.revents & libc::POLLIN == 0 {
                    continue;
                }
                while let Ok(Some(msg)) = crate::sys::read_uffd_msg(p.fd) {
                    // A child's userfaultfd, installed by the read: private at once (an
                    // atomic bit; a fork waits for this thread's read, so no lock).
                    if let Some(fd) = msg.fork_fd() {
                        super::fork::track_fd(fd);
                    }
                    match msg.decode() {
                        Some(UffdEvent::Fault(ev)) => {
                            let page = ev.address & !(PAGE_SIZE - 1);
                            let uffd = &held.0[i];
                            let _ = uffd.poison(page, PAGE_SIZE as usize);
                            let _ = uffd.wake(page, PAGE_SIZE);
                        }
                        Some(UffdEvent::Fork(child)) => born.push(child),
                        // Unmap, remap, remove: read, which is all they wait for.
                        _ => {}
                    }
                }
            }
            held.0.extend(born);
        } else if r.is_err_and(|e| e != Errno::EINTR) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = Instant::now();
            held.sweep(false);
        }
    }
}
