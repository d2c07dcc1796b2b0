//! Tests that hold one of gmem's operations in the middle of a fault, with a userfaultfd of
//! their own registered on the memory it touches (minor faults on shmem): a SIGBUS probe's
//! child, and a follower's guest access in flight across two conversions. They need a
//! userfaultfd with minor faults and are ignored where the host has none.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use gmem::emulated::FAULT_SERVICE_NEEDS;
use gmem::os::PoisonFd;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, EmulatedOptions, GuestMemfd, Probe, Revocation, PAGE_SIZE};

const PS: u64 = PAGE_SIZE;

/// Whether this process has a PTE for `addr` (`/proc/self/pagemap` bit 63).
fn pte_present(addr: usize) -> bool {
    let mut f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    f.seek(SeekFrom::Start((addr as u64 / PS) * 8))
        .expect("seek");
    let mut b = [0u8; 8];
    f.read_exact(&mut b).expect("read pagemap");
    u64::from_le_bytes(b) >> 63 == 1
}

/// A 16-page shared file in Remap mode: gmem registers none of its mappings with a
/// userfaultfd, so the test's own can.
fn file() -> EmulatedGuestMemfd {
    EmulatedGuestMemfd::create_with(
        16 * PS,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        EmulatedOptions::with_revocation(Revocation::Remap),
    )
    .expect("create")
}

/// The probe children of this process (their parent is this process).
fn children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) {
            out.push(pid);
        }
    }
    out
}

/// A probe child blocked on a fault holds no descriptor of this process but its report:
/// a copy of a channel's end kept alive by a waiting probe once hid a forked peer's exit
/// from the owner (its conversion then failed after the peer timeout).
fn probe_child_holds_only_its_report_descriptor() {
    let f = file();
    // In the page cache, so the probe's access is a minor fault.
    f.write_at(0, &[7u8; 8]).expect("write");
    let map = f.mmap_all().expect("mmap");
    let uffd = PoisonFd::with_fault_events().expect("userfaultfd");
    uffd.register(map.mmap()).expect("register");
    let map = std::sync::Arc::new(map);
    let before = children();
    let m2 = std::sync::Arc::clone(&map);
    let t = std::thread::spawn(move || m2.probe_read(0, 8));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        if let Some(ev) = uffd.read_fault().expect("read fault") {
            break ev;
        }
        assert!(Instant::now() < deadline, "the probe never faulted");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(ev.minor);
    let probe_pid = children()
        .into_iter()
        .find(|p| !before.contains(p))
        .expect("the blocked probe child");
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{probe_pid}/fd"))
        .expect("the probe's fd table")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    fds.sort();
    uffd.continue_page(map.as_ptr() as u64, PS)
        .expect("continue");
    let done = t.join().expect("probe thread").expect("probe");
    assert_eq!(
        fds,
        vec!["0".to_string()],
        "descriptors the probe child held"
    );
    match done {
        Probe::Done(bytes) => assert_eq!(bytes, vec![7u8; 8]),
        Probe::Fault(f) => panic!("unexpected fault {f:?}"),
    }
}

/// In a follower, `follow()` does not look at the follower's transient references, so a
/// guest access in flight there can see two conversions of its pages; the first must not
/// forget the access's span while it is in flight (found in review: the second zapped
/// nothing and the page stayed mapped across a to-private conversion).
fn a_follower_access_in_flight_across_two_conversions_is_zapped() {
    use std::os::unix::net::UnixStream;
    let f = file();
    let host = f.mmap_all().expect("mmap");
    host.write_volatile(0, &[1u8; 4 * PS as usize])
        .expect("host");
    drop(host);
    f.set_private(0, 2 * PS).expect("to private");
    let (a, b) = UnixStream::pair().expect("pair");
    let t = std::thread::spawn(move || EmulatedGuestMemfd::receive(&b));
    f.send_to(&a).expect("send");
    let f2 = t.join().expect("join").expect("receive");
    let view = f2.guest_view().expect("follower guest view");
    let g = view.as_ptr() as u64;
    let uffd = PoisonFd::with_fault_events().expect("userfaultfd");
    uffd.register(view).expect("register");
    let wait_fault = |page: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(ev) = uffd.read_fault().expect("read fault") {
                assert_eq!(ev.address & !(PS - 1), g + page * PS);
                return;
            }
            assert!(Instant::now() < deadline, "no fault on page {page}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    std::thread::scope(|s| {
        let r = s.spawn(|| {
            let mut buf = vec![0u8; 2 * PS as usize];
            f2.guest_read(0, &mut buf)
        });
        wait_fault(0); // the reader noted [0, 2 pages) and waits on page 0
        f.set_shared(0, 2 * PS).expect("C1 to shared"); // covers the extent: cleared
        uffd.continue_page(g, PS).expect("continue 0");
        wait_fault(1); // page 0 is mapped now; the reader waits on page 1
        assert!(pte_present((g) as usize));
        f.set_private(0, PS).expect("C2 to private");
        let stale = pte_present(g as usize);
        uffd.continue_page(g + PS, PS).expect("continue 1");
        r.join().expect("reader").expect("guest read");
        assert!(
            !stale,
            "page 0 stayed mapped in the follower's guest view across C2"
        );
    });
}

fn main() {
    gmem_testkit::run(gmem_testkit::tests_needing!([FAULT_SERVICE_NEEDS];
        probe_child_holds_only_its_report_descriptor,
        a_follower_access_in_flight_across_two_conversions_is_zapped,
    ))
}
