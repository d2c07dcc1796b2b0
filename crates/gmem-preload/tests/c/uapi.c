/*
 * The guest_memfd uAPI as a VMM meets it: capabilities, a SW_PROTECTED VM, a guest_memfd for
 * each flag set, the descriptor's file calls with the kernel's errnos, dup/close, fallocate,
 * mmap rules, MADV_COLLAPSE, and memslot binding checks (after guest_memfd_test.c).
 */
#include "gmem_test.h"

static void test_caps(int kvm, int vm, int vm0)
{
	int types = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES);
	CHECK(types & (1 << KVM_X86_SW_PROTECTED_VM), "VM_TYPES %#x lacks SW_PROTECTED", types);
	CHECK(types & (1 << KVM_X86_DEFAULT_VM), "VM_TYPES %#x lacks DEFAULT", types);
	CHECK(ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) == 1, "CAP_GUEST_MEMFD");
	int flags = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
	CHECK((flags & 3) == 3, "GUEST_MEMFD_FLAGS %#x", flags);
	CHECK(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) ==
		      (int)KVM_MEMORY_ATTRIBUTE_PRIVATE,
	      "GUEST_MEMFD_MEMORY_ATTRIBUTES on SW_PROTECTED");
	CHECK(ioctl(vm0, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0,
	      "GUEST_MEMFD_MEMORY_ATTRIBUTES on the default VM");
	CHECK(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES) == 0,
	      "per-VM MEMORY_ATTRIBUTES must be 0 in per-gmem mode");
}

static void test_create(int vm, int flags_cap)
{
	for (uint64_t size = 1; size < (uint64_t)page_size; size += 511)
		CHECK_ERRNO(__create_gmem(vm, size, 0), EINVAL);
	CHECK_ERRNO(__create_gmem(vm, 0, 0), EINVAL);
	for (int bit = 0; bit < 64; bit++) {
		uint64_t f = 1ULL << bit;
		if (f & (uint64_t)flags_cap)
			continue;
		CHECK_ERRNO(__create_gmem(vm, page_size, f), EINVAL);
	}
	/* One file per valid flag set; distinct inodes, st_size, st_blksize. */
	uint64_t sets[] = { 0, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED,
			    GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED };
	ino_t prev = 0;
	for (unsigned i = 0; i < 4; i++) {
		int fd = create_gmem(vm, 4 * page_size, sets[i]);
		struct stat st;
		CHECK(fstat(fd, &st) == 0, "fstat");
		CHECK(st.st_size == 4 * page_size, "st_size %lld", (long long)st.st_size);
		CHECK(st.st_blksize == page_size, "st_blksize %ld", (long)st.st_blksize);
		CHECK(st.st_ino != prev, "inode numbers must differ");
		prev = st.st_ino;
		void *p = mmap(NULL, page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (sets[i] & GUEST_MEMFD_FLAG_MMAP) {
			CHECK(p != MAP_FAILED, "mmap with MMAP flag");
			char c;
			install_sigbus_handler();
			int bus = read_sigbus(p, &c);
			if (sets[i] & GUEST_MEMFD_FLAG_INIT_SHARED)
				CHECK(!bus && c == 0, "INIT_SHARED page reads 0");
			else
				CHECK(bus, "a private page must raise SIGBUS");
			CHECK(munmap(p, page_size) == 0, "munmap");
		} else {
			CHECK(p == MAP_FAILED && errno == ENODEV, "mmap without MMAP -> ENODEV");
		}
		close(fd);
	}
}

static void test_file_calls(int vm)
{
	int fd = create_gmem(vm, 4 * page_size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char buf[64];
	CHECK_ERRNO(read(fd, buf, sizeof(buf)), EINVAL);
	CHECK_ERRNO(write(fd, buf, sizeof(buf)), EINVAL);
	CHECK_ERRNO(pread(fd, buf, sizeof(buf), 0), ESPIPE);
	CHECK_ERRNO(pwrite(fd, buf, sizeof(buf), 0), ESPIPE);
	CHECK_ERRNO(lseek(fd, 0, SEEK_SET), ESPIPE);
	CHECK_ERRNO(ftruncate(fd, page_size), EINVAL);

	/* fallocate (test_fallocate, test_invalid_punch_hole) */
	CHECK_ERRNO(fallocate(fd, 0, 0, page_size), EOPNOTSUPP);
	CHECK_ERRNO(fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, page_size), EOPNOTSUPP);
	CHECK(fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, page_size) == 0, "allocate");
	CHECK_ERRNO(fallocate(fd, FALLOC_FL_KEEP_SIZE, 4 * page_size, page_size), EINVAL);
	CHECK_ERRNO(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1, page_size), EINVAL);
	CHECK_ERRNO(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, page_size + 1), EINVAL);
	CHECK(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * page_size, page_size) == 0,
	      "punching at the size succeeds");

	/* mmap rules */
	void *p = mmap(NULL, page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	CHECK(p == MAP_FAILED && errno == EINVAL, "MAP_PRIVATE -> EINVAL");
	char *m = map_gmem(fd, 4 * page_size, 0);
	CHECK_ERRNO(madvise(m, 4 * page_size, MADV_COLLAPSE), EINVAL);
	CHECK(madvise(m, 4 * page_size, MADV_DONTNEED) == 0, "MADV_DONTNEED");
	m[0] = 'x';

	/* dup: the state belongs to the open file */
	int d = dup(fd);
	CHECK(d >= 0, "dup");
	close(fd);
	CHECK_ERRNO(read(d, buf, 1), EINVAL);
	set_private(d, 0, page_size);
	char c;
	CHECK(read_sigbus(m, &c), "private through the dup: SIGBUS");
	int f = fcntl(d, F_DUPFD_CLOEXEC, 100);
	CHECK(f >= 100, "F_DUPFD_CLOEXEC");
	close(d);
	set_shared(f, 0, page_size);
	CHECK(!read_sigbus(m, &c) && c == 'x', "shared again through F_DUPFD, content kept");
	int d2 = dup2(f, 200);
	CHECK(d2 == 200, "dup2");
	close(f);
	CHECK_ERRNO(lseek(200, 0, SEEK_SET), ESPIPE);
	/* an unknown ioctl on guest_memfd */
	CHECK_ERRNO(ioctl(200, KVM_RUN, 0), ENOTTY);
	munmap(m, 4 * page_size);
	close(200);
}

static int set_region2(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
		       uint64_t uaddr, int gmem, uint64_t off)
{
	struct gm_userspace_memory_region2 r = {
		.slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
		.userspace_addr = uaddr, .guest_memfd = (uint32_t)gmem, .guest_memfd_offset = off,
	};
	return ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r);
}

static void test_binding(int kvm, int vm)
{
	size_t sz = 16 * page_size;
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *m = map_gmem(fd, sz, 0);
	uint64_t ua = (uint64_t)(uintptr_t)m;
	/* offset + size beyond the file, unaligned offset */
	CHECK_ERRNO(set_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, sz, ua, fd, page_size), EINVAL);
	CHECK_ERRNO(set_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, page_size, ua, fd, 1), EINVAL);
	/* a descriptor that is not a guest_memfd; one that is not open */
	CHECK_ERRNO(set_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, page_size, ua, kvm, 0), EINVAL);
	CHECK_ERRNO(set_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, page_size, ua, 900, 0), EBADF);
	/* another VM's file */
	int vm2 = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	int other = create_gmem(vm2, sz, GUEST_MEMFD_FLAG_MMAP);
	CHECK_ERRNO(set_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, page_size, ua, other, 0), EINVAL);
	/* two halves: fine; an overlapping third: EEXIST */
	CHECK(set_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, sz / 2, ua, fd, 0) == 0, "bind first half");
	CHECK(set_region2(vm, 1, KVM_MEM_GUEST_MEMFD, 1 << 30, sz / 2, ua, fd, sz / 2) == 0,
	      "bind second half");
	CHECK_ERRNO(set_region2(vm, 2, KVM_MEM_GUEST_MEMFD, 2ULL << 30, page_size, ua, fd, 0), EEXIST);
	/* guest_memfd slots are immutable */
	CHECK_ERRNO(set_region2(vm, 0, KVM_MEM_GUEST_MEMFD, 0, sz / 2, ua, fd, 0), EINVAL);
	/* delete, then the range is free again */
	CHECK(set_region2(vm, 0, 0, 0, 0, 0, 0, 0) == 0, "delete slot 0");
	CHECK(set_region2(vm, 2, KVM_MEM_GUEST_MEMFD, 2ULL << 30, page_size, ua, fd, 0) == 0,
	      "rebind after delete");
	close(other);
	close(vm2);
	munmap(m, sz);
	close(fd);
}

int main(void)
{
	gm_prog = "uapi";
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	int vm0 = create_vm(kvm, KVM_X86_DEFAULT_VM);
	test_caps(kvm, vm, vm0);
	int flags_cap = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
	test_create(vm, flags_cap);
	test_file_calls(vm);
	test_binding(kvm, vm);
	done();
	return 0;
}
