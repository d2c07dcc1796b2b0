/*
 * attacks: what a careless (or curious) C program does to its mappings, descriptors and
 * children, through the KVM uAPI under `gmem exec`: every access to a private page fails
 * (SIGBUS), in every process, and the page keeps its content. The numbers are the items of
 * the guard's trust boundary (DESIGN.md). Built with -DGMEM_NDM the file is NO_DIRECT_MAP.
 * Exit status 0 when every attack failed; 1 with a message naming the one that worked.
 */
#include "gmem_test.h"

#include <sched.h>
#include <stdbool.h>
#include <sys/syscall.h>
#include <time.h>

#define NPAGES 8

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

static int fd;
static char *m;

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

/* Page p of mapping `base` refuses reads and writes. */
static void refused(char *base, int p, const char *what)
{
	char x;
	CHECK(read_sigbus(base + p * page_size, &x), "%s: page %d read '%c'", what, p, x);
	CHECK(write_sigbus(base + p * page_size, 'E'), "%s: page %d written", what, p);
}

static void reads(char *base, int p, char want, const char *what)
{
	char x = 0;
	CHECK(!read_sigbus(base + p * page_size, &x) && x == want,
	      "%s: page %d read '%c' (0x%02x), want 0x%02x", what, p, x, (unsigned char)x,
	      (unsigned char)want);
}

/* Item 1: DONTNEED, PAGEOUT and COLD leave a mapping that still faults through the check. */
static void dontneed(void)
{
	int advices[] = { MADV_DONTNEED, MADV_PAGEOUT, MADV_COLD };
	for (unsigned i = 0; i < sizeof(advices) / sizeof(advices[0]); i++) {
		CHECK(madvise(m + page_size, page_size, advices[i]) == 0, "madvise page 1");
		refused(m, 1, "after madvise of the page");
		CHECK(madvise(m, NPAGES * page_size, advices[i]) == 0, "madvise all");
		refused(m, 1, "after madvise of the mapping");
		reads(m, 2, 0x42, "a shared neighbour");
	}
}

/* Item 2: a fork child that closes every descriptor is still reached by a conversion, at
 * once. */
static void child_closes_descriptors(void)
{
	int to_child[2], to_parent[2];
	CHECK(pipe(to_child) == 0 && pipe(to_parent) == 0, "pipes");
	reads(m, 3, 0x43, "page 3 before");
	pid_t pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		char go, x;
		/* keep the pipes at 0 and 1 (stdin, stdout), close everything else */
		dup2(to_child[0], 0);
		dup2(to_parent[1], 1);
		syscall(SYS_close_range, 2u, ~0u, 0u);
		if (read_sigbus(m + 3 * page_size, &x) || x != 0x43)
			_exit(11);
		if (!read_sigbus(m + page_size, &x))
			_exit(12);
		if (write(1, "r", 1) != 1 || read(0, &go, 1) != 1)
			_exit(13);
		if (!read_sigbus(m + 3 * page_size, &x))
			_exit(14);
		if (!write_sigbus(m + 3 * page_size, 'E'))
			_exit(15);
		_exit(0);
	}
	char r;
	CHECK(read(to_parent[0], &r, 1) == 1, "child ready");
	double t = now_us();
	set_private(fd, 3 * page_size, page_size);
	t = now_us() - t;
	CHECK(write(to_child[1], "g", 1) == 1, "go");
	int status;
	CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "child that closed its descriptors: status %#x", status);
	CHECK(t < 50000, "conversion took %.0f us", t);
	set_shared(fd, 3 * page_size, page_size);
	close(to_child[0]), close(to_child[1]), close(to_parent[0]), close(to_parent[1]);
}

/* The program's own memory at `at` (if free), filled with 0x5A. */
static char *own_memory_at(char *at, size_t len)
{
	char *p = mmap(at, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	memset(p, 0x5A, len);
	return p;
}

static void own_memory_untouched(char *p, size_t len)
{
	if (!p)
		return;
	for (size_t i = 0; i < len; i++)
		CHECK(p[i] == 0x5A, "the old address was touched at +%#zx", i);
	CHECK(munmap(p, len) == 0, "munmap own");
}

/* Item 4: mremap (the C library's, and a raw system call): the guard follows the mapping;
 * conversions touch nothing at the old address. */
static void mremap_follows(int raw)
{
	size_t len = NPAGES * page_size;
	char *a = map_gmem(fd, len, 0);
	reads(a, 4, 0x44, "page 4 before the move");
	char *b = raw ? (char *)syscall(SYS_mremap, a, len, len, MREMAP_MAYMOVE, 0)
		      : mremap(a, len, len, MREMAP_MAYMOVE);
	CHECK(b != MAP_FAILED, "mremap");
	char *mine = own_memory_at(a, len);
	refused(b, 1, "the moved mapping");
	reads(b, 4, 0x44, "a moved shared page");
	set_private(fd, 4 * page_size, page_size);
	refused(b, 4, "page 4 made private after the move");
	set_shared(fd, 4 * page_size, page_size);
	reads(b, 4, 0x44, "page 4 back to shared");
	own_memory_untouched(mine, len);
	CHECK(munmap(b, len) == 0, "munmap moved");
	if (raw && !mine) {
		/* nothing of the program's there: the old range is the interposer's to release */
		munmap(a, len);
	}
}

/* MADV_POPULATE_* on a private page is EFAULT; MADV_REMOVE punches. */
static void madvise_answers(void)
{
	CHECK_ERRNO(madvise(m, 3 * page_size, MADV_POPULATE_READ), EFAULT);
	CHECK_ERRNO(madvise(m, 3 * page_size, MADV_POPULATE_WRITE), EFAULT);
	CHECK(madvise(m + 2 * page_size, 2 * page_size, MADV_POPULATE_WRITE) == 0, "populate");
	CHECK(madvise(m + 7 * page_size, page_size, MADV_REMOVE) == 0, "MADV_REMOVE");
	reads(m, 7, 0, "page 7 after MADV_REMOVE");
	memset(m + 7 * page_size, 0x47, page_size);
	refused(m, 1, "after populate");
}

/* Item 5: a stopped fork child neither delays nor fails a conversion, and faults on the page
 * when it runs again. */
static void stopped_child(void)
{
	/* The baseline is the least of five conversions while the child, which has the page
	 * mapped, runs; the figure the least of three while it is stopped: one slow run on a
	 * loaded machine says nothing, a conversion that waits for the child is slow every time. */
	enum { RUNNING = 5, ROUNDS = 8 };
	int to_child[2], to_parent[2];
	CHECK(pipe(to_child) == 0 && pipe(to_parent) == 0, "pipes");
	pid_t pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		for (int i = 0; i < ROUNDS; i++) {
			char go, x;
			if (read_sigbus(m + 5 * page_size, &x) || x != 0x45)
				_exit(21);
			if (write(to_parent[1], "r", 1) != 1 || read(to_child[0], &go, 1) != 1)
				_exit(22);
			if (!read_sigbus(m + 5 * page_size, &x))
				_exit(23);
			if (write(to_parent[1], "d", 1) != 1 || read(to_child[0], &go, 1) != 1)
				_exit(24);
		}
		_exit(0);
	}
	double base = 1e9, t = 1e9;
	int st;
	for (int i = 0; i < ROUNDS; i++) {
		char r;
		bool stop = i >= RUNNING;
		CHECK(read(to_parent[0], &r, 1) == 1, "child ready");
		if (stop) {
			CHECK(kill(pid, SIGSTOP) == 0, "SIGSTOP");
			CHECK(waitpid(pid, &st, WUNTRACED) == pid && WIFSTOPPED(st), "stopped");
		}
		double ti = now_us();
		set_private(fd, 5 * page_size, page_size);
		ti = now_us() - ti;
		if (!stop && ti < base)
			base = ti;
		if (stop && ti < t)
			t = ti;
		if (stop)
			CHECK(kill(pid, SIGCONT) == 0, "SIGCONT");
		CHECK(write(to_child[1], "g", 1) == 1, "go");
		CHECK(read(to_parent[0], &r, 1) == 1, "child refused");
		set_shared(fd, 5 * page_size, page_size);
		CHECK(write(to_child[1], "g", 1) == 1, "next round");
	}
	CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "stopped child: status %#x", st);
	CHECK(t <= base + 1000, "with a stopped child %.0f us, without %.0f us", t, base);
	set_shared(fd, 5 * page_size, page_size);
	close(to_child[0]), close(to_child[1]), close(to_parent[0]), close(to_parent[1]);
}

/* Item 10: a vfork child that closes every descriptor before it leaves changes nothing of
 * the parent's. */
static void vfork_child_closes(int vm)
{
	pid_t pid = vfork();
	CHECK(pid >= 0, "vfork");
	if (pid == 0) {
		close_range(3, ~0u, 0);
		for (int i = 3; i < 64; i++)
			close(i);
		_exit(0);
	}
	int st;
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st), "vfork child");
	set_private(fd, 6 * page_size, page_size);
	refused(m, 6, "after the vfork child");
	set_shared(fd, 6 * page_size, page_size);
	char *again = map_gmem(fd, page_size, 0);
	CHECK(munmap(again, page_size) == 0, "munmap");
	int other = create_gmem(vm, page_size, GUEST_MEMFD_FLAG_MMAP);
	close(other);
}

/* Item 12: a child of a raw clone (no fork handler runs) faults on pages made private
 * before the clone and after. */
static void raw_clone_child(void)
{
	int to_child[2], to_parent[2];
	CHECK(pipe(to_child) == 0 && pipe(to_parent) == 0, "pipes");
	long pid = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
	CHECK(pid >= 0, "clone");
	if (pid == 0) {
		char go, x;
		int code = 0;
		if (!read_sigbus(m + page_size, &x))
			code = 31;
		else if (read_sigbus(m + 6 * page_size, &x) || x != 0x46)
			code = 32;
		else if (write(to_parent[1], "r", 1) != 1 || read(to_child[0], &go, 1) != 1)
			code = 33;
		else if (!read_sigbus(m + 6 * page_size, &x))
			code = 34;
		syscall(SYS_exit, code);
	}
	char r;
	CHECK(read(to_parent[0], &r, 1) == 1, "child ready");
	set_private(fd, 6 * page_size, page_size);
	CHECK(write(to_child[1], "g", 1) == 1, "go");
	int st;
	CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "raw clone child: status %#x", st);
	set_shared(fd, 6 * page_size, page_size);
	close(to_child[0]), close(to_child[1]), close(to_parent[0]), close(to_parent[1]);
}

/* remap_file_pages makes a new mapping of the mapping's own file at any offset, which no
 * guard would cover: refused (EPERM), here and in a fork child. */
static void remap_file_pages_refused(void)
{
	CHECK_ERRNO(syscall(SYS_remap_file_pages, m + 3 * page_size, page_size, 0, 1, 0), EPERM);
	reads(m, 3, 0x43, "page 3 after remap_file_pages");
	refused(m, 1, "after remap_file_pages");
	pid_t pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		char x;
		if (syscall(SYS_remap_file_pages, m + 3 * page_size, page_size, 0, 1, 0) != -1 ||
		    errno != EPERM)
			_exit(31);
		if (!read_sigbus(m + page_size, &x))
			_exit(32);
		_exit(0);
	}
	int st;
	CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "remap_file_pages child: status %#x", st);
}

int main(void)
{
	gm_prog = "attacks";
	uint64_t flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
#ifdef GMEM_NDM
	flags |= GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
#endif
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	size_t sz = NPAGES * page_size;
	fd = create_gmem(vm, sz, flags);
	m = map_gmem(fd, sz, 0);
	install_sigbus_handler();
	for (int p = 0; p < NPAGES; p++)
		memset(m + p * page_size, 0x40 + p, page_size);
	set_private(fd, page_size, page_size);

	dontneed();
	child_closes_descriptors();
	mremap_follows(0);
	mremap_follows(1);
	madvise_answers();
	stopped_child();
	vfork_child_closes(vm);
	raw_clone_child();
	remap_file_pages_refused();

	/* the private page kept its content */
	set_shared(fd, page_size, page_size);
	reads(m, 1, 0x41, "page 1, shared again");
	done();
	return 0;
}
