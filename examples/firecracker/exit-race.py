#!/usr/bin/env python3
"""Reorders Firecracker's vCPU exit (src/vmm/src/vstate/vcpu.rs, Vcpu::exit) so that the
`VcpuResponse::Exited` message is sent before the exit eventfd is written: the VMM thread,
woken by the eventfd, then always finds the message. In the branch as it is, the eventfd is
written first; a VMM thread that runs between the write and the send reads the eventfd,
finds no message, and waits again, and the vCPU waits for a `Finish` that never comes (the
hang run.sh counts). Used by `run.sh --fix-exit-race`, to show the hang is that race."""
import sys

path = sys.argv[1]
src = open(path).read()
old = """        if let Err(err) = self.exit_evt.write(1) {
            METRICS.vcpu.failures.inc();
            error!("Failed signaling vcpu exit event: {}", err);
        }
        // From this state we only accept going to finished.
        loop {
            self.response_sender
                .send(VcpuResponse::Exited(exit_code))
                .expect("vcpu channel unexpectedly closed");
"""
new = """        let mut signalled = false;
        // From this state we only accept going to finished.
        loop {
            self.response_sender
                .send(VcpuResponse::Exited(exit_code))
                .expect("vcpu channel unexpectedly closed");
            // The message first, then the wake-up (gmem's examples/firecracker/exit-race.py).
            if !signalled {
                signalled = true;
                if let Err(err) = self.exit_evt.write(1) {
                    METRICS.vcpu.failures.inc();
                    error!("Failed signaling vcpu exit event: {}", err);
                }
            }
"""
if new in src:
    sys.exit(0)
if old not in src:
    sys.exit("Vcpu::exit is not as expected; not patched")
open(path, "w").write(src.replace(old, new))
