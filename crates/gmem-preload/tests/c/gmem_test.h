/*
 * Shared helpers of gmem's C test programs: the uAPI of the guest_memfd in-place conversion
 * series (the system's <linux/kvm.h> may predate it), assertions, and a SIGBUS probe that
 * uses the program's own handler (as the kernel selftests do).
 */
#ifndef GMEM_TEST_H
#define GMEM_TEST_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define KVMIO 0xAE
#define KVM_GET_API_VERSION _IO(KVMIO, 0x00)
#define KVM_CREATE_VM _IO(KVMIO, 0x01)
#define KVM_CHECK_EXTENSION _IO(KVMIO, 0x03)
#define KVM_GET_VCPU_MMAP_SIZE _IO(KVMIO, 0x04)
#define KVM_CREATE_VCPU _IO(KVMIO, 0x41)
#define KVM_RUN _IO(KVMIO, 0x80)

#define KVM_CAP_MEMORY_ATTRIBUTES 233
#define KVM_CAP_GUEST_MEMFD 234
#define KVM_CAP_VM_TYPES 235
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#ifndef GMEM_SERIES_V7
#define KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES 250 /* v8 */
#else
#define KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES 249 /* v7 */
#endif

#define KVM_X86_DEFAULT_VM 0
#define KVM_X86_SW_PROTECTED_VM 1

#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#define GUEST_MEMFD_FLAG_NO_DIRECT_MAP (1ULL << 2)
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
#define KVM_MEM_GUEST_MEMFD (1U << 2)

struct gm_create_guest_memfd {
	uint64_t size;
	uint64_t flags;
	uint64_t reserved[6];
};

struct gm_userspace_memory_region2 {
	uint32_t slot;
	uint32_t flags;
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
	uint64_t guest_memfd_offset;
	uint32_t guest_memfd;
	uint32_t pad1;
	uint64_t pad2[14];
};

struct gm_memory_attributes2 {
	uint64_t offset;
	uint64_t size;
	uint64_t attributes;
	uint64_t flags;
	uint64_t error_offset;
	uint64_t reserved[11];
};

#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct gm_create_guest_memfd)
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct gm_userspace_memory_region2)
#define KVM_SET_MEMORY_ATTRIBUTES2 _IOWR(KVMIO, 0xd2, struct gm_memory_attributes2)

struct pin_longterm_test {
	uint64_t addr;
	uint64_t size;
	uint32_t flags;
};
#define PIN_LONGTERM_TEST_START _IOW('g', 7, struct pin_longterm_test)
#define PIN_LONGTERM_TEST_STOP _IO('g', 8)
#define PIN_LONGTERM_TEST_FLAG_USE_WRITE 1

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

static const char *gm_prog = "gmem-test";
static int gm_checks;

#define CHECK(cond, ...)                                                              \
	do {                                                                          \
		gm_checks++;                                                          \
		if (!(cond)) {                                                        \
			fprintf(stderr, "%s:%d: FAILED: %s (errno %d %s): ", gm_prog, \
				__LINE__, #cond, errno, strerror(errno));             \
			fprintf(stderr, __VA_ARGS__);                                 \
			fprintf(stderr, "\n");                                        \
			exit(1);                                                      \
		}                                                                     \
	} while (0)

/* Expects `call` to fail with -1 and `err`. */
#define CHECK_ERRNO(call, err)                                                    \
	do {                                                                      \
		errno = 0;                                                        \
		long __r = (long)(call);                                          \
		CHECK(__r == -1 && errno == (err), "%s -> %ld, want -1 %s", #call, \
		      __r, #err);                                                 \
	} while (0)

static long page_size;

static inline int open_kvm(void)
{
	page_size = sysconf(_SC_PAGESIZE);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	CHECK(kvm >= 0, "open /dev/kvm");
	return kvm;
}

static inline int create_vm(int kvm, unsigned long type)
{
	int vm = ioctl(kvm, KVM_CREATE_VM, type);
	CHECK(vm >= 0, "KVM_CREATE_VM(%lu)", type);
	return vm;
}

static inline int __create_gmem(int vm, uint64_t size, uint64_t flags)
{
	struct gm_create_guest_memfd args = { .size = size, .flags = flags };
	return ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);
}

static inline int create_gmem(int vm, uint64_t size, uint64_t flags)
{
	int fd = __create_gmem(vm, size, flags);
	CHECK(fd >= 0, "KVM_CREATE_GUEST_MEMFD(size %#llx, flags %#llx)",
	      (unsigned long long)size, (unsigned long long)flags);
	return fd;
}

/* KVM_SET_MEMORY_ATTRIBUTES2; returns the ioctl's result, errno and error_offset. */
static inline int __set_attrs(int gmem, uint64_t off, uint64_t size, uint64_t attrs,
		       uint64_t *error_offset)
{
	struct gm_memory_attributes2 a = { .offset = off, .size = size, .attributes = attrs };
	a.error_offset = 0xdeadbeef;
	int r = ioctl(gmem, KVM_SET_MEMORY_ATTRIBUTES2, &a);
	if (error_offset)
		*error_offset = a.error_offset;
	return r;
}

static inline void set_private(int gmem, uint64_t off, uint64_t size)
{
	CHECK(__set_attrs(gmem, off, size, KVM_MEMORY_ATTRIBUTE_PRIVATE, NULL) == 0,
	      "to private [%#llx, +%#llx)", (unsigned long long)off, (unsigned long long)size);
}

static inline void set_shared(int gmem, uint64_t off, uint64_t size)
{
	CHECK(__set_attrs(gmem, off, size, 0, NULL) == 0, "to shared [%#llx, +%#llx)",
	      (unsigned long long)off, (unsigned long long)size);
}

/* A SIGBUS probe with the program's own handler (the interposer installs none). */
static sigjmp_buf gm_jmp;
static volatile int gm_sigbus_code;

static inline void gm_sigbus(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	gm_sigbus_code = info->si_code;
	siglongjmp(gm_jmp, 1);
}

static inline void install_sigbus_handler(void)
{
	struct sigaction sa = { 0 };
	sa.sa_sigaction = gm_sigbus;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	CHECK(sigaction(SIGBUS, &sa, NULL) == 0, "sigaction");
}

/* 1 if reading *p raises SIGBUS, 0 if it reads (the byte in *out). */
static inline int read_sigbus(volatile char *p, char *out)
{
	if (sigsetjmp(gm_jmp, 1))
		return 1;
	*out = *p;
	return 0;
}

/* 1 if writing *p raises SIGBUS. */
static inline int write_sigbus(volatile char *p, char v)
{
	if (sigsetjmp(gm_jmp, 1))
		return 1;
	*p = v;
	return 0;
}

static inline void *map_gmem(int gmem, size_t len, off_t off)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, off);
	CHECK(p != MAP_FAILED, "mmap(gmem %d, len %#zx, off %#llx)", gmem, len,
	      (unsigned long long)off);
	return p;
}

static inline void done(void)
{
	printf("%s: ok (%d checks)\n", gm_prog, gm_checks);
}

#endif
