//! The host-fault service of NO_DIRECT_MAP files: a userfaultfd thread that hands out each
//! host-faulted page.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};

use super::Inner;
use crate::attributes::AttributeStore;
use crate::error::{Errno, KernelResult};
use crate::platform::PAGE;
use crate::sys::{self, EventFd, PoisonFd, PAGE_SIZE};

/// A host mapping as the fault service sees it: (id, address, length, file offset).
pub(super) type MapWindow = (u64, usize, usize, u64);

/// The host-fault service of a NO_DIRECT_MAP file: its host mappings are registered with the
/// file's userfaultfd in missing + minor (+ write-protect) mode, so every host fault on a page
/// without a PTE is an event; one thread per file reads them and runs the host hand-out
/// (zero if not up to date, remove from the direct map, mark) before mapping the page
/// (`UFFDIO_CONTINUE`). A failed removal installs a poison marker instead: the faulting access
/// raises SIGBUS and nothing is marked. Private pages carry markers or holes, which raise
/// SIGBUS with no event. The thread holds only a `Weak` on the file and is stopped (eventfd)
/// and joined when the file is dropped.
pub(super) struct FaultService {
    /// The userfaultfd the mappings are registered with (a `dup` of the mechanism's).
    pub(super) uffd: PoisonFd,
    /// Host mappings of the file. A separate small lock (not `state`), so serving a fault
    /// never waits for a conversion or punch-hole, nor for a thread that holds `state` while
    /// it faults on a host mapping.
    pub(super) maps: Mutex<Vec<MapWindow>>,
    /// (page, mapping id) of poison markers left by failed hand-outs on shared pages: zapped
    /// by punch-hole and dropped by conversion (which zaps or re-poisons them itself).
    pub(super) sigbus: Mutex<BTreeSet<(u64, u64)>>,
    /// The conversion gate: a copy of the file's attributes. A conversion holds it from the
    /// first revoke or restore until its attributes are recorded here; the service holds it
    /// from the attribute check until its `UFFDIO_CONTINUE` is done. `UFFDIO_CONTINUE`
    /// installs over any PTE marker (the kernel's `mfill_atomic_install_pte` accepts
    /// `pte_none_mostly`), poison markers included, so without the gate a fault taken while
    /// the page was shared, resolved after a conversion poisoned it, mapped a private page.
    /// Not `state`: a thread may fault on a host mapping while it holds `state` shared
    /// (`read_at` into such a buffer), and std's `RwLock` queues a new reader behind a
    /// waiting writer, so the service would wait for a conversion that waits for that thread.
    /// Nothing done under the gate waits for a fault to be served.
    pub(super) gate: Mutex<AttributeStore>,
    pub(super) stop: Arc<EventFd>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    /// The process that started the thread (a fork child has the handle, not the thread).
    pub(super) pid: u32,
}

impl FaultService {
    pub(super) fn start(
        file: Weak<Inner>,
        uffd: PoisonFd,
        attrs: AttributeStore,
    ) -> KernelResult<FaultService> {
        let stop = Arc::new(EventFd::new()?);
        let events = uffd.try_clone()?;
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("gmem-faults".into())
            .spawn(move || serve_faults(&file, &events, &stop2))
            .map_err(|_| Errno::EAGAIN)?;
        Ok(FaultService {
            uffd,
            maps: Mutex::new(Vec::new()),
            sigbus: Mutex::new(BTreeSet::new()),
            gate: Mutex::new(attrs),
            stop,
            thread: Some(thread),
            pid: sys::peer::getpid(),
        })
    }

    pub(super) fn maps(&self) -> std::sync::MutexGuard<'_, Vec<MapWindow>> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The conversion gate (see [`FaultService::gate`]).
    pub(super) fn gate(&self) -> std::sync::MutexGuard<'_, AttributeStore> {
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn sigbus(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, u64)>> {
        self.sigbus
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The mapping holding `addr` and the file offset of its page.
    pub(super) fn lookup(&self, addr: u64) -> Option<(u64, u64)> {
        self.maps().iter().find_map(|&(id, start, len, off)| {
            let a = usize::try_from(addr).ok()?;
            (a >= start && a < start + len).then(|| (id, off + (a - start) as u64))
        })
    }

    /// Forgets the failure markers of pages `[first, end)` without collecting them (no
    /// allocation: a conversion calls it past its point of no return).
    pub(super) fn forget_sigbus(&self, first: u64, end: u64) {
        let mut set = self.sigbus();
        while let Some(&k) = set.range((first, 0)..(end, 0)).next() {
            set.remove(&k);
        }
    }

    /// Forgets the failure markers of pages `[first, end)`, returning them.
    pub(super) fn take_sigbus(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut set = self.sigbus();
        let taken: Vec<(u64, u64)> = set.range((first, 0)..(end, 0)).copied().collect();
        for k in &taken {
            set.remove(k);
        }
        taken
    }
}

impl Drop for FaultService {
    fn drop(&mut self) {
        if self.pid != sys::peer::getpid() {
            // A fork child's copy: the thread and its stop signal are the parent's (the
            // eventfd is shared); the handle must not be joined here (it would wait forever).
            if let Some(t) = self.thread.take() {
                std::mem::forget(t);
            }
            return;
        }
        let _ = self.stop.signal();
        if let Some(t) = self.thread.take() {
            // The service thread itself may drop the last handle on the file: it then leaves
            // its loop at the next poll (the eventfd is readable) instead of joining itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The service thread: waits for fault events or the stop signal (no timeout, no busy loop).
pub(super) fn serve_faults(file: &Weak<Inner>, uffd: &PoisonFd, stop: &EventFd) {
    loop {
        let Ok((events, stopped)) = sys::poll_two(uffd.as_fd(), stop.as_fd()) else {
            return;
        };
        if stopped {
            return;
        }
        if !events {
            continue;
        }
        loop {
            match uffd.read_fault() {
                Ok(Some(ev)) => {
                    let page = ev.address & !(PAGE_SIZE - 1);
                    match file.upgrade() {
                        Some(inner) => {
                            // No fork while a fault is served: a fork child would inherit
                            // the service's locks (gate, page bits, views) held.
                            let _fork = super::fork::shared();
                            inner.serve_fault(uffd, page);
                        }
                        None => {
                            let _ = uffd.wake(page, PAGE_SIZE);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

impl Inner {
    /// Serves one host fault at page address `addr` (service thread): the host hand-out of
    /// the page, then `UFFDIO_CONTINUE` (the hand-out leaves the page in the page cache, so a
    /// missing fault is resolved the same way: `UFFDIO_ZEROPAGE` would fail with EEXIST).
    /// Any other outcome (EEXIST: a PTE or marker is already there, e.g. a conversion to
    /// private raced; EFAULT: a concurrent punch-hole took the page) wakes the faulter, whose
    /// retry faults again or hits the marker. A failed hand-out (e.g. the direct-map removal
    /// failed) installs a poison marker and wakes the faulter: its access raises SIGBUS and
    /// nothing is marked.
    pub(super) fn serve_fault(&self, uffd: &PoisonFd, addr: u64) {
        let Some(service) = self.fault_service() else {
            let _ = uffd.wake(addr, PAGE_SIZE);
            return;
        };
        let Some((id, offset)) = service.lookup(addr) else {
            // The mapping is going away: the retry finds it unmapped.
            let _ = uffd.wake(addr, PAGE_SIZE);
            return;
        };
        // Held until the CONTINUE is done: no conversion revokes the page meanwhile.
        let gate = service.gate();
        if offset < self.size && gate.is_private(offset / PAGE_SIZE) {
            // The page became private after the access faulted (or the mapping is new and
            // not revoked yet): never map it. A marker (EEXIST if one is there already) and
            // the faulter's retry raises SIGBUS.
            let _ = uffd.poison(addr, PAGE);
            let _ = uffd.wake(addr, PAGE_SIZE);
            return;
        }
        if offset < self.size && self.hand_out(offset, PAGE_SIZE).is_err() {
            service.sigbus().insert((offset / PAGE_SIZE, id));
            // The kernel checks the range is registered.
            let _ = uffd.poison(addr, PAGE);
            let _ = uffd.wake(addr, PAGE_SIZE);
            return;
        }
        if uffd.continue_page(addr, PAGE_SIZE).is_err() {
            let _ = uffd.wake(addr, PAGE_SIZE);
        }
    }

    /// The fault service forgets mapping `id` (unregistered or never completed).
    pub(super) fn forget_mapping(&self, id: u64) {
        if let Some(service) = self.fault_service() {
            service.maps().retain(|m| m.0 != id);
            service.sigbus().retain(|k| k.1 != id);
        }
    }
}
