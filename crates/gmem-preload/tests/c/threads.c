/*
 * Thread safety, one thread per vCPU: two vCPUs loop reading a page through a guest_memfd
 * memslot (each KVM_RUN ends in an `out` of the byte read) while the main thread converts that
 * page between private and shared, maps and unmaps the file and dups and closes its descriptor;
 * the guests always read the same content. Then the slot is deleted from the main thread while
 * the vCPUs run: each vCPU stops at its next exit that is not the `out` (as with the kernel, the
 * guest has lost its memory), and nothing hangs or crashes.
 */
#include <linux/kvm.h>
#include <pthread.h>
#include "gmem_test.h"

#define NPAGES 16
#define NVCPUS 2

static const unsigned char loop_code[] = {
	0xA0, 0x00, 0x20, /* L: mov al, [0x2000] */
	0xE6, 0x10,       /*    out 0x10, al     */
	0xEB, 0xF9,       /*    jmp L            */
};

struct vcpu {
	int fd;
	struct kvm_run *run;
	pthread_t thread;
	long outs, wrong;
	int last_exit;
};

static volatile int stop;

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	while (!stop) {
		if (ioctl(v->fd, KVM_RUN, 0) != 0) {
			v->last_exit = -errno;
			break;
		}
		if (v->run->exit_reason != KVM_EXIT_IO) {
			v->last_exit = v->run->exit_reason;
			break;
		}
		unsigned char b = *((unsigned char *)v->run + v->run->io.data_offset);
		v->outs++;
		if (b != 'P')
			v->wrong++;
	}
	return NULL;
}

int main(void)
{
	gm_prog = "threads";
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	size_t sz = NPAGES * page_size;
	int gmem = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *m = map_gmem(gmem, sz, 0);
	memcpy(m + 0x1000, loop_code, sizeof(loop_code));
	m[0x2000] = 'P';
	struct gm_userspace_memory_region2 r = {
		.slot = 0, .flags = KVM_MEM_GUEST_MEMFD, .memory_size = sz,
		.userspace_addr = (uint64_t)(uintptr_t)m, .guest_memfd = (uint32_t)gmem,
	};
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) == 0, "memslot");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct vcpu v[NVCPUS];
	for (int i = 0; i < NVCPUS; i++) {
		memset(&v[i], 0, sizeof(v[i]));
		v[i].fd = ioctl(vm, KVM_CREATE_VCPU, i);
		CHECK(v[i].fd >= 0, "vcpu %d", i);
		v[i].run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v[i].fd, 0);
		CHECK(v[i].run != MAP_FAILED, "mmap run");
		struct kvm_sregs sregs;
		CHECK(ioctl(v[i].fd, KVM_GET_SREGS, &sregs) == 0, "sregs");
		sregs.cs.base = 0;
		sregs.cs.selector = 0;
		CHECK(ioctl(v[i].fd, KVM_SET_SREGS, &sregs) == 0, "sregs");
		struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
		CHECK(ioctl(v[i].fd, KVM_SET_REGS, &regs) == 0, "regs");
		CHECK(pthread_create(&v[i].thread, NULL, vcpu_thread, &v[i]) == 0, "thread");
	}
	install_sigbus_handler();
	char x;
	for (int i = 0; i < 200; i++) {
		set_private(gmem, 0x2000, page_size);
		CHECK(read_sigbus(m + 0x2000, &x), "private while vCPUs run");
		char *extra = map_gmem(gmem, sz, 0);
		CHECK(read_sigbus(extra + 0x2000, &x), "private in a new mapping too");
		int d = dup(gmem);
		set_shared(d, 0x2000, page_size);
		close(d);
		CHECK(extra[0x2000] == 'P', "shared again, content kept");
		munmap(extra, sz);
	}
	long outs = 0;
	for (int i = 0; i < NVCPUS; i++)
		outs += v[i].outs;
	CHECK(outs > 0, "the vCPUs ran (%ld exits)", outs);
	/* delete the slot under the running vCPUs */
	r.memory_size = 0;
	r.flags = 0;
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r) == 0, "delete the slot while vCPUs run");
	for (int i = 0; i < NVCPUS; i++) {
		pthread_join(v[i].thread, NULL);
		CHECK(v[i].wrong == 0, "vCPU %d read wrong content %ld times", i, v[i].wrong);
		printf("vcpu %d: %ld exits, then exit %d after the slot went\n", i, v[i].outs,
		       v[i].last_exit);
	}
	done();
	return 0;
}
