/*
 * A vCPU reads and writes shared and private memory through a guest_memfd memslot, with the
 * host converting in between (after private_mem_conversions_test, in miniature). The guest
 * runs in real mode (a few instructions; the host's KVM emulates CPL0 code).
 */
#include <linux/kvm.h>
#include "gmem_test.h"

#define NPAGES 16

static const unsigned char guest_code[] = {
	0xA0, 0x00, 0x20,             /* mov al, [0x2000]  ; private read  */
	0xE6, 0x10,                   /* out 0x10, al                      */
	0xA0, 0x00, 0x40,             /* mov al, [0x4000]  ; shared read   */
	0xE6, 0x11,                   /* out 0x11, al                      */
	0xC6, 0x06, 0x00, 0x30, 0x5A, /* mov byte [0x3000], 0x5a ; private write */
	0xC6, 0x06, 0x01, 0x40, 'T',  /* mov byte [0x4001], 'T'  ; shared write  */
	0xF4,                         /* hlt                               */
};

static int vcpu_fd;
static struct kvm_run *run;

static void reset_vcpu(void)
{
	struct kvm_sregs sregs;
	CHECK(ioctl(vcpu_fd, KVM_GET_SREGS, &sregs) == 0, "KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.ds.base = 0;
	sregs.ds.selector = 0;
	CHECK(ioctl(vcpu_fd, KVM_SET_SREGS, &sregs) == 0, "KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
	CHECK(ioctl(vcpu_fd, KVM_SET_REGS, &regs) == 0, "KVM_SET_REGS");
}

/* Runs to the next exit; for an `out`, returns the byte written and its port. */
static int run_to_exit(int *port)
{
	CHECK(ioctl(vcpu_fd, KVM_RUN, 0) == 0, "KVM_RUN");
	if (run->exit_reason == KVM_EXIT_IO) {
		*port = run->io.port;
		return *((unsigned char *)run + run->io.data_offset);
	}
	return -(int)run->exit_reason;
}

static void run_guest(char want_private, char want_shared)
{
	int port, v;
	reset_vcpu();
	v = run_to_exit(&port);
	CHECK(port == 0x10 && v == want_private, "guest read of private page: port %#x value %d, want '%c'",
	      port, v, want_private);
	v = run_to_exit(&port);
	CHECK(port == 0x11 && v == want_shared, "guest read of shared page: value %d, want '%c'", v,
	      want_shared);
	v = run_to_exit(&port);
	CHECK(v == -KVM_EXIT_HLT, "guest halts (exit %d)", -v);
}

int main(void)
{
	gm_prog = "vcpu";
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	size_t sz = NPAGES * page_size;
	int gmem = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *m = map_gmem(gmem, sz, 0);
	install_sigbus_handler();
	char x;

	memcpy(m + 0x1000, guest_code, sizeof(guest_code));
	m[0x2000] = 'P'; /* written while shared, then made private: the guest reads it */
	m[0x4000] = 'S';
	set_private(gmem, 0x2000, 2 * page_size); /* pages 2 and 3 */
	CHECK(read_sigbus(m + 0x2000, &x), "host: private page -> SIGBUS");

	struct gm_userspace_memory_region2 r = {
		.slot = 0, .flags = KVM_MEM_GUEST_MEMFD, .guest_phys_addr = 0, .memory_size = sz,
		.userspace_addr = (uint64_t)(uintptr_t)m, .guest_memfd = (uint32_t)gmem,
		.guest_memfd_offset = 0,
	};
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) == 0, "guest_memfd memslot");
	vcpu_fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	CHECK(vcpu_fd >= 0, "KVM_CREATE_VCPU");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	CHECK(run != MAP_FAILED, "mmap kvm_run");

	run_guest('P', 'S');
	/* the guest's private write, made visible by converting to shared */
	CHECK(read_sigbus(m + 0x3000, &x), "host: page 3 still private");
	set_shared(gmem, 0x3000, page_size);
	CHECK(!read_sigbus(m + 0x3000, &x) && x == 0x5a, "private -> shared keeps the guest's write (%#x)",
	      (unsigned char)x);
	CHECK(m[0x4001] == 'T', "the guest's shared write is visible to the host");

	/* round trip with new content */
	set_shared(gmem, 0x2000, page_size);
	CHECK(m[0x2000] == 'P', "content kept");
	m[0x2000] = 'Q';
	m[0x4000] = 'R';
	set_private(gmem, 0x2000, page_size);
	run_guest('Q', 'R');

	/* punch-hole of a private page: the guest reads zero */
	CHECK(fallocate(gmem, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0x2000, page_size) == 0, "punch");
	run_guest(0, 'R');

	/* delete the slot */
	r.memory_size = 0;
	r.flags = 0;
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) == 0, "delete slot");
	done();
	return 0;
}
