// Keep the big blocks a process frees, and hand them out again: LD_PRELOAD'ed into our
// command-line entry points by resnet_jax/allocator.py.
//
// Why: XLA:CPU mallocs every step's big buffers afresh (one temp buffer of 0.6 GB for a
// ResNet-18 step at batch 32, 2-3 GB for ResNet-50) and frees them at the end of the step.
// glibc serves blocks that big with mmap() and returns them with munmap() (no tunable makes
// a thread arena keep them), so every step the kernel faults in and zeroes all of that
// memory again: 200-2000 ms of system CPU time per step on a 2-core VM
// (experiments/performance.md). Here a freed block of at least THRESHOLD bytes stays
// mapped in a small cache and serves the next request that fits it.
//
// Only malloc, posix_memalign, aligned_alloc, memalign, realloc, reallocarray, free and
// malloc_usable_size are interposed; everything below THRESHOLD, calloc (glibc's fresh
// mmap is already zero) and valloc/pvalloc go to glibc untouched. (glibc's getline and
// getdelim grow a caller's buffer with glibc's own realloc: handing them a block of ours,
// >= 8 MiB, would break. Nothing in our processes does.) A block of ours carries a
// header just below the pointer: its mapping, and two words that mark it as ours. The word
// directly below is glibc's chunk-size field for glibc's blocks; ours holds a value glibc
// never writes there (IS_MMAPPED together with NON_MAIN_ARENA), and the word below that is a
// cookie xor the pointer. So free() tells the two apart from memory it reads anyway.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE_PAGE ((size_t)2 << 20)
#define SLOTS 256
#define OUR_SIZE_WORD 0x52534e4a52534e06ull   // low bits 110: IS_MMAPPED | NON_MAIN_ARENA
#define COOKIE 0x9e3779b97f4a7c15ull

typedef struct {          // sits at ptr - sizeof(header)
  void *base;             // the mapping: base .. base + length
  size_t length;
  uint64_t cookie;        // COOKIE ^ ptr
  uint64_t size_word;     // OUR_SIZE_WORD, where glibc keeps its chunk size
} header;

static void *(*real_malloc)(size_t);
static void (*real_free)(void *);
static void *(*real_realloc)(void *, size_t);
static void *(*real_memalign)(size_t, size_t);
static size_t (*real_usable_size)(void *);

static size_t threshold = (size_t)8 << 20;   // RESNET_JAX_BUFFER_REUSE_MIN_MIB
static size_t cache_limit;                  // RESNET_JAX_BUFFER_REUSE_MAX_MIB
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct { void *base; size_t length; } cache[SLOTS];   // freed, still mapped
static int cached;
static size_t cached_bytes;
static int ready;

// dlsym may allocate while it resolves the real functions: serve that from here.
static char bootstrap[4096] __attribute__((aligned(64)));
static size_t bootstrap_used;

static size_t env_mib(const char *name, size_t fallback) {
  const char *v = getenv(name);
  if (!v || !*v) return fallback;
  char *end;
  unsigned long long mib = strtoull(v, &end, 10);
  return *end ? fallback : (size_t)mib << 20;
}

static void unlock_after_fork(void) { pthread_mutex_init(&lock, NULL); }
static void take_lock(void) { pthread_mutex_lock(&lock); }
static void release_lock(void) { pthread_mutex_unlock(&lock); }

static void init(void) {
  static int resolving;
  if (ready || resolving) return;
  resolving = 1;
  real_malloc = dlsym(RTLD_NEXT, "malloc");
  real_free = dlsym(RTLD_NEXT, "free");
  real_realloc = dlsym(RTLD_NEXT, "realloc");
  real_memalign = dlsym(RTLD_NEXT, "memalign");
  real_usable_size = dlsym(RTLD_NEXT, "malloc_usable_size");
  threshold = env_mib("RESNET_JAX_BUFFER_REUSE_MIN_MIB", threshold);
  if (threshold < HUGE_PAGE) threshold = HUGE_PAGE;
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  size_t quarter = pages > 0 && page > 0 ? (size_t)pages * (size_t)page / 4 : (size_t)4 << 30;
  cache_limit = env_mib("RESNET_JAX_BUFFER_REUSE_MAX_MIB", quarter);
  ready = 1;     // before pthread_atfork, which allocates
  pthread_atfork(take_lock, release_lock, unlock_after_fork);
}

__attribute__((constructor)) static void init_at_load(void) { init(); }

static int from_bootstrap(void *p) {
  return (char *)p >= bootstrap && (char *)p < bootstrap + sizeof bootstrap;
}

static void *bootstrap_alloc(size_t n) {
  size_t at = (bootstrap_used + 63) & ~(size_t)63;
  if (at + n > sizeof bootstrap) return NULL;
  bootstrap_used = at + n;
  return bootstrap + at;
}

// Reads the two words below p first: for glibc's blocks they are its chunk header (always
// mapped); only a block that passes both checks is read further down.
static header *ours(void *p) {
  if (!p || from_bootstrap(p)) return NULL;
  header *h = (header *)p - 1;
  return h->size_word == OUR_SIZE_WORD && h->cookie == (COOKIE ^ (uintptr_t)p) ? h : NULL;
}

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// A mapping of at least `length` bytes, huge-page aligned so the kernel can back it with
// transparent huge pages: a cached one that fits (best fit, at most 25% + 4 MiB larger; of
// equals the one freed last, whose pages are most likely still in the caches), or a new one.
// The cache is kept oldest first.
static void *take_mapping(size_t length, size_t *got) {
  pthread_mutex_lock(&lock);
  int best = -1;
  for (int i = 0; i < cached; i++) {
    size_t l = cache[i].length;
    if (l >= length && l <= length + length / 4 + ((size_t)4 << 20) &&
        (best < 0 || l <= cache[best].length))
      best = i;
  }
  if (best >= 0) {
    void *base = cache[best].base;
    *got = cache[best].length;
    cached_bytes -= *got;
    memmove(cache + best, cache + best + 1, (--cached - best) * sizeof cache[0]);
    pthread_mutex_unlock(&lock);
    return base;
  }
  pthread_mutex_unlock(&lock);
  size_t mapped = round_up(length, HUGE_PAGE) + HUGE_PAGE;
  char *raw = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char *base = (char *)round_up((uintptr_t)raw, HUGE_PAGE);
  size_t head = base - raw, kept = round_up(length, HUGE_PAGE);
  if (head) munmap(raw, head);
  if (mapped - head - kept) munmap(base + kept, mapped - head - kept);
  madvise(base, kept, MADV_HUGEPAGE);
  *got = kept;
  return base;
}

// Cache a freed mapping; beyond the cache's limits, unmap the oldest ones first.
static void give_back(void *base, size_t length) {
  void *drop[SLOTS + 1];
  size_t drop_length[SLOTS + 1];
  int dropped = 0;
  pthread_mutex_lock(&lock);
  if (length > cache_limit) {
    drop[dropped] = base, drop_length[dropped++] = length;
  } else {
    while (cached > 0 && (cached == SLOTS || cached_bytes + length > cache_limit)) {
      drop[dropped] = cache[0].base, drop_length[dropped++] = cache[0].length;
      cached_bytes -= cache[0].length;
      memmove(cache, cache + 1, --cached * sizeof cache[0]);
    }
    cache[cached].base = base, cache[cached++].length = length;
    cached_bytes += length;
  }
  pthread_mutex_unlock(&lock);
  for (int i = 0; i < dropped; i++) munmap(drop[i], drop_length[i]);
}

static void *big_alloc(size_t size, size_t align) {
  if (align < 64) align = 64;
  if (align > HUGE_PAGE || size > SIZE_MAX / 2) return NULL;
  size_t offset = round_up(sizeof(header), align), length;
  char *base = take_mapping(offset + size, &length);
  if (!base) return NULL;
  char *p = base + offset;
  header *h = (header *)p - 1;
  h->base = base, h->length = length, h->cookie = COOKIE ^ (uintptr_t)p;
  h->size_word = OUR_SIZE_WORD;
  return p;
}

static size_t capacity(header *h, void *p) { return (char *)h->base + h->length - (char *)p; }

void *malloc(size_t size) {
  if (!ready) {
    init();
    if (!ready) return bootstrap_alloc(size);
  }
  if (size >= threshold) {
    void *p = big_alloc(size, 64);
    if (p) return p;
  }
  return real_malloc(size);
}

void free(void *p) {
  if (!p || from_bootstrap(p)) return;
  header *h = ours(p);
  if (h) {
    void *base = h->base;
    size_t length = h->length;
    h->size_word = 0;    // a stale pointer to this block is no longer ours
    give_back(base, length);
    return;
  }
  if (!ready) init();
  if (real_free) real_free(p);   // (not yet resolved: only while dlsym runs; leak it)
}

void *memalign(size_t align, size_t size) {
  if (!ready) init();
  if (size >= threshold && align && !(align & (align - 1))) {
    void *p = big_alloc(size, align);
    if (p) return p;
  }
  return real_memalign(align, size);
}

void *aligned_alloc(size_t align, size_t size) { return memalign(align, size); }

int posix_memalign(void **out, size_t align, size_t size) {
  if (!align || (align & (align - 1)) || align % sizeof(void *)) return EINVAL;
  void *p = memalign(align, size);
  if (!p && size) return ENOMEM;
  *out = p;
  return 0;
}

void *realloc(void *p, size_t size) {
  if (!ready) init();
  if (!p) return malloc(size);
  header *h = ours(p);
  if (!h) {
    if (from_bootstrap(p)) {   // never freed, only moved out
      void *q = malloc(size);
      if (q) memcpy(q, p, size < sizeof bootstrap ? size : sizeof bootstrap);
      return q;
    }
    return real_realloc(p, size);
  }
  size_t have = capacity(h, p);
  if (size <= have && size >= threshold) return p;
  void *q = malloc(size);
  if (!q) return NULL;
  memcpy(q, p, size < have ? size : have);
  free(p);
  return q;
}

void *reallocarray(void *p, size_t count, size_t size) {   // glibc's would not call ours
  if (size && count > SIZE_MAX / size) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, count * size);
}

size_t malloc_usable_size(void *p) {
  if (!ready) init();
  header *h = ours(p);
  if (h) return capacity(h, p);
  if (from_bootstrap(p)) return 0;
  return p ? real_usable_size(p) : 0;
}
