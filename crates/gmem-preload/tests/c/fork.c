/*
 * fork (guest_memfd_conversions_test `forked_accesses`): a child keeps the parent's mappings
 * and the rules: it sees the parent's shared writes, and private pages raise SIGBUS in it,
 * including pages converted after the fork; and it converts (it holds the descriptor). Exit
 * status 3 means the fork part failed (the
 * child could read a private page), 1 any other failure.
 */
#include "gmem_test.h"

#define NPAGES 4

int main(void)
{
	gm_prog = "fork";
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	size_t sz = NPAGES * page_size;
	int fd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *m = map_gmem(fd, sz, 0);
	install_sigbus_handler();
	memset(m, 'A', sz);
	set_private(fd, page_size, page_size);

	int to_child[2], to_parent[2];
	CHECK(pipe(to_child) == 0 && pipe(to_parent) == 0, "pipes");
	pid_t pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		char x, go;
		int bad = 0;
		if (read_sigbus(m, &x) || x != 'A') {
			fprintf(stderr, "fork child: shared page 0 unreadable or wrong\n");
			_exit(1);
		}
		if (!read_sigbus(m + page_size, &x)) {
			fprintf(stderr, "fork child: private page 1 (private before the fork) read '%c' instead of SIGBUS\n", x);
			bad = 1;
		}
		CHECK(write(to_parent[1], "r", 1) == 1, "signal parent");
		CHECK(read(to_child[0], &go, 1) == 1, "wait for parent");
		if (read_sigbus(m, &x) || x != 'W') {
			fprintf(stderr, "fork child: the parent's shared write is not visible ('%c')\n", x);
			_exit(1);
		}
		if (!read_sigbus(m + 2 * page_size, &x)) {
			fprintf(stderr, "fork child: page 2 (made private after the fork) read '%c' instead of SIGBUS\n", x);
			bad = 1;
		}
		/* The child holds the descriptor, so it converts, as with the kernel's. */
		set_private(fd, 3 * page_size, page_size);
		if (!read_sigbus(m + 3 * page_size, &x)) {
			fprintf(stderr, "fork child: page 3 (made private by the child) read '%c'\n", x);
			bad = 1;
		}
		set_shared(fd, 2 * page_size, page_size);
		if (read_sigbus(m + 2 * page_size, &x) || x != 'A') {
			fprintf(stderr, "fork child: page 2 (made shared by the child) unreadable or wrong\n");
			_exit(1);
		}
		_exit(bad ? 3 : 0);
	}
	char r;
	CHECK(read(to_parent[0], &r, 1) == 1, "child ready");
	m[0] = 'W';
	set_private(fd, 2 * page_size, page_size);
	CHECK(write(to_child[1], "g", 1) == 1, "go");
	int status;
	CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "fork: child failed (status %#x)\n", status);
		return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
	}
	/* and the parent sees the child's conversions */
	char x;
	CHECK(read_sigbus(m + 3 * page_size, &x), "parent: page 3 made private by the child");
	CHECK(!read_sigbus(m + 2 * page_size, &x) && x == 'A', "parent: page 2 made shared by the child");
	done();
	return 0;
}
