use gmem::uapi::*;
use gmem::*;

#[test]
fn smoke() {
    for rev in [Revocation::Poison, Revocation::Remap] {
        let f = EmulatedGuestMemfd::create_with(
            4 * 4096,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            EmulatedOptions { revocation: rev },
        )
        .unwrap();
        let m = f.mmap_all().unwrap();
        m.write_volatile(0, &[0xaa; 8]).unwrap();
        assert_eq!(m.probe_read(0, 1).unwrap(), Probe::Done(vec![0xaa]));
        f.set_private(0, 4096).unwrap();
        let p = m.probe_read(0, 1).unwrap();
        assert!(p.is_sigbus(), "{rev:?} {p:?}");
        assert_eq!(p.fault().unwrap().addr, 0);
        assert!(m.probe_read(4096, 1).unwrap() == Probe::Done(vec![0]));
        let w = m.probe_write(4096 - 8, 16, 1).unwrap();
        assert_eq!(w.fault().unwrap().addr, 4088, "{w:?}");
        f.set_shared(0, 4096).unwrap();
        assert_eq!(m.probe_read(0, 1).unwrap(), Probe::Done(vec![0xaa]));
    }
}
