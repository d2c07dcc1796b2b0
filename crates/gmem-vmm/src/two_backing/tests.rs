//! Tests of the two-backing layout.

use super::*;
use crate::backing::InPlace;

const P: u64 = PAGE_SIZE;

fn two(preserve: bool) -> TwoBacking {
    TwoBacking::new(
        16 * P,
        false,
        TwoBackingOptions {
            preserve_content: preserve,
        },
    )
    .unwrap()
}

fn byte_host(m: &dyn GuestBacking, off: u64) -> u8 {
    let mut b = [0u8; 1];
    m.host_read(off, &mut b).unwrap();
    b[0]
}

fn byte_guest(m: &dyn GuestBacking, off: u64) -> u8 {
    let mut b = [0u8; 1];
    m.guest_read(off, &mut b).unwrap();
    b[0]
}

#[test]
fn bad_sizes_are_refused_naming_the_size() {
    for size in [0, 4095, 4097] {
        let e = TwoBacking::new(size, false, TwoBackingOptions::default()).unwrap_err();
        assert_eq!(e, TwoBackingError::Size { size });
        assert!(e.to_string().contains(&format!("{size:#x}")), "{e}");
    }
}

#[test]
fn attributes_follow_conversions() {
    let m = two(false);
    assert!(!m.is_private(0));
    m.set_private(4 * P, 4 * P).unwrap();
    assert!((4..8).all(|p| m.is_private(p * P)));
    assert!(!m.is_private(3 * P) && !m.is_private(8 * P));
    m.set_shared(5 * P, P).unwrap();
    assert!(!m.is_private(5 * P) && m.is_private(6 * P));
    assert!(!m.is_private(16 * P), "past the end counts as shared");
    for (off, len) in [
        (1, P),
        (0, 1),
        (0, 0),
        (15 * P, 2 * P),
        (u64::MAX - P + 1, P),
    ] {
        let e = m.set_private(off, len).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL, "[{off:#x}, +{len:#x})");
    }
    let start_private = TwoBacking::new(2 * P, true, TwoBackingOptions::default()).unwrap();
    assert!(start_private.is_private(P));
}

#[test]
fn host_access_to_private_is_refused() {
    let m = two(true);
    m.set_private(2 * P, P).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(
        m.host_read(2 * P - 4, &mut b),
        Err(AccessError::Private { offset: 2 * P })
    );
    assert_eq!(
        m.host_touch(0, 4 * P, 1),
        Err(AccessError::Private { offset: 2 * P })
    );
    assert!(matches!(
        m.host_write(16 * P, &[1]),
        Err(AccessError::OutOfBounds { .. })
    ));
}

#[test]
fn preserving_conversion_keeps_contents_and_frees_the_old_copy() {
    let m = two(true);
    m.host_write(P, &[0xaa; 100]).unwrap();
    m.set_private(0, 4 * P).unwrap();
    assert_eq!(
        byte_guest(&m, P + 99),
        0xaa,
        "guest sees what the host wrote"
    );
    assert_eq!(m.allocated().unwrap(), (P, 0), "shared copy discarded");
    m.guest_write(3 * P, &[0xbb; 10]).unwrap();
    m.set_shared(0, 4 * P).unwrap();
    assert_eq!(m.allocated().unwrap(), (0, 2 * P), "private copy punched");
    assert_eq!(byte_host(&m, P), 0xaa);
    assert_eq!(
        byte_host(&m, 3 * P + 9),
        0xbb,
        "host sees what the guest wrote"
    );
    // (A read fault on a hole of a shared shmem mapping allocates the page.)
    assert_eq!(byte_host(&m, 2 * P), 0, "a hole stays zero");
}

#[test]
fn destructive_conversion_faults_in_zeroes() {
    let m = two(false);
    m.host_write(0, &[0xaa; 10]).unwrap();
    m.set_private(0, P).unwrap();
    assert_eq!(
        byte_guest(&m, 0),
        0,
        "shared copy discarded, private side is fresh"
    );
    m.guest_write(0, &[0xbb; 10]).unwrap();
    assert_eq!(m.allocated().unwrap(), (P, 0));
    m.set_shared(0, P).unwrap();
    assert_eq!(m.allocated().unwrap(), (0, 0));
    assert_eq!(
        byte_host(&m, 0),
        0,
        "private copy punched, shared side is fresh"
    );
    m.host_touch(0, 2 * P, 7).unwrap();
    assert_eq!(
        byte_guest(&m, P),
        7,
        "the guest's shared accesses use the shared RAM"
    );
}

#[test]
fn composite_guest_view_follows_attributes() {
    let m = two(true);
    m.host_write(0, &[0xaa; 8]).unwrap();
    m.set_private(P, P).unwrap();
    m.guest_write(P, &[0xbb; 8]).unwrap();
    let view = m.guest_view().unwrap().as_ptr();
    let at = |off: u64| {
        // SAFETY: inside the 16-page view, which maps existing file ranges.
        unsafe { view.add(off as usize).read_volatile() }
    };
    assert_eq!((at(0), at(P)), (0xaa, 0xbb));
    m.set_shared(P, P).unwrap();
    m.set_private(0, P).unwrap();
    assert_eq!(
        (at(0), at(P)),
        (0xaa, 0xbb),
        "contents followed across the re-map"
    );
    // SAFETY: page 0 is private: the view maps the private store there.
    unsafe { view.write_volatile(0xcc) };
    m.set_shared(0, P).unwrap();
    assert_eq!(
        byte_host(&m, 0),
        0xcc,
        "a write through the view reached the private store"
    );
}

#[test]
fn punch_hole_zeroes_both_sides_and_keeps_attributes() {
    let m = two(true);
    m.host_write(0, &[1; 8]).unwrap();
    m.set_private(P, P).unwrap();
    m.guest_write(P, &[2; 8]).unwrap();
    assert_eq!(m.footprint().unwrap().file_bytes, 2 * P);
    m.punch_hole(0, 2 * P).unwrap();
    assert_eq!(m.footprint().unwrap().file_bytes, 0);
    assert_eq!((byte_host(&m, 0), byte_guest(&m, P)), (0, 0));
    assert!(m.is_private(P));
    assert_eq!(m.punch_hole(1, P), Err(Errno::EINVAL));
}

#[test]
fn in_place_model_preserves_and_revokes() {
    let m = InPlace::emulated(8 * P, false, gmem::EmulatedOptions::default()).unwrap();
    m.host_write(0, &[0xaa; 4]).unwrap();
    m.set_private(0, 2 * P).unwrap();
    assert_eq!(byte_guest(&m, 0), 0xaa);
    assert_eq!(
        m.host_touch(0, P, 1),
        Err(AccessError::Private { offset: 0 })
    );
    m.guest_touch(0, 2 * P, 0xbb).unwrap();
    m.set_shared(0, 2 * P).unwrap();
    m.host_touch(0, 2 * P, 0xcc).unwrap();
    assert_eq!(byte_host(&m, P), 0xcc);
    assert_eq!(byte_guest(&m, 1), 0xaa);
    let fp = m.footprint().unwrap();
    assert_eq!(fp.file_bytes, 2 * P, "one copy only");
    m.punch_hole(0, 8 * P).unwrap();
    assert_eq!(m.footprint().unwrap().file_bytes, 0);
}
