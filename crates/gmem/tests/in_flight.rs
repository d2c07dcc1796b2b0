//! Tests that hold one of gmem's operations in the middle of a fault, with a userfaultfd of
//! their own registered on the memory it touches (minor faults on shmem): a SIGBUS probe's
//! child. They need a userfaultfd with minor faults and are ignored where the host has none.

use std::time::{Duration, Instant};

use gmem::emulated::FAULT_SERVICE_NEEDS;
use gmem::os::PoisonFd;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, EmulatedOptions, GuestMemfd, Probe, Revocation, PAGE_SIZE};

const PS: u64 = PAGE_SIZE;

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

fn main() {
    gmem_testkit::run(gmem_testkit::tests_needing!([FAULT_SERVICE_NEEDS];
        probe_child_holds_only_its_report_descriptor,
    ))
}
