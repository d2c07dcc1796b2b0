/*
 * The cost the interposer adds to calls it does not handle. In one process, round after
 * round, the same call is made through the program's own `ioctl` (the interposer's, under
 * gmem exec) and through the C library's `ioctl` found with dlsym in libc.so.6 (what the
 * program would call without the interposer), so both see the same load. Calls: a non-KVM
 * ioctl (FIONREAD on a pipe), a KVM ioctl the interposer passes on (KVM_GET_API_VERSION on
 * /dev/kvm), and a KVM_RUN round trip (a real-mode guest doing `out` in a loop: one exit per
 * KVM_RUN, default VM, anonymous memory).
 * Output, one line per call: `name interposed_ns direct_ns added_ns added_percent
 * median_diff_ns`: the times are the minimum over rounds of the mean per call, `added` their
 * difference, and `median_diff` the median over rounds of the per-round difference (rounds alternate which of the two goes first). Run it
 * without the interposer too: both columns are then the same function, and `added` is the
 * noise floor of this host at this moment.
 */
#include <linux/kvm.h>
#include "gmem_test.h"
#include <dlfcn.h>
#include <time.h>

typedef int (*ioctl_fn)(int, unsigned long, ...);

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

#define ROUNDS 301

static double median(double *v, int n)
{
	qsort(v, n, sizeof(double), cmp);
	return v[n / 2];
}

static double min_of(const double *v, int n)
{
	double m = v[0];
	for (int i = 1; i < n; i++)
		m = v[i] < m ? v[i] : m;
	return m;
}

static void measure(const char *name, ioctl_fn direct, int fd, unsigned long req, void *arg,
		    int iters)
{
	double a[ROUNDS], b[ROUNDS], d[ROUNDS];
	for (int r = 0; r < ROUNDS; r++) {
		/* alternate which goes first, so an order effect cancels out */
		double t0, t1, t2;
		if (r % 2 == 0) {
			t0 = now_ns();
			for (int i = 0; i < iters; i++)
				ioctl(fd, req, arg);
			t1 = now_ns();
			for (int i = 0; i < iters; i++)
				direct(fd, req, arg);
			t2 = now_ns();
			a[r] = (t1 - t0) / iters;
			b[r] = (t2 - t1) / iters;
		} else {
			t0 = now_ns();
			for (int i = 0; i < iters; i++)
				direct(fd, req, arg);
			t1 = now_ns();
			for (int i = 0; i < iters; i++)
				ioctl(fd, req, arg);
			t2 = now_ns();
			b[r] = (t1 - t0) / iters;
			a[r] = (t2 - t1) / iters;
		}
		d[r] = a[r] - b[r];
	}
	double ma = min_of(a, ROUNDS), mb = min_of(b, ROUNDS), md = median(d, ROUNDS);
	/* added: the difference of the minima (the least disturbed rounds of each), and the
	 * median of the per-round differences */
	printf("%s %.2f %.2f %.2f %.3f %.2f\n", name, ma, mb, ma - mb, 100.0 * (ma - mb) / mb, md);
}

int main(int argc, char **argv)
{
	gm_prog = "overhead";
	int iters = argc > 1 ? atoi(argv[1]) : 2000;
	int runs = argc > 2 ? atoi(argv[2]) : 50;
	void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
	CHECK(libc != NULL, "libc.so.6 loaded");
	ioctl_fn direct = (ioctl_fn)dlsym(libc, "ioctl");
	CHECK(direct != NULL, "dlsym ioctl");
	int kvm = open_kvm();
	int p[2], n;
	CHECK(pipe(p) == 0, "pipe");
	measure("ioctl_fionread", direct, p[0], FIONREAD, &n, iters);
	measure("ioctl_kvm_get_api_version", direct, kvm, KVM_GET_API_VERSION, NULL, iters);

	int vm = create_vm(kvm, KVM_X86_DEFAULT_VM);
	size_t sz = 0x10000;
	unsigned char *mem = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(mem != MAP_FAILED, "mmap");
	static const unsigned char code[] = { 0xE6, 0x10, 0xEB, 0xFC }; /* out 0x10, al; jmp $-2 */
	memcpy(mem + 0x1000, code, sizeof(code));
	struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0, .memory_size = sz,
						 .userspace_addr = (uint64_t)(uintptr_t)mem };
	CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) == 0, "memslot");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	CHECK(vcpu >= 0, "vcpu");
	struct kvm_run *run = mmap(NULL, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE,
				   MAP_SHARED, vcpu, 0);
	CHECK(run != MAP_FAILED, "mmap run");
	struct kvm_sregs sregs;
	CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0, "sregs");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs) == 0, "sregs");
	struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
	CHECK(ioctl(vcpu, KVM_SET_REGS, &regs) == 0, "regs");
	for (int i = 0; i < 500; i++)
		CHECK(ioctl(vcpu, KVM_RUN, 0) == 0 && run->exit_reason == KVM_EXIT_IO, "warm-up");
	measure("kvm_run_out_exit", direct, vcpu, KVM_RUN, NULL, runs);
	CHECK(run->exit_reason == KVM_EXIT_IO && run->io.port == 0x10, "out exits");
	return 0;
}
