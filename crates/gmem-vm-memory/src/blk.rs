//! A virtio-blk-like device on virtio-queue 0.18 over [`GmemMemory`], and the driver side of
//! its split queue played by the host (for tests and the example).
//!
//! Requests follow virtio-blk: a device-readable header `{type: u32, reserved: u32, sector:
//! u64}`, data descriptors, a device-writable status byte last. Each descriptor chain is
//! served under its own [`crate::GmemAccess`], so every buffer it checked stays referenced
//! until the request completes. A buffer in private memory fails *that request* with
//! `VIRTIO_BLK_S_IOERR` written to the status byte (or, if the status byte itself is
//! private, a used entry of length 0); the device and the VMM carry on.

use std::sync::atomic::Ordering;

use virtio_queue::{desc::split::Descriptor, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::error::private_address;
use crate::GmemMemory;

/// `VIRTIO_BLK_T_IN`: read sectors into the guest's buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write the guest's buffers to sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_GET_ID`: the device id string (20 bytes).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_S_OK`.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Sector size.
pub const SECTOR: u64 = 512;
/// `VIRTQ_DESC_F_NEXT`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// What the device did, per outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests completed with `VIRTIO_BLK_S_OK`.
    pub ok: u64,
    /// Requests failed with `VIRTIO_BLK_S_IOERR` (bad buffer: private, unbacked, out of range).
    pub ioerr: u64,
    /// Of those, how many because a buffer was private.
    pub private_refused: u64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Chains whose status byte could not be written (private or malformed): used length 0.
    pub no_status: u64,
}

/// A RAM-disk block device on one virtio queue.
#[derive(Debug)]
pub struct BlockDevice {
    queue: Queue,
    disk: Vec<u8>,
    stats: BlkStats,
    last_error: Option<String>,
}

/// Why a request failed, for the status and the stats.
enum Fail {
    Status(u8, Option<String>, bool),
}

impl BlockDevice {
    /// A device with `sectors` sectors of zeroed disk on `queue` (configured and ready).
    pub fn new(queue: Queue, sectors: u64) -> Self {
        BlockDevice {
            queue,
            disk: vec![0; (sectors * SECTOR) as usize],
            stats: BlkStats::default(),
            last_error: None,
        }
    }

    /// The counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// The last request error, in words (e.g. the private address a buffer hit).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The disk contents.
    pub fn disk(&self) -> &[u8] {
        &self.disk
    }

    /// Serves every available chain; returns how many. Each chain is served under its own
    /// guard (references on its buffers until its used entry is written). An error reaching
    /// the rings themselves (e.g. the guest made them private) ends the batch: the chains
    /// stay available and the device is unharmed.
    pub fn process<B: Bitmap>(&mut self, mem: &GmemMemory<B>) -> usize {
        let mut n = 0;
        loop {
            let access = mem.access();
            let Some(chain) = self.queue.pop_descriptor_chain(&access) else {
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let used_len = self.serve(&access, &descs);
            if let Err(e) = self.queue.add_used(&access, head, used_len) {
                self.last_error = Some(format!("used ring: {e}"));
                break;
            }
            n += 1;
        }
        n
    }

    /// Serves one request; returns the used length (bytes written to the guest).
    fn serve<M: GuestMemory>(&mut self, mem: &M, descs: &[Descriptor]) -> u32 {
        let Some(status_desc) = descs.last().filter(|d| d.is_write_only() && d.len() >= 1) else {
            self.stats.no_status += 1;
            self.last_error = Some("chain without a status descriptor".into());
            return 0;
        };
        let (status, written) = match self.request(mem, descs) {
            Ok(written) => {
                self.stats.ok += 1;
                (VIRTIO_BLK_S_OK, written)
            }
            Err(Fail::Status(s, why, private)) => {
                match s {
                    VIRTIO_BLK_S_UNSUPP => self.stats.unsupported += 1,
                    _ => self.stats.ioerr += 1,
                }
                if private {
                    self.stats.private_refused += 1;
                }
                self.last_error = why;
                (s, 0)
            }
        };
        match mem.write_obj(status, status_desc.addr()) {
            Ok(()) => written + 1,
            Err(e) => {
                self.stats.no_status += 1;
                self.last_error = Some(format!("status byte: {e}"));
                0
            }
        }
    }

    fn request<M: GuestMemory>(&mut self, mem: &M, descs: &[Descriptor]) -> Result<u32, Fail> {
        let ioerr = |e: GuestMemoryError| {
            let private = private_address(&e).is_some();
            Fail::Status(VIRTIO_BLK_S_IOERR, Some(e.to_string()), private)
        };
        let bad = |why: &str| Fail::Status(VIRTIO_BLK_S_IOERR, Some(why.into()), false);
        let header = descs
            .first()
            .filter(|d| !d.is_write_only() && d.len() >= 16);
        let header = header.ok_or_else(|| bad("no readable 16-byte header"))?;
        let ty: u32 = mem.read_obj(header.addr()).map_err(ioerr)?;
        let sector: u64 = mem
            .read_obj(header.addr().unchecked_add_u64(8))
            .map_err(ioerr)?;
        let data = &descs[1..descs.len() - 1];
        let mut pos = sector
            .checked_mul(SECTOR)
            .ok_or_else(|| bad("sector overflow"))? as usize;
        let mut written = 0u32;
        match ty {
            VIRTIO_BLK_T_IN => {
                for d in data {
                    if !d.is_write_only() {
                        return Err(bad("IN data descriptor not device-writable"));
                    }
                    let end = pos + d.len() as usize;
                    let src = self
                        .disk
                        .get(pos..end)
                        .ok_or_else(|| bad("past the disk"))?;
                    // Every slice checked and referenced first (the guard keeps them), then
                    // the copy: no conversion can revoke a page in between.
                    let slices: Vec<_> = mem
                        .get_slices(d.addr(), d.len() as usize, Permissions::Write)
                        .map_err(ioerr)?
                        .collect::<Result<_, _>>()
                        .map_err(ioerr)?;
                    let mut off = 0;
                    for s in slices {
                        s.copy_from(&src[off..off + s.len()]);
                        off += s.len();
                    }
                    pos = end;
                    written += d.len();
                }
            }
            VIRTIO_BLK_T_OUT => {
                for d in data {
                    if d.is_write_only() {
                        return Err(bad("OUT data descriptor device-writable"));
                    }
                    let end = pos + d.len() as usize;
                    let dst = self
                        .disk
                        .get_mut(pos..end)
                        .ok_or_else(|| bad("past the disk"))?;
                    mem.read_slice(dst, d.addr()).map_err(ioerr)?;
                    pos = end;
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = data.first().ok_or_else(|| bad("GET_ID without a buffer"))?;
                let mut id = [0u8; 20];
                id[..8].copy_from_slice(b"gmem-blk");
                let n = (d.len() as usize).min(20);
                mem.write_slice(&id[..n], d.addr()).map_err(ioerr)?;
                written = n as u32;
            }
            _ => return Err(Fail::Status(VIRTIO_BLK_S_UNSUPP, None, false)),
        }
        Ok(written)
    }
}

trait AddU64 {
    fn unchecked_add_u64(self, v: u64) -> GuestAddress;
}

impl AddU64 for GuestAddress {
    fn unchecked_add_u64(self, v: u64) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(v))
    }
}

/// The driver side of one split virtqueue, played by the host in guest memory: writes
/// descriptors and the available ring, reads the used ring (what a guest's virtio driver
/// does). Ring memory must be shared.
#[derive(Debug)]
pub struct Driver {
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Queue size.
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    /// A queue of `size` entries whose rings live in the shared page at `ring_page`
    /// (descriptor table at +0, available ring at +0x400, used ring at +0x800; size ≤ 64).
    pub fn new(ring_page: u64, size: u16) -> Self {
        Driver {
            desc_table: ring_page,
            avail: ring_page + 0x400,
            used: ring_page + 0x800,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device side's queue, configured and ready.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size is a power of two ≤ 32768");
        q.set_size(self.size);
        q.set_desc_table_address(
            Some(self.desc_table as u32),
            Some((self.desc_table >> 32) as u32),
        );
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Zeroes the rings.
    pub fn init<B: Bitmap>(&self, mem: &GmemMemory<B>) -> Result<(), GuestMemoryError> {
        mem.write_slice(&[0u8; 0xc00], GuestAddress(self.desc_table))
    }

    /// Makes a chain of `(addr, len, device_writable)` buffers available; returns its head.
    pub fn submit<B: Bitmap>(
        &mut self,
        mem: &GmemMemory<B>,
        bufs: &[(u64, u32, bool)],
    ) -> Result<u16, GuestMemoryError> {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags =
                if w { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            let next = (idx + 1) % self.size;
            let at = self.desc_table + 16 * u64::from(idx);
            mem.write_obj(addr.to_le(), GuestAddress(at))?;
            mem.write_obj(len.to_le(), GuestAddress(at + 8))?;
            mem.write_obj(flags.to_le(), GuestAddress(at + 12))?;
            mem.write_obj(next.to_le(), GuestAddress(at + 14))?;
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )?;
        Ok(head)
    }

    /// A block request: header at `header` (written here), `data` buffers, status at
    /// `status`. Returns the head.
    #[allow(clippy::too_many_arguments)]
    pub fn request<B: Bitmap>(
        &mut self,
        mem: &GmemMemory<B>,
        header: u64,
        ty: u32,
        sector: u64,
        data: &[(u64, u32)],
        status: u64,
    ) -> Result<u16, GuestMemoryError> {
        mem.write_obj(ty.to_le(), GuestAddress(header))?;
        mem.write_obj(0u32, GuestAddress(header + 4))?;
        mem.write_obj(sector.to_le(), GuestAddress(header + 8))?;
        mem.write_obj(0xffu8, GuestAddress(status)).or_else(|e| {
            // A status byte in private memory is the point of some tests: leave it.
            private_address(&e).map(|_| ()).ok_or(e)
        })?;
        let device_writes = ty == VIRTIO_BLK_T_IN || ty == VIRTIO_BLK_T_GET_ID;
        let mut bufs = vec![(header, 16, false)];
        bufs.extend(data.iter().map(|&(a, l)| (a, l, device_writes)));
        bufs.push((status, 1, true));
        self.submit(mem, &bufs)
    }

    /// Used entries `(head, len)` not seen yet.
    pub fn used<B: Bitmap>(
        &mut self,
        mem: &GmemMemory<B>,
    ) -> Result<Vec<(u32, u32)>, GuestMemoryError> {
        let idx: u16 = u16::from_le(mem.load(GuestAddress(self.used + 2), Ordering::Acquire)?);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at))?;
            let len: u32 = mem.read_obj(GuestAddress(at + 4))?;
            out.push((u32::from_le(id), u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(out)
    }
}
