/*
 * In-place conversion through KVM_SET_MEMORY_ATTRIBUTES2 (after guest_memfd_conversions_test):
 * two mappings of one file, conversions both ways with the content kept, SIGBUS in every
 * mapping on private pages, the validation errnos, EAGAIN + error_offset while a page is
 * referenced (gup_test long-term pin, and vmsplice into a pipe), punch-hole keeping
 * attributes, and MAP_FIXED into a reserved range (as QEMU maps guest RAM).
 */
#include "gmem_test.h"
#include <sys/uio.h>

#define NPAGES 4

static void test_two_mappings(int vm)
{
	size_t sz = NPAGES * page_size;
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *a = map_gmem(fd, sz, 0);
	char *b = map_gmem(fd, sz, 0);
	char *c = map_gmem(fd, page_size, page_size); /* page 1 only */
	CHECK(a != b, "two mappings");
	char x;
	for (int i = 0; i < NPAGES; i++) {
		a[i * page_size] = 'A' + i;
		CHECK(b[i * page_size] == 'A' + i, "coherent mappings");
	}
	CHECK(c[0] == 'B', "offset mapping sees page 1");
	/* shared -> private: SIGBUS in every mapping; content kept on the way back */
	set_private(fd, page_size, page_size);
	CHECK(read_sigbus(a + page_size, &x), "a: private page 1 -> SIGBUS");
	CHECK(read_sigbus(b + page_size, &x), "b: private page 1 -> SIGBUS");
	CHECK(read_sigbus(c, &x), "c: private page 1 -> SIGBUS");
	CHECK(write_sigbus(b + page_size, 'z'), "write to a private page -> SIGBUS");
	CHECK(!read_sigbus(a, &x) && x == 'A', "page 0 still shared");
	CHECK(!read_sigbus(b + 2 * page_size, &x) && x == 'C', "page 2 still shared");
	set_shared(fd, page_size, page_size);
	CHECK(!read_sigbus(c, &x) && x == 'B', "private -> shared keeps the content");
	/* the whole file private, then back */
	set_private(fd, 0, sz);
	for (int i = 0; i < NPAGES; i++)
		CHECK(read_sigbus(a + i * page_size, &x), "all private");
	/* early return: converting again is a no-op success */
	set_private(fd, 0, sz);
	set_shared(fd, 0, sz);
	for (int i = 0; i < NPAGES; i++)
		CHECK(!read_sigbus(b + i * page_size, &x) && x == 'A' + i, "content kept");
	munmap(a, sz);
	munmap(b, sz);
	munmap(c, page_size);
	close(fd);
}

static void test_validation(int vm)
{
	size_t sz = NPAGES * page_size;
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	uint64_t eo;
	struct gm_memory_attributes2 a = { .offset = 0, .size = page_size, .flags = 1 };
	CHECK_ERRNO(ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, &a), EINVAL);
	a.flags = 0;
	a.reserved[3] = 1;
	CHECK_ERRNO(ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, &a), EINVAL);
	CHECK_ERRNO(__set_attrs(fd, 0, page_size, 1, &eo), EINVAL); /* unknown attribute */
	CHECK_ERRNO(__set_attrs(fd, 0, 0, KVM_MEMORY_ATTRIBUTE_PRIVATE, &eo), EINVAL);
	CHECK_ERRNO(__set_attrs(fd, 1, page_size, KVM_MEMORY_ATTRIBUTE_PRIVATE, &eo), EINVAL);
	CHECK_ERRNO(__set_attrs(fd, 0, page_size + 1, KVM_MEMORY_ATTRIBUTE_PRIVATE, &eo), EINVAL);
	CHECK_ERRNO(__set_attrs(fd, sz, page_size, KVM_MEMORY_ATTRIBUTE_PRIVATE, &eo), EINVAL);
	CHECK_ERRNO(__set_attrs(fd, 0, sz + page_size, KVM_MEMORY_ATTRIBUTE_PRIVATE, &eo), EINVAL);
	CHECK(eo == 0xdeadbeef, "validation errors leave error_offset alone (%#llx)",
	      (unsigned long long)eo);
	CHECK_ERRNO(ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, (void *)8), EFAULT);
	close(fd);
}

/* EAGAIN with error_offset at the referenced page; after release, the conversion succeeds. */
static void check_eagain(int fd, char *m, int target, const char *how)
{
	size_t sz = NPAGES * page_size;
	uint64_t eo = 0;
	CHECK_ERRNO(__set_attrs(fd, 0, sz, KVM_MEMORY_ATTRIBUTE_PRIVATE, &eo), EAGAIN);
	CHECK(eo == (uint64_t)target * page_size, "%s: error_offset %#llx, want page %d", how,
	      (unsigned long long)eo, target);
	for (int i = 0; i < NPAGES; i++) {
		if (i == target) {
			CHECK_ERRNO(__set_attrs(fd, i * page_size, page_size,
						KVM_MEMORY_ATTRIBUTE_PRIVATE, &eo), EAGAIN);
			CHECK(eo == (uint64_t)i * page_size, "%s: single page error_offset", how);
		} else {
			set_private(fd, i * page_size, page_size);
		}
	}
	(void)m;
}

static void test_elevated_refcount(int vm)
{
	size_t sz = NPAGES * page_size;
	int target = 2;
	char x;

	/* v8: a gup_test long-term pin */
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *m = map_gmem(fd, sz, 0);
	memset(m, 'B', sz);
	int gup = open("/sys/kernel/debug/gup_test", O_RDWR);
	CHECK(gup >= 0, "open gup_test");
	struct pin_longterm_test t = { .addr = (uint64_t)(uintptr_t)(m + target * page_size),
				       .size = page_size, .flags = PIN_LONGTERM_TEST_FLAG_USE_WRITE };
	CHECK(ioctl(gup, PIN_LONGTERM_TEST_START, &t) == 0, "PIN_LONGTERM_TEST_START");
	check_eagain(fd, m, target, "gup_test");
	CHECK(ioctl(gup, PIN_LONGTERM_TEST_STOP) == 0, "PIN_LONGTERM_TEST_STOP");
	close(gup);
	set_private(fd, 0, sz);
	set_shared(fd, 0, sz);
	CHECK(!read_sigbus(m + target * page_size, &x) && x == 'B', "content kept");
	munmap(m, sz);
	close(fd);

	/* v7: vmsplice the page into a pipe that is never read */
	fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	m = map_gmem(fd, sz, 0);
	memset(m, 'C', sz);
	int p[2];
	CHECK(pipe(p) == 0, "pipe");
	struct iovec iov = { .iov_base = m + target * page_size, .iov_len = page_size };
	CHECK(vmsplice(p[1], &iov, 1, 0) == page_size, "vmsplice");
	check_eagain(fd, m, target, "vmsplice");
	close(p[1]);
	close(p[0]);
	set_private(fd, 0, sz);
	munmap(m, sz);
	close(fd);
}

static void test_punch_hole(int vm)
{
	size_t sz = NPAGES * page_size;
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *m = map_gmem(fd, sz, 0);
	char x;
	memset(m, 'D', sz);
	set_private(fd, 0, page_size);
	CHECK(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2 * page_size) == 0,
	      "punch");
	CHECK(read_sigbus(m, &x), "punched private page stays private");
	CHECK(!read_sigbus(m + page_size, &x) && x == 0, "punched shared page reads 0");
	CHECK(!read_sigbus(m + 2 * page_size, &x) && x == 'D', "unpunched page kept");
	set_shared(fd, 0, page_size);
	CHECK(!read_sigbus(m, &x) && x == 0, "punched page reads 0 once shared");
	/* MADV_REMOVE on a mapping is a punch too */
	CHECK(madvise(m + 2 * page_size, page_size, MADV_REMOVE) == 0, "MADV_REMOVE");
	CHECK(!read_sigbus(m + 2 * page_size, &x) && x == 0, "removed page reads 0");
	munmap(m, sz);
	close(fd);
}

static void test_init_private(int vm)
{
	size_t sz = NPAGES * page_size;
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP);
	char *m = map_gmem(fd, sz, 0);
	char x;
	CHECK(read_sigbus(m, &x), "initially private");
	set_shared(fd, 0, page_size);
	CHECK(!read_sigbus(m, &x) && x == 0, "shared page reads 0");
	m[0] = 'E';
	set_private(fd, 0, page_size);
	set_shared(fd, 0, page_size);
	CHECK(m[0] == 'E', "round trip keeps content");
	munmap(m, sz);
	close(fd);
}

/*
 * A VMM reserves address space (PROT_NONE) and maps guest memory into it with MAP_FIXED:
 * the mapping lands there and private pages raise SIGBUS at that address; MAP_FIXED_NOREPLACE
 * over an occupied range is EEXIST; unmapping the whole reservation takes the mapping along.
 */
static void test_map_fixed(int vm)
{
	size_t sz = 2 * page_size;
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *resv = mmap(NULL, 4 * page_size, PROT_NONE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	CHECK(resv != MAP_FAILED, "reserve 4 pages");
	char *m = mmap(resv + page_size, sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
	CHECK(m == resv + page_size, "MAP_FIXED lands at the address asked for (%p, %p)",
	      (void *)m, (void *)(resv + page_size));
	char x;
	m[0] = 'F';
	m[page_size] = 'G';
	set_private(fd, 0, page_size);
	CHECK(read_sigbus(m, &x), "private page at the fixed address -> SIGBUS");
	CHECK(!read_sigbus(m + page_size, &x) && x == 'G', "its shared neighbour reads");
	set_shared(fd, 0, page_size);
	CHECK(!read_sigbus(m, &x) && x == 'F', "back to shared, content kept");
	void *r = mmap(m, page_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
	CHECK(r == MAP_FAILED && errno == EEXIST, "MAP_FIXED_NOREPLACE over a mapping -> EEXIST");
	r = mmap((char *)m + 1, page_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
	CHECK(r == MAP_FAILED && errno == EINVAL, "unaligned MAP_FIXED -> EINVAL");
	CHECK(munmap(resv, 4 * page_size) == 0, "unmap the reservation with the mapping in it");
	/* the range is free again: a NOREPLACE mapping goes there */
	r = mmap(resv, page_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
	CHECK(r == resv, "MAP_FIXED_NOREPLACE into a free range");
	CHECK(!read_sigbus(r, &x) && x == 'F', "and it maps the file");
	munmap(r, page_size);
	close(fd);
}

int main(void)
{
	gm_prog = "conversion";
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	install_sigbus_handler();
	test_two_mappings(vm);
	test_validation(vm);
	test_elevated_refcount(vm);
	test_punch_hole(vm);
	test_init_private(vm);
	test_map_fixed(vm);
	/* the program's own SIGBUS handler is still installed */
	struct sigaction sa;
	sigaction(SIGBUS, NULL, &sa);
	CHECK(sa.sa_sigaction == gm_sigbus, "our SIGBUS handler is still the installed one");
	done();
	return 0;
}
