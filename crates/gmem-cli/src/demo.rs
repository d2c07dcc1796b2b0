//! `gmem demo`: a walk through the emulated guest_memfd.

use std::process::ExitCode;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd, Probe, PAGE_SIZE};

/// The walk found the emulation misbehaving.
#[derive(Debug, thiserror::Error)]
enum DemoError {
    /// A private page read from the host mapping without a fault.
    #[error("the host read a private page without a SIGBUS")]
    PrivateReadable,
    /// A conversion went through a pinned page.
    #[error("the conversion to private succeeded despite a pin on page 1")]
    PinIgnored,
}

/// `SIGBUS`, `SIGSEGV`, or the number.
fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        n => format!("signal {n}"),
    }
}

/// Arguments of `gmem demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// File size in 4 KiB pages (2 to 262144).
    #[arg(long, default_value_t = 4)]
    pages: u64,
}

/// Fewest pages: the walk converts pages 0 and 1 and pins page 1.
const MIN_PAGES: u64 = 2;
/// Most pages (1 GiB).
const MAX_PAGES: u64 = 1 << 18;

pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    crate::usage::in_range(
        "--pages",
        args.pages,
        MIN_PAGES,
        MAX_PAGES,
        "the walk converts pages 0 and 1 and pins page 1; at most 1 GiB",
    )?;
    let f = EmulatedGuestMemfd::create(
        args.pages * PAGE_SIZE,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )?;
    println!(
        "created an emulated guest_memfd of {} pages ({} KiB), flags mmap|init_shared: all shared",
        args.pages,
        args.pages * PAGE_SIZE / 1024
    );
    let m = f.mmap_all()?;
    m.write_volatile(0, &[0xaa; 16])?;
    println!("host wrote 0xaa at 0 through its mapping");
    f.set_private(0, PAGE_SIZE).map_err(|e| e.errno)?;
    println!("page 0 converted to private");
    match m.probe_read(0, 1)? {
        Probe::Fault(fault) => println!(
            "host read of page 0: {} at offset {:#x}",
            signal_name(fault.signal),
            fault.addr
        ),
        Probe::Done(_) => return Err(DemoError::PrivateReadable.into()),
    }
    if let Err(e) = f.read_at(0, &mut [0u8; 1]) {
        println!("safe accessor: {e}");
    }
    f.set_shared(0, PAGE_SIZE).map_err(|e| e.errno)?;
    let mut b = [0u8; 1];
    f.read_at(0, &mut b)?;
    println!(
        "converted back to shared: host reads {:#x} (content preserved)",
        b[0]
    );
    let pin = f.pin(PAGE_SIZE, PAGE_SIZE)?;
    match f.set_private(0, 2 * PAGE_SIZE) {
        Err(e) => println!(
            "to private with page 1 pinned: {} error_offset={:#x}",
            e.errno.name(),
            e.error_offset
        ),
        Ok(()) => return Err(DemoError::PinIgnored.into()),
    }
    drop(pin);
    f.punch_hole(0, PAGE_SIZE)?;
    f.read_at(0, &mut b)?;
    let attrs = f.attributes(0)?;
    println!(
        "after punch-hole page 0 reads {:#x} and is {} (attributes {attrs:#x}, kept)",
        b[0],
        if attrs & gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            "private"
        } else {
            "shared"
        }
    );
    Ok(ExitCode::SUCCESS)
}
