//! Fault injection: the n-th next host-mapping operation (revoke or restore of one run in one
//! mapping, or a removal from the direct map) fails with ENOMEM, as if the kernel refused the
//! mapping change.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::error::{Errno, KernelResult};

/// The number of mapping operations that may still succeed (< 0: off).
#[derive(Debug)]
pub(super) struct FaultInjection {
    fail_after: AtomicI64,
}

impl FaultInjection {
    /// No failure injected.
    pub(super) fn off() -> Self {
        FaultInjection {
            fail_after: AtomicI64::new(-1),
        }
    }

    /// After `ops` more successful operations, the next one fails.
    pub(super) fn arm(&self, ops: u32) {
        self.fail_after.store(i64::from(ops), Ordering::SeqCst);
    }

    /// Counts one operation: ENOMEM if it is the one to fail.
    pub(super) fn injected_failure(&self) -> KernelResult<()> {
        let left = self.fail_after.load(Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left == 0 {
            self.fail_after.store(-1, Ordering::SeqCst);
            return Err(Errno::ENOMEM);
        }
        self.fail_after.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}
