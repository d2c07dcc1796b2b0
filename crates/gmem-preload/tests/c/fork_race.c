/*
 * Forks racing the interposer: one thread maps and unmaps a guest_memfd without pause while
 * the main thread forks. Each child, bounded by alarm(2):
 *  - unmaps the mapping it inherited (the interposer's layout lock must not be inherited
 *    held: found in review, a child waited for ever);
 *  - finds every mapping of the guest_memfd's memory it inherited registered with the guard
 *    (`um` in its smaps VmFlags): a mapping made while the fork happened must not reach the
 *    child unregistered (found in review: one did, and read a private page).
 * Exit 1 on a child that hung or found an unregistered mapping.
 */
#include "gmem_test.h"
#include <pthread.h>

static int gfd;
static size_t sz;
static volatile int stop;

static void *mapper(void *arg)
{
	(void)arg;
	while (!stop) {
		char *p = mmap(0, sz, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
		if (p != MAP_FAILED)
			munmap(p, sz);
	}
	return 0;
}

/* In a child: 0 if every memfd:gmem mapping here is registered with a userfaultfd. */
static int all_registered(void)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	if (!f)
		return 0;
	char line[512];
	int in_gmem = 0, bad = 0;
	while (fgets(line, sizeof line, f)) {
		unsigned long lo, hi;
		if (sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
			/* A mapping's first line ("Key:" lines never parse as a range). */
			in_gmem = strstr(line, "memfd:gmem ") != NULL;
			continue;
		}
		if (in_gmem && strncmp(line, "VmFlags:", 8) == 0 && !strstr(line, " um"))
			bad = 1;
	}
	fclose(f);
	return bad;
}

int main(int argc, char **argv)
{
	gm_prog = "fork_race";
	int kvm = open_kvm();
	int vm = create_vm(kvm, KVM_X86_SW_PROTECTED_VM);
	sz = 64 * page_size;
	gfd = create_gmem(vm, sz, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	char *m = map_gmem(gfd, sz, 0);
	memcpy(m, "SECRET!!", 8);
	set_private(gfd, 0, page_size);
	pthread_t t;
	CHECK(pthread_create(&t, 0, mapper, 0) == 0, "mapper thread");
	int forks = argc > 1 ? atoi(argv[1]) : 150;
	int hung = 0, unregistered = 0;
	for (int i = 0; i < forks; i++) {
		pid_t pid = fork();
		CHECK(pid >= 0, "fork %d", i);
		if (pid == 0) {
			alarm(5);
			int bad = all_registered();
			munmap(m, sz);
			_exit(bad ? 3 : 0);
		}
		int st;
		CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
		if (WIFSIGNALED(st) && WTERMSIG(st) == SIGALRM)
			hung++;
		else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			unregistered++;
	}
	stop = 1;
	pthread_join(t, 0);
	CHECK(hung == 0, "%d of %d fork children hung (the interposer's lock inherited held)", hung, forks);
	CHECK(unregistered == 0, "%d of %d fork children found a gmem mapping not registered with the guard",
	      unregistered, forks);
	done();
	return 0;
}
