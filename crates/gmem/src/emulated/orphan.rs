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
//! So the owner's guard reader hands each such child's userfaultfd to the receiver as it
//! reads the fork event, over the *custody* stream made with the link, and this thread of the
//! receiver keeps them (private descriptors), dropping those whose address space has gone.
//! When the custody stream ends (the owner's end closed: it exited, was killed, or executed
//! another program) the thread serves them all, the receiver's own userfaultfd included,
//! fail-closed: every fault is refused (a poison marker: SIGBUS, EFAULT to a system call) —
//! no process knows the attributes any more, and a refusal never exposes a private page; what
//! is mapped stays mapped until the kernel reclaims it (every page the owner made private was
//! taken out before its conversion returned) — every event is read, so `munmap`, `mremap` and
//! `fork` return, and a fork's child is served alike. Conversions answer EOPNOTSUPP (the link
//! is closed too). Faults the owner had read but not answered when it died are woken first,
//! to fault again here.
//!
//! The thread allocates nothing and takes no lock once started, as the guard's reader: a fork
//! in the receiver holds the fork handlers' locks and the allocator's while the kernel waits
//! for its event to be read, which only this thread can do once the owner has gone (found in
//! review: a `fork::quiet` or a `malloc` here hung such a fork for ever). Everything it needs
//! is allocated by [`watch`]; a descriptor beyond [`MAX_HELD`] is kept open and not served
//! (its faults wait: refused, never granted). It lives as long as the process, idle once
//! nothing is left to serve: its copy of the receiver's userfaultfd may be the last one, and
//! closing it would unregister whatever the receiver still maps of the file by a raw system
//! call (found in review: an exit once the file was dropped did that).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::fork::PrivateStream;
use crate::error::{Errno, KernelResult};
use crate::sys::{peer, PoisonFd, UffdEvent, PAGE_SIZE};

/// The custody stream's one record: a tag, sent with one userfaultfd.
pub(super) const CUSTODY_RECORD: [u8; 8] = *b"GMEMCUST";

/// How often address spaces that have gone are dropped.
const SWEEP: Duration = Duration::from_secs(1);

/// Userfaultfds one thread serves at most (the receiver's own and its descendants' that live
/// at once): about 32 KiB of tables per received file.
const MAX_HELD: usize = 1024;

/// The thread's stack: it calls nothing deep (system calls, no formatting).
const STACK: usize = 128 << 10;

/// One kept userfaultfd; `parked`: it reported an error or a hang-up without a message, and
/// is kept open (closing a live space's userfaultfd would unregister its mappings) but no
/// longer polled.
struct Entry {
    uffd: PoisonFd,
    parked: bool,
}

/// The userfaultfds the thread keeps (the first is the receiver's own), each recorded as
/// private (a fork child of the receiver gets the hole file in its place) and forgotten as it
/// closes. Never grows past the capacity [`watch`] reserved.
struct Held(Vec<Entry>);

impl Held {
    /// Keeps `uffd`, recorded as private by the caller; one beyond the capacity is left open
    /// and unserved.
    fn push(&mut self, uffd: PoisonFd) {
        if self.0.len() < self.0.capacity() {
            self.0.push(Entry {
                uffd,
                parked: false,
            });
        } else {
            std::mem::forget(uffd);
        }
    }

    /// Drops (closes) the userfaultfds whose address space has gone; the first, the
    /// receiver's own, is kept.
    fn sweep(&mut self) {
        let mut i = 1;
        while i < self.0.len() {
            if self.0[i].uffd.space_alive() {
                i += 1;
            } else {
                super::fork::close_private_uffd_unlocked(self.0.swap_remove(i).uffd);
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for e in self.0.drain(..) {
            super::fork::close_private_uffd_unlocked(e.uffd);
        }
    }
}

/// What the thread needs, allocated before it starts.
struct Watch {
    held: Held,
    polled: Vec<libc::pollfd>,
    custody: PrivateStream,
    /// The start of the address range whose waiting faults are woken at the takeover.
    wake_from: u64,
}

/// Starts the thread that watches the owner of a received file: `own` is a duplicate of the
/// receiver's userfaultfd (recorded as private), `custody` this process's end of the custody
/// stream. ENOMEM or EAGAIN if what it needs cannot be had (both descriptors are closed
/// then).
pub(super) fn watch(own: PoisonFd, custody: PrivateStream) -> KernelResult<()> {
    let mut entries = Vec::new();
    let mut polled = Vec::new();
    if entries.try_reserve_exact(MAX_HELD).is_err() || polled.try_reserve_exact(MAX_HELD).is_err() {
        super::fork::close_private_uffd(own);
        return Err(Errno::ENOMEM);
    }
    let mut held = Held(entries);
    held.push(own);
    let wake_from = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0x10000)
        .max(PAGE_SIZE)
        .next_multiple_of(PAGE_SIZE);
    let w = Watch {
        held,
        polled,
        custody,
        wake_from,
    };
    std::thread::Builder::new()
        .name("gmem-orphan".into())
        .stack_size(STACK)
        .spawn(move || run(w))
        .map(drop)
        .map_err(|_| Errno::EAGAIN)
}

/// Keeps what comes over the custody stream until it ends, then serves.
fn run(mut w: Watch) {
    let Some(s) = w.custody.get() else {
        return;
    };
    let sock = s.as_raw_fd();
    let mut last_sweep = Instant::now();
    loop {
        let mut p = [libc::pollfd {
            fd: sock,
            events: libc::POLLIN,
            revents: 0,
        }];
        // Woken every second only while there are descendants to sweep.
        let timeout = if w.held.0.len() > 1 { 1000 } else { -1 };
        let ready = match peer::poll(&mut p, timeout) {
            Ok(n) => n > 0,
            Err(e) => {
                if e != Errno::EINTR {
                    std::thread::sleep(Duration::from_millis(10));
                }
                false
            }
        };
        let revents = p[0].revents;
        if ready && revents & libc::POLLIN != 0 {
            let mut rec = [0u8; CUSTODY_RECORD.len()];
            match peer::recv_fd(sock, &mut rec) {
                Ok((_, Some(fd))) => keep(&mut w.held, fd),
                Ok((n, None)) if n > 0 => {}
                // The end of the stream: the owner's end has closed.
                Ok((_, None)) => break,
                // A record whose descriptor could not be installed (the descriptor table
                // full: it is lost): a pause, so that an error that persists does not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            continue;
        } else if ready && revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            break;
        }
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = Instant::now();
            w.held.sweep();
        }
    }
    serve(&mut w);
}

/// Keeps a userfaultfd received over the custody stream (recorded as private at once: an
/// atomic bit).
fn keep(held: &mut Held, fd: OwnedFd) {
    super::fork::track_fd(fd.as_raw_fd());
    let uffd = PoisonFd::adopt(fd);
    uffd.ensure_initialised();
    held.push(uffd);
}

/// Wakes every fault waiting on `uffd` from `from` up (read by the dead owner, never
/// answered): each faults again, to be served here. Where the kernel refuses the range (a
/// minimum address above `from`), from 1 MiB, then 16 MiB.
fn wake_all(uffd: &PoisonFd, from: u64) {
    let end = crate::sys::TASK_SIZE;
    for start in [from, 1 << 20, 1 << 24] {
        if start < end && uffd.wake(start, end - start).is_ok() {
            return;
        }
    }
}

/// Serves every kept userfaultfd, fail-closed, for the life of the process.
fn serve(w: &mut Watch) -> ! {
    // Records still in the stream (sent before the owner's end closed), to its end: a record
    // whose descriptor could not be installed is skipped, not the ones after it.
    if let Some(s) = w.custody.get() {
        let mut rec = [0u8; CUSTODY_RECORD.len()];
        loop {
            match peer::recv_fd(s.as_raw_fd(), &mut rec) {
                Ok((_, Some(fd))) => keep(&mut w.held, fd),
                Ok((0, None)) => break,
                Ok((_, None)) => {}
                Err(e) if e == Errno(libc::EMSGSIZE) || e == Errno::EINTR => {}
                Err(_) => break,
            }
        }
    }
    for e in &w.held.0 {
        wake_all(&e.uffd, w.wake_from);
    }
    let mut last_sweep = Instant::now();
    loop {
        w.polled.clear();
        w.polled.extend(w.held.0.iter().map(|e| libc::pollfd {
            fd: if e.parked { -1 } else { e.uffd.raw_fd() },
            events: libc::POLLIN,
            revents: 0,
        }));
        let timeout = if w.held.0.len() > 1 { 1000 } else { -1 };
        let r = peer::poll(&mut w.polled, timeout);
        if r.is_ok_and(|n| n > 0) {
            for i in 0..w.polled.len() {
                let revents = w.polled[i].revents;
                if revents & libc::POLLIN != 0 {
                    serve_one(&mut w.held, i);
                } else if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                    w.held.0[i].parked = true;
                }
            }
        } else if r.is_err_and(|e| e != Errno::EINTR) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = Instant::now();
            w.held.sweep();
        }
    }
}

/// Reads and answers every message queued on the `i`th kept userfaultfd.
fn serve_one(held: &mut Held, i: usize) {
    loop {
        let fd = held.0[i].uffd.raw_fd();
        let msg = match crate::sys::read_uffd_msg(fd) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(_) => {
                // An error that persists (EMFILE installing a fork's descriptor) must not
                // spin: a pause, as the guard's reader makes.
                std::thread::sleep(Duration::from_millis(1));
                return;
            }
        };
        // A child's userfaultfd, installed by the read: private at once (an atomic bit).
        if let Some(child) = msg.fork_fd() {
            super::fork::track_fd(child);
        }
        match msg.decode() {
            Some(UffdEvent::Fault(ev)) => {
                let page = ev.address & !(PAGE_SIZE - 1);
                let uffd = &held.0[i].uffd;
                let _ = uffd.poison(page, PAGE_SIZE as usize);
                let _ = uffd.wake(page, PAGE_SIZE);
            }
            Some(UffdEvent::Fork(child)) => held.push(child),
            // Unmap, remap, remove: read, which is all they wait for.
            _ => {}
        }
    }
}
