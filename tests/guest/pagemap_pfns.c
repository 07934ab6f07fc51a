/* pagemap_pfns FILE: print the guest page frame numbers that hold FILE's pages, as "first count" runs in hex.
 *
 * For the free page hinting guest test: the guest image has no compiler or scripting language, so the test
 * builds this with gcc on the host side (static, no libc: a few KiB) and copies it in through the agent.
 * It maps FILE shared and read-only, reads every page (a read fault maps the page cache page without writing
 * it), then reads its own /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst: one 64-bit entry per
 * virtual page, bit 63 "present", bits 0-54 the PFN; PFNs need CAP_SYS_ADMIN, which the guest's root has).
 * A page that is not present is printed as "missing N" and the test fails on it.
 */

typedef unsigned long u64;
typedef long i64;

#define SYS_write 1
#define SYS_open 2
#define SYS_lseek 8
#define SYS_mmap 9
#define SYS_pread64 17
#define SYS_exit 60

#define PAGE 4096UL
#define PRESENT (1UL << 63)
#define PFN_MASK ((1UL << 55) - 1)

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    i64 ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static void out(const char *s, u64 len) { sys6(SYS_write, 1, (i64)s, (i64)len, 0, 0, 0); }

static void die(const char *why, u64 len)
{
    sys6(SYS_write, 2, (i64)why, (i64)len, 0, 0, 0);
    sys6(SYS_exit, 1, 0, 0, 0, 0, 0);
}

static char line[64];

static void put_hex_pair(const char *tag, u64 first, u64 count)
{
    u64 n = 0;
    for (const char *t = tag; *t; t++) line[n++] = *t;
    u64 values[2] = {first, count};
    for (int v = 0; v < 2; v++) {
        char digits[16];
        int d = 0;
        u64 x = values[v];
        do { digits[d++] = "0123456789abcdef"[x & 15]; x >>= 4; } while (x);
        while (d) line[n++] = digits[--d];
        line[n++] = v == 0 ? ' ' : '\n';
    }
    out(line, n);
}

static u64 entries[512];

void start_c(i64 *stack)
{
    i64 argc = stack[0];
    char **argv = (char **)(stack + 1);
    if (argc != 2) die("usage: pagemap_pfns FILE\n", 25);
    i64 fd = sys6(SYS_open, (i64)argv[1], 0 /* O_RDONLY */, 0, 0, 0, 0);
    if (fd < 0) die("cannot open the file\n", 21);
    i64 size = sys6(SYS_lseek, fd, 0, 2 /* SEEK_END */, 0, 0, 0);
    if (size <= 0) die("the file is empty\n", 18);
    u64 pages = ((u64)size + PAGE - 1) / PAGE;
    i64 map = sys6(SYS_mmap, 0, (i64)(pages * PAGE), 1 /* PROT_READ */, 1 /* MAP_SHARED */, fd, 0);
    if (map < 0 && map > -4096) die("mmap failed\n", 12);
    volatile const unsigned char *bytes = (volatile const unsigned char *)map;
    u64 sum = 0;
    for (u64 i = 0; i < pages; i++) sum += bytes[i * PAGE];
    (void)sum;
    i64 pm = sys6(SYS_open, (i64)"/proc/self/pagemap", 0, 0, 0, 0, 0);
    if (pm < 0) die("cannot open /proc/self/pagemap\n", 31);
    u64 run_first = 0, run_count = 0, missing = 0;
    for (u64 done = 0; done < pages;) {
        u64 batch = pages - done < 512 ? pages - done : 512;
        u64 offset = ((u64)map / PAGE + done) * 8;
        if (sys6(SYS_pread64, pm, (i64)entries, (i64)(batch * 8), (i64)offset, 0, 0) != (i64)(batch * 8))
            die("short read of /proc/self/pagemap\n", 33);
        for (u64 i = 0; i < batch; i++) {
            u64 entry = entries[i];
            if (!(entry & PRESENT)) { missing++; continue; }
            u64 pfn = entry & PFN_MASK;
            if (pfn == 0) die("pagemap shows PFN 0: not root?\n", 31);
            if (run_count && pfn == run_first + run_count) { run_count++; continue; }
            if (run_count) put_hex_pair("", run_first, run_count);
            run_first = pfn;
            run_count = 1;
        }
        done += batch;
    }
    if (run_count) put_hex_pair("", run_first, run_count);
    if (missing) put_hex_pair("missing ", missing, pages);
    sys6(SYS_exit, 0, 0, 0, 0, 0, 0);
}

__asm__(".global _start\n_start:\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call start_c\n  hlt\n");
