/*
 * KVM_PRE_FAULT_MEMORY on a vCPU, with the kernel's semantics: where the host's KVM cannot
 * (no two-dimensional paging, as under PVM), the interposer answers for the VMs it made. A
 * guest_memfd memslot with private and shared pages and a plain anonymous memslot; ranges
 * inside, straddling the end and past every memslot; the argument checks.
 */
#include <linux/kvm.h>
#include "gmem_test.h"

#ifndef KVM_CAP_PRE_FAULT_MEMORY
#define KVM_CAP_PRE_FAULT_MEMORY 236
#endif

struct gm_pre_fault_memory {
	uint64_t gpa;
	uint64_t size;
	uint64_t flags;
	uint64_t padding[5];
};
#define GM_PRE_FAULT_MEMORY _IOWR(KVMIO, 0xd5, struct gm_pre_fault_memory)

#define NPAGES 16
#define PLAIN_GPA 0x100000UL

static int vcpu_fd;

/* One call; returns 0 or -errno, and leaves the range in *r. */
static int pre_fault(struct gm_pre_fault_memory *r)
{
	return ioctl(vcpu_fd, GM_PRE_FAULT_MEMORY, r) == 0 ? 0 : -errno;
}

int main(void)
{
	gm_prog = "prefault";
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	CHECK(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_PRE_FAULT_MEMORY) == 1,
	      "KVM_CAP_PRE_FAULT_MEMORY advertised");
	size_t sz = NPAGES * page_size;
	int gmem = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	set_private(gmem, 2 * page_size, 2 * page_size);
	struct gm_userspace_memory_region2 r = {
		.slot = 0, .flags = KVM_MEM_GUEST_MEMFD, .guest_phys_addr = 0, .memory_size = sz,
		.userspace_addr = 0, .guest_memfd = (uint32_t)gmem, .guest_memfd_offset = 0,
	};
	char *m = map_gmem(gmem, sz, 0);
	r.userspace_addr = (uint64_t)(uintptr_t)m;
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) == 0, "guest_memfd memslot");
	size_t plain_sz = 4 * page_size;
	char *anon = mmap(NULL, plain_sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(anon != MAP_FAILED, "anonymous memory");
	struct gm_userspace_memory_region2 p = {
		.slot = 1, .flags = 0, .guest_phys_addr = PLAIN_GPA, .memory_size = plain_sz,
		.userspace_addr = (uint64_t)(uintptr_t)anon,
	};
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &p) == 0, "plain memslot");
	vcpu_fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	CHECK(vcpu_fd >= 0, "KVM_CREATE_VCPU");

	/* The whole guest_memfd slot (private and shared pages), twice. */
	for (int i = 0; i < 2; i++) {
		struct gm_pre_fault_memory a = { .gpa = 0, .size = sz };
		CHECK(pre_fault(&a) == 0 && a.size == 0 && a.gpa == sz,
		      "whole slot: left %#lx at %#lx", (unsigned long)a.size, (unsigned long)a.gpa);
	}
	/* Straddling the end: the page inside is done, the call succeeds with the rest left. */
	struct gm_pre_fault_memory b = { .gpa = sz - page_size, .size = 2 * page_size };
	CHECK(pre_fault(&b) == 0 && b.size == (uint64_t)page_size && b.gpa == sz,
	      "straddling: left %#lx", (unsigned long)b.size);
	/* Past every memslot: ENOENT with the range unchanged. */
	int e = pre_fault(&b);
	CHECK(e == -ENOENT && b.size == (uint64_t)page_size && b.gpa == sz, "past the slot: %d, left %#lx",
	      e, (unsigned long)b.size);
	/* The plain slot. */
	struct gm_pre_fault_memory c = { .gpa = PLAIN_GPA, .size = plain_sz };
	CHECK(pre_fault(&c) == 0 && c.size == 0, "plain slot: left %#lx", (unsigned long)c.size);
	/* The argument checks, before anything is done. */
	struct gm_pre_fault_memory bad[] = {
		{ .gpa = 0, .size = page_size, .flags = 1 },
		{ .gpa = 1, .size = page_size },
		{ .gpa = 0, .size = 1 },
		{ .gpa = 0, .size = 0 },
		{ .gpa = -page_size, .size = 2 * page_size },
	};
	for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct gm_pre_fault_memory before = bad[i];
		e = pre_fault(&bad[i]);
		CHECK(e == -EINVAL && bad[i].size == before.size && bad[i].gpa == before.gpa,
		      "bad argument %u: %d", i, e);
	}
	/* The private pages stayed private to the host. */
	char x;
	install_sigbus_handler();
	CHECK(read_sigbus(m + 2 * page_size, &x), "host: private page -> SIGBUS after pre-fault");
	CHECK(!read_sigbus(m + 4 * page_size, &x) && x == 0, "host: shared page reads zero");
	done();
	return 0;
}
