//! Conversion listeners, in the shape of QEMU's `RamDiscardListener` (driven there by
//! `RamBlockAttributes`): told of every conversion of guest memory, per run of pages that
//! actually changes state, with its range and direction.
//!
//! - **to private**: after accessors start refusing the pages and *before* the file revokes
//!   them (`notify_discard`): a listener unmaps its IOMMU entries, drops its pins, tells its
//!   vhost-user backend, while the pages are still there;
//! - **to shared**: *after* the file made them usable again and before accessors may use them
//!   (`notify_populate`): a listener maps them.
//!
//! A listener that fails makes the whole conversion fail: the listeners already told are told
//! the opposite, in reverse order, and the pages keep their state. Listeners are called with
//! the region's conversion lock held: they must not convert memory themselves.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use gmem::file::{GuestMemfd, PinGuard};

/// One run of pages changing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionEvent {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// The direction: to private (true) or to shared.
    pub to_private: bool,
    /// Index of the region (in address order) in its memory.
    pub region: usize,
    /// Offset of `gpa` in the region's gmem file.
    pub file_offset: u64,
}

/// A listener's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerError(pub String);

impl fmt::Display for ListenerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the listener may look at while it is told: the region's file, to pin or map pages.
#[derive(Debug, Clone, Copy)]
pub struct ListenerContext<'a> {
    /// The gmem file behind the run.
    pub file: &'a Arc<dyn GuestMemfd>,
}

/// Told of every conversion (see the module documentation for the order).
pub trait ConversionListener: Send + Sync {
    /// A name for errors and traces.
    fn name(&self) -> &str;

    /// The run is about to become private: accessors already refuse it, the file has not
    /// revoked it yet. An error cancels the conversion.
    fn to_private(
        &self,
        ev: &ConversionEvent,
        cx: ListenerContext<'_>,
    ) -> Result<(), ListenerError>;

    /// The run became shared and is usable. An error cancels the conversion.
    fn to_shared(&self, ev: &ConversionEvent, cx: ListenerContext<'_>)
        -> Result<(), ListenerError>;
}

/// An IOMMU/VFIO-style DMA mapping tracker (what Cloud Hypervisor #8501 and QEMU's VFIO
/// listener do): it keeps exactly the shared pages mapped, each mapping holding a pin on
/// the pages as a VFIO DMA map does; to-private unmaps (drops the pins) before the file
/// revokes, to-shared maps (pins) once they are usable. `fail_next` injects a refusal.
#[derive(Debug, Default)]
pub struct IommuTracker {
    /// Mapped runs: gpa → (len, pin).
    maps: Mutex<BTreeMap<u64, (u64, Option<PinGuard>)>>,
    fail_next: std::sync::atomic::AtomicBool,
    pin_pages: bool,
}

impl IommuTracker {
    /// A tracker that pins what it maps (`pin_pages`), as VFIO does, or only records it.
    pub fn new(pin_pages: bool) -> Self {
        IommuTracker {
            pin_pages,
            ..Default::default()
        }
    }

    /// Maps `[gpa, +len)` at start-up (the shared memory the guest starts with).
    pub fn map_initial(
        &self,
        gpa: u64,
        len: u64,
        file: &Arc<dyn GuestMemfd>,
        file_offset: u64,
    ) -> Result<(), ListenerError> {
        self.map(gpa, len, file, file_offset)
    }

    fn map(
        &self,
        gpa: u64,
        len: u64,
        file: &Arc<dyn GuestMemfd>,
        file_offset: u64,
    ) -> Result<(), ListenerError> {
        let pin =
            if self.pin_pages {
                Some(file.pin(file_offset, len).map_err(|e| {
                    ListenerError(format!("DMA map (pin) of {gpa:#x}+{len:#x}: {e}"))
                })?)
            } else {
                None
            };
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(gpa, (len, pin));
        Ok(())
    }

    /// Unmaps every mapped page of `[gpa, +len)` (splitting mappings that straddle it; the
    /// pieces that stay are re-pinned when pinning).
    fn unmap(&self, gpa: u64, len: u64, file: &Arc<dyn GuestMemfd>, file_offset_of_gpa: u64) {
        let end = gpa + len;
        let mut maps = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hit: Vec<u64> = maps
            .range(..end)
            .filter(|(&g, &(l, _))| g + l > gpa)
            .map(|(&g, _)| g)
            .collect();
        for g in hit {
            let Some((l, pin)) = maps.remove(&g) else {
                continue;
            };
            drop(pin);
            for (s, e) in [(g, gpa), (end, g + l)] {
                if s < e {
                    let off = (s as i128 - gpa as i128 + file_offset_of_gpa as i128) as u64;
                    let pin = if self.pin_pages {
                        file.pin(off, e - s).ok()
                    } else {
                        None
                    };
                    maps.insert(s, (e - s, pin));
                }
            }
        }
    }

    /// Refuse the next notification (fault injection).
    pub fn fail_next(&self) {
        self.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The mapped runs `(gpa, len)`, merged where adjacent.
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        let maps = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&g, &(l, _)) in maps.iter() {
            match out.last_mut() {
                Some((s, sl)) if *s + *sl == g => *sl += l,
                _ => out.push((g, l)),
            }
        }
        out
    }

    /// Whether the page at `gpa` is mapped.
    pub fn is_mapped(&self, gpa: u64) -> bool {
        self.mapped().iter().any(|&(g, l)| g <= gpa && gpa < g + l)
    }

    fn injected(&self) -> Result<(), ListenerError> {
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ListenerError("IOMMU map failed (injected)".into()));
        }
        Ok(())
    }
}

impl ConversionListener for IommuTracker {
    fn name(&self) -> &str {
        "iommu"
    }

    fn to_private(
        &self,
        ev: &ConversionEvent,
        cx: ListenerContext<'_>,
    ) -> Result<(), ListenerError> {
        self.injected()?;
        self.unmap(ev.gpa, ev.len, cx.file, ev.file_offset);
        Ok(())
    }

    fn to_shared(
        &self,
        ev: &ConversionEvent,
        cx: ListenerContext<'_>,
    ) -> Result<(), ListenerError> {
        self.injected()?;
        self.map(ev.gpa, ev.len, cx.file, ev.file_offset)
    }
}

/// A vhost-user memory-table update, as a VMM sends `VHOST_USER_SET_MEM_TABLE` /
/// `ADD_MEM_REG`/`REM_MEM_REG` to a backend process: the table lists the shared runs the
/// backend may touch, and every change is one message (recorded here, in order) sent before
/// the pages go private and after they come back.
#[derive(Debug, Default)]
pub struct VhostUserTable {
    inner: Mutex<VhostInner>,
}

#[derive(Debug, Default)]
struct VhostInner {
    shared: BTreeMap<u64, u64>,
    messages: Vec<String>,
}

impl VhostUserTable {
    /// A table listing `[gpa, +len)` runs as shared to start with.
    pub fn with_shared(runs: &[(u64, u64)]) -> Self {
        let t = VhostUserTable::default();
        {
            let mut i = t
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for &(g, l) in runs {
                i.shared.insert(g, l);
            }
        }
        t
    }

    /// The messages sent so far.
    pub fn messages(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .messages
            .clone()
    }

    /// The shared runs the backend knows of, merged.
    pub fn table(&self) -> Vec<(u64, u64)> {
        let i = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&g, &l) in &i.shared {
            match out.last_mut() {
                Some((s, sl)) if *s + *sl == g => *sl += l,
                _ => out.push((g, l)),
            }
        }
        out
    }
}

impl ConversionListener for VhostUserTable {
    fn name(&self) -> &str {
        "vhost-user"
    }

    fn to_private(
        &self,
        ev: &ConversionEvent,
        _: ListenerContext<'_>,
    ) -> Result<(), ListenerError> {
        let mut i = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (gpa, end) = (ev.gpa, ev.gpa + ev.len);
        let hit: Vec<(u64, u64)> = i
            .shared
            .range(..end)
            .filter(|(&g, &l)| g + l > gpa)
            .map(|(&g, &l)| (g, l))
            .collect();
        for (g, l) in hit {
            i.shared.remove(&g);
            if g < gpa {
                i.shared.insert(g, gpa - g);
            }
            if g + l > end {
                i.shared.insert(end, g + l - end);
            }
        }
        i.messages
            .push(format!("REM_MEM_REG {gpa:#x}+{:#x}", ev.len));
        Ok(())
    }

    fn to_shared(&self, ev: &ConversionEvent, _: ListenerContext<'_>) -> Result<(), ListenerError> {
        let mut i = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        i.shared.insert(ev.gpa, ev.len);
        i.messages
            .push(format!("ADD_MEM_REG {:#x}+{:#x}", ev.gpa, ev.len));
        Ok(())
    }
}

/// Records every event it is told, in order (tests, traces); can be told to refuse.
#[derive(Debug, Default)]
pub struct RecordingListener {
    name: String,
    events: Mutex<Vec<ConversionEvent>>,
    refuse: Mutex<Option<(bool, usize)>>,
}

impl RecordingListener {
    /// A recorder called `name`.
    pub fn new(name: &str) -> Self {
        RecordingListener {
            name: name.into(),
            ..Default::default()
        }
    }

    /// The events so far.
    pub fn events(&self) -> Vec<ConversionEvent> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Refuse the next event whose direction is `to_private` (once).
    pub fn refuse_next(&self, to_private: bool) {
        self.refuse_nth(to_private, 0);
    }

    /// Let `skip` events of direction `to_private` through, then refuse the next (once).
    pub fn refuse_nth(&self, to_private: bool, skip: usize) {
        *self
            .refuse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((to_private, skip));
    }

    fn record(&self, ev: &ConversionEvent) -> Result<(), ListenerError> {
        let mut r = self
            .refuse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((dir, skip)) = r.as_mut() {
            if *dir == ev.to_private {
                if *skip == 0 {
                    *r = None;
                    return Err(ListenerError(format!("{} refuses (injected)", self.name)));
                }
                *skip -= 1;
            }
        }
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(*ev);
        Ok(())
    }
}

impl ConversionListener for RecordingListener {
    fn name(&self) -> &str {
        &self.name
    }
    fn to_private(
        &self,
        ev: &ConversionEvent,
        _: ListenerContext<'_>,
    ) -> Result<(), ListenerError> {
        self.record(ev)
    }
    fn to_shared(&self, ev: &ConversionEvent, _: ListenerContext<'_>) -> Result<(), ListenerError> {
        self.record(ev)
    }
}
