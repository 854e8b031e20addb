/*
 * mpkv._native: the few operations on shared memory that Python cannot order correctly by itself.
 *
 * Python's loads and stores to an mmap are plain byte copies: on x86-64 they happen to be ordered as written
 * (TSO), on aarch64 they are not. Everything here uses C11 atomics, so the orderings below hold on both.
 *
 *  - word operations on any writable buffer: load/store (acquire/release), compare-and-swap, full fence;
 *  - seqlock records: a multi-word record written by one writer and read consistently by many readers;
 *  - futex wait/wake on a 32-bit word of a MAP_SHARED mapping (process-shared, no OS name to leak);
 *  - eventcount waits: spin briefly, then announce "I sleep" (a flag word the waiter owns), full fence,
 *    re-check, sleep on the futex. The notifier stores, full fences, and wakes only when a flag is set.
 *    This is the store-fence-load pattern on both sides, so at least one side sees the other's store and
 *    no wake-up is ever lost; FUTEX_WAIT also re-compares the word in the kernel.
 *  - the ring's hot path (class Ring): see NOTE [ ring layout ] in mpkv/layout.py for the byte map.
 *
 * Every function that may block releases the GIL. Nothing here allocates OS names.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <sched.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() ((void)0)
#endif

typedef _Atomic uint64_t au64;
typedef _Atomic uint32_t au32;

/* ------------------------------------------------------------------------------------------------ */
/* time and futex                                                                                    */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* One step of a spin: a CPU pause for the first microseconds, then sched_yield, so a peer that shares our core
 * (7+ processes on 2 cores) gets to run instead of waiting for our spin to end. */
static inline void spin_step(uint64_t t, uint64_t t0) {
    if (t - t0 < 2000) CPU_RELAX();
    else sched_yield();
}

/* Returns 0 when woken (or spuriously), 1 on timeout, 2 when the word no longer held `expected`. */
static int futex_wait_ns(au32 *addr, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000ull),
                          .tv_nsec = (long)(timeout_ns % 1000000000ull)};
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc == 0) return 0;
    if (errno == ETIMEDOUT) return 1;
    if (errno == EAGAIN) return 2;
    return 0; /* EINTR: treat as a wake-up; callers re-check their predicate */
}

static inline void futex_wake_all(au32 *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* The futex word of a 64-bit counter is its low half (little-endian; checked by mpkv.layout at import). */
static inline au32 *low_half(au64 *word) { return (au32 *)word; }

/* ------------------------------------------------------------------------------------------------ */
/* buffer access                                                                                     */

/* Loads accept read-only buffers (mpkv-top maps segments PROT_READ); everything that may write needs a writable one. */
static int get_word_flags(PyObject *obj, Py_ssize_t off, Py_ssize_t width, Py_buffer *view, void **out, int flags) {
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    if (off < 0 || off % width != 0 || off + width > view->len) {
        PyErr_Format(PyExc_ValueError, "offset %zd is out of range or not %zd-byte aligned (buffer of %zd bytes)",
                     off, width, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    *out = (char *)view->buf + off;
    return 0;
}

static int get_word(PyObject *obj, Py_ssize_t off, Py_ssize_t width, Py_buffer *view, void **out) {
    return get_word_flags(obj, off, width, view, out, PyBUF_WRITABLE);
}

static int get_word_ro(PyObject *obj, Py_ssize_t off, Py_ssize_t width, Py_buffer *view, void **out) {
    return get_word_flags(obj, off, width, view, out, PyBUF_SIMPLE);
}

static PyObject *py_load_u64(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "On", &obj, &off) || get_word_ro(obj, off, 8, &v, &p) < 0) return NULL;
    uint64_t x = atomic_load_explicit((au64 *)p, memory_order_acquire);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(x);
}

static PyObject *py_store_u64(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off; unsigned long long x; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnK", &obj, &off, &x) || get_word(obj, off, 8, &v, &p) < 0) return NULL;
    atomic_store_explicit((au64 *)p, (uint64_t)x, memory_order_release);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_load_u32(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "On", &obj, &off) || get_word_ro(obj, off, 4, &v, &p) < 0) return NULL;
    uint32_t x = atomic_load_explicit((au32 *)p, memory_order_acquire);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(x);
}

static PyObject *py_store_u32(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off; unsigned int x; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnI", &obj, &off, &x) || get_word(obj, off, 4, &v, &p) < 0) return NULL;
    atomic_store_explicit((au32 *)p, (uint32_t)x, memory_order_release);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_cas_u64(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off; unsigned long long expected, desired; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnKK", &obj, &off, &expected, &desired) || get_word(obj, off, 8, &v, &p) < 0)
        return NULL;
    uint64_t e = expected;
    int ok = atomic_compare_exchange_strong_explicit((au64 *)p, &e, (uint64_t)desired, memory_order_acq_rel,
                                                     memory_order_acquire);
    PyBuffer_Release(&v);
    return Py_BuildValue("(OK)", ok ? Py_True : Py_False, (unsigned long long)e);
}

static PyObject *py_fence(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------ */
/* seqlock records: word 0 is the sequence (odd while a write is in progress), words 1..n the payload */

static PyObject *py_seq_write(PyObject *self, PyObject *args) {
    PyObject *obj, *values; Py_ssize_t off; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnO!", &obj, &off, &PyTuple_Type, &values)) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    uint64_t tmp[16];
    if (n > 16) { PyErr_SetString(PyExc_ValueError, "a seqlock record holds at most 16 words"); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) {
        tmp[i] = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(values, i));
        if (PyErr_Occurred()) return NULL;
    }
    if (get_word(obj, off, 8, &v, &p) < 0) return NULL;
    if (off + 8 * (n + 1) > v.len) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "seqlock record runs past the end of the buffer");
        return NULL;
    }
    au64 *w = (au64 *)p;
    uint64_t seq = atomic_load_explicit(&w[0], memory_order_relaxed);
    /* An odd sequence here means the slot's previous writer died between its two stores (its new claimant is
     * the only one that may call us then: NOTE [ torn signal slot ] in mpkv/layout.py). Readers already wait,
     * so we write our whole record over the torn one and make the sequence even once: that is the repair. */
    if (!(seq & 1)) {
        atomic_store_explicit(&w[0], ++seq, memory_order_relaxed);
        atomic_thread_fence(memory_order_release);
    }
    for (Py_ssize_t i = 0; i < n; i++) atomic_store_explicit(&w[i + 1], tmp[i], memory_order_relaxed);
    atomic_store_explicit(&w[0], seq + 1, memory_order_release);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_seq_read(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off, n; Py_buffer v; void *p; double timeout_s = 1.0;
    (void)self;
    if (!PyArg_ParseTuple(args, "Onn|d", &obj, &off, &n, &timeout_s)) return NULL;
    if (n < 0 || n > 16) { PyErr_SetString(PyExc_ValueError, "a seqlock record holds at most 16 words"); return NULL; }
    if (!(timeout_s >= 0)) { PyErr_SetString(PyExc_ValueError, "seq_read needs a timeout >= 0 s"); return NULL; }
    if (get_word_ro(obj, off, 8, &v, &p) < 0) return NULL;
    if (off + 8 * (n + 1) > v.len) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "seqlock record runs past the end of the buffer");
        return NULL;
    }
    au64 *w = (au64 *)p;
    uint64_t tmp[16], s1, s2;
    int stuck = 0, done = 0;
    /* Fast path, GIL held: no writer in the way. */
    s1 = atomic_load_explicit(&w[0], memory_order_acquire);
    if (!(s1 & 1)) {
        for (Py_ssize_t i = 0; i < n; i++) tmp[i] = atomic_load_explicit(&w[i + 1], memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        s2 = atomic_load_explicit(&w[0], memory_order_relaxed);
        done = s1 == s2;
    }
    /* A writer writes a record in well under a microsecond; one that stays mid-write for timeout_s (1 s unless
     * asked: mpkv.shm.signals asks for a few ms and then looks at the writer) was killed or stopped there. Give
     * up then (with the GIL released while yielding), instead of spinning forever. */
    if (!done) {
    Py_BEGIN_ALLOW_THREADS
    uint64_t t0 = now_ns(), spins = 0, limit = (uint64_t)(timeout_s * 1e9);
    for (;;) {
        s1 = atomic_load_explicit(&w[0], memory_order_acquire);
        if (!(s1 & 1)) {
            for (Py_ssize_t i = 0; i < n; i++) tmp[i] = atomic_load_explicit(&w[i + 1], memory_order_relaxed);
            atomic_thread_fence(memory_order_acquire);
            s2 = atomic_load_explicit(&w[0], memory_order_relaxed);
            if (s1 == s2) break;
        }
        if (++spins < 64) { CPU_RELAX(); continue; }
        if (now_ns() - t0 > limit) { stuck = 1; break; }
        sched_yield();
    }
    Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&v);
    if (stuck) {
        PyErr_Format(PyExc_TimeoutError, "seqlock record stuck mid-write for %g s (sequence %llu): its writer (pid "
                     "%llu as last recorded) died or was stopped while writing it", timeout_s, (unsigned long long)s1,
                     (unsigned long long)atomic_load_explicit(&w[n >= 3 ? 3 : 0], memory_order_relaxed));
        return NULL;
    }
    PyObject *out = PyTuple_New(n + 1);
    if (!out) return NULL;
    PyTuple_SET_ITEM(out, 0, PyLong_FromUnsignedLongLong(s1));
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(out, i + 1, PyLong_FromUnsignedLongLong(tmp[i]));
    return out;
}

/* ------------------------------------------------------------------------------------------------ */
/* eventcount on one 64-bit word                                                                     */

/* wait_word_change(buf, word_off, old, flag_off, spin_s, timeout_s) -> current value of the word.
 * Returns as soon as the word differs from `old`, or after timeout_s with the (unchanged) value.
 * The flag (u32 at flag_off) must be written by nobody but this waiter; flag_off -1 means the word's writer
 * wakes unconditionally after every store (futex_wake), so no flag is needed. */
static PyObject *py_wait_word_change(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off, flag_off; unsigned long long old; double spin_s, timeout_s;
    Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnKndd", &obj, &off, &old, &flag_off, &spin_s, &timeout_s)) return NULL;
    if (get_word(obj, off, 8, &v, &p) < 0) return NULL;
    if (flag_off < -1 || (flag_off >= 0 && (flag_off % 4 || flag_off + 4 > v.len))) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "flag offset out of range or misaligned");
        return NULL;
    }
    au64 *word = (au64 *)p;
    au32 *flag = flag_off >= 0 ? (au32 *)((char *)v.buf + flag_off) : NULL;
    uint64_t cur;
    Py_BEGIN_ALLOW_THREADS
    uint64_t t0 = now_ns();
    uint64_t spin_end = t0 + (uint64_t)(spin_s * 1e9), deadline = t0 + (uint64_t)(timeout_s * 1e9);
    for (;;) {
        cur = atomic_load_explicit(word, memory_order_acquire);
        if (cur != old) break;
        uint64_t t = now_ns();
        if (t >= deadline) break;
        if (t < spin_end) { spin_step(t, t0); continue; }
        if (flag) atomic_store_explicit(flag, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        cur = atomic_load_explicit(word, memory_order_acquire);
        if (cur == old) futex_wait_ns(low_half(word), (uint32_t)old, deadline - t);
        if (flag) atomic_store_explicit(flag, 0, memory_order_relaxed);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(cur);
}

/* store_notify(buf, word_off, value, flag_off, flag_stride, nflags): store-release the word, full fence,
 * and wake the word's waiters if any of the nflags flags (u32, flag_stride bytes apart) is set. */
static PyObject *py_store_notify(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off, flag_off, stride, nflags; unsigned long long x; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnKnnn", &obj, &off, &x, &flag_off, &stride, &nflags)) return NULL;
    if (get_word(obj, off, 8, &v, &p) < 0) return NULL;
    if (nflags < 0 || flag_off < 0 || flag_off % 4 || stride % 4 ||
        (nflags > 0 && flag_off + stride * (nflags - 1) + 4 > v.len)) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "flag range out of bounds or misaligned");
        return NULL;
    }
    au64 *word = (au64 *)p;
    atomic_store_explicit(word, (uint64_t)x, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    for (Py_ssize_t i = 0; i < nflags; i++) {
        au32 *flag = (au32 *)((char *)v.buf + flag_off + i * stride);
        if (atomic_load_explicit(flag, memory_order_relaxed)) { futex_wake_all(low_half(word)); break; }
    }
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_futex_wake(PyObject *self, PyObject *args) {
    PyObject *obj; Py_ssize_t off; Py_buffer v; void *p;
    (void)self;
    if (!PyArg_ParseTuple(args, "On", &obj, &off) || get_word(obj, off, 8, &v, &p) < 0) return NULL;
    futex_wake_all(low_half((au64 *)p));
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* wait_any([(buf, off, expected_u32), ...], timeout_s) -> index of the word that woke us, -1 on timeout,
 * -2 when a word no longer held its expected value on entry, 0 after a signal (EINTR: callers re-check anyway).
 * One sleep on up to 32 futex words at once (futex_waitv, Linux >= 5.16): an actor sleeps on its command word,
 * its task ring and its peers' status words together.
 *
 * NOTE [ futex_waitv refused ]
 * A kernel older than 5.16 answers ENOSYS; a container's seccomp profile may answer EPERM (or anything else it
 * was told to); an old kernel without FUTEX2_SIZE_U32 answers EINVAL. Every answer other than the three that
 * futex_waitv gives about the words themselves (ETIMEDOUT, EAGAIN, EINTR) means "this process may not use it",
 * and it will not change: the first such refusal switches this process, once and for all, to the fallback
 * (remembered in waitv_refused, so later calls do not even try). The fallback must sleep, never spin: it sleeps
 * on the futex of the first word (callers put their most urgent word first: the command word) for at most
 * FALLBACK_POLL_NS at a time and checks every word between sleeps, until one changed or the timeout passed.
 * A change of another word is thus seen within FALLBACK_POLL_NS; the CPU cost is one wake-up per poll. Before
 * this, only ENOSYS fell back and EPERM returned at once: every caller's loop spun at 100 % of a core. */
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
struct mpkv_futex_waitv { uint64_t val; uint64_t uaddr; uint32_t flags; uint32_t reserved; };

#define FALLBACK_POLL_NS 1000000ull
static _Atomic int waitv_refused = 0; /* errno of the refusal that switched this process to the fallback */

/* The fallback of wait_any: the same results, by polling every FALLBACK_POLL_NS while asleep on word 0. */
static long wait_any_polling(struct mpkv_futex_waitv *w, Py_ssize_t n, uint64_t deadline, int first) {
    for (;;) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (atomic_load_explicit((au32 *)(uintptr_t)w[i].uaddr, memory_order_acquire) != (uint32_t)w[i].val)
                return first ? -2 : (long)i;
        first = 0;
        uint64_t t = now_ns();
        if (t >= deadline) return -1;
        uint64_t nap = deadline - t < FALLBACK_POLL_NS ? deadline - t : FALLBACK_POLL_NS;
        futex_wait_ns((au32 *)(uintptr_t)w[0].uaddr, (uint32_t)w[0].val, nap);
    }
}

static PyObject *py_wait_any(PyObject *self, PyObject *args) {
    PyObject *list; double timeout_s;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!d", &PyList_Type, &list, &timeout_s)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n < 1 || n > 32) { PyErr_SetString(PyExc_ValueError, "wait_any takes 1 to 32 words"); return NULL; }
    if (!(timeout_s >= 0)) { PyErr_SetString(PyExc_ValueError, "wait_any needs a timeout >= 0 s"); return NULL; }
    struct mpkv_futex_waitv w[32];
    Py_buffer views[32];
    Py_ssize_t got = 0;
    for (; got < n; got++) {
        PyObject *obj; Py_ssize_t off; unsigned int expected; void *p;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, got), "OnI", &obj, &off, &expected)) goto fail;
        if (get_word(obj, off, 4, &views[got], &p) < 0) goto fail;
        w[got].val = expected; w[got].uaddr = (uint64_t)(uintptr_t)p; w[got].flags = 2 /* FUTEX2_SIZE_U32 */;
        w[got].reserved = 0;
    }
    long rc = -1;
    Py_BEGIN_ALLOW_THREADS
    uint64_t deadline = now_ns() + (uint64_t)(timeout_s * 1e9);
    int fallback = atomic_load_explicit(&waitv_refused, memory_order_relaxed) != 0;
    if (!fallback) {
        struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000ull),
                              .tv_nsec = (long)(deadline % 1000000000ull)};
        rc = syscall(SYS_futex_waitv, w, (unsigned)n, 0, &ts, CLOCK_MONOTONIC);
        if (rc < 0) {
            int err = errno;
            if (err == ETIMEDOUT) rc = -1;
            else if (err == EAGAIN) rc = -2;
            else if (err == EINTR) rc = 0;
            else { /* refused: NOTE [ futex_waitv refused ] */
                atomic_store_explicit(&waitv_refused, err ? err : EINVAL, memory_order_relaxed);
                fallback = 1;
            }
        }
    }
    if (fallback) rc = wait_any_polling(w, n, deadline, 1);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) PyBuffer_Release(&views[i]);
    return PyLong_FromLong(rc);
fail:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    return NULL;
}

/* wait_any_refused() -> the errno with which futex_waitv was refused in this process (0: it was not; wait_any
 * then uses its polling fallback: NOTE [ futex_waitv refused ]). For diagnostics and tests. */
static PyObject *py_wait_any_refused(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyLong_FromLong(atomic_load_explicit(&waitv_refused, memory_order_relaxed));
}

#if defined(__x86_64__)
#include <emmintrin.h>
/* Copy with non-temporal stores: the destination of a swap is not read again soon, so writing around the
 * cache saves the read-for-ownership of every destination line (what glibc's memcpy does for large copies). */
static void copy_stream(char *dst, const char *src, size_t n) {
    if (((uintptr_t)dst | (uintptr_t)src) & 15 || n < 512) { memcpy(dst, src, n); return; }
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_load_si128((const __m128i *)(src + i));
        __m128i b = _mm_load_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_load_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_load_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    if (i < n) memcpy(dst + i, src + i, n - i);
}
#define COPY_FENCE() _mm_sfence()
#else
#define copy_stream memcpy
#define COPY_FENCE() atomic_thread_fence(memory_order_release)
#endif

/* copy_blocks(dst_addr, dst_blocks, src_addr, src_blocks, planes, block_bytes, dst_ids, src_ids):
 * the swap copy of the cpu backend. Both pools are [planes][blocks][block_bytes] (planes = layers x K/V);
 * block src_ids[i] of every plane goes to block dst_ids[i]. One memcpy per (plane, block), GIL released.
 * Addresses come from torch's data_ptr() of live tensors; ids are int64 buffers, checked against the bounds. */
static PyObject *py_copy_blocks(PyObject *self, PyObject *args) {
    unsigned long long dst_addr, src_addr; Py_ssize_t dst_blocks, src_blocks, planes, bb;
    PyObject *dst_obj, *src_obj; Py_buffer d, s;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnKnnnOO", &dst_addr, &dst_blocks, &src_addr, &src_blocks, &planes, &bb,
                          &dst_obj, &src_obj))
        return NULL;
    if (PyObject_GetBuffer(dst_obj, &d, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(src_obj, &s, PyBUF_C_CONTIGUOUS) < 0) { PyBuffer_Release(&d); return NULL; }
    Py_ssize_t n = d.len / 8;
    const int64_t *di = d.buf, *si = s.buf;
    int bad = d.len != s.len || d.len % 8 || planes < 0 || bb < 0;
    for (Py_ssize_t i = 0; !bad && i < n; i++)
        bad = di[i] < 0 || di[i] >= dst_blocks || si[i] < 0 || si[i] >= src_blocks;
    if (bad) {
        PyBuffer_Release(&d); PyBuffer_Release(&s);
        PyErr_SetString(PyExc_ValueError, "copy_blocks: id lists differ in length or hold an id out of range");
        return NULL;
    }
    char *dst = (char *)(uintptr_t)dst_addr;
    const char *src = (const char *)(uintptr_t)src_addr;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t p = 0; p < planes; p++) {
        char *dp = dst + (size_t)p * (size_t)dst_blocks * (size_t)bb;
        const char *sp = src + (size_t)p * (size_t)src_blocks * (size_t)bb;
        for (Py_ssize_t i = 0; i < n; i++)
            copy_stream(dp + (size_t)di[i] * (size_t)bb, sp + (size_t)si[i] * (size_t)bb, (size_t)bb);
    }
    COPY_FENCE(); /* streamed stores are ordered before the completion that follows */
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&d); PyBuffer_Release(&s);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------ */
/* Ring: the hot path of mpkv.shm.ring. Byte map: NOTE [ ring layout ] in mpkv/layout.py.            */

#define LINE 64
#define FRAME_HDR 8
#define WRAP_MARK 0xFFFFFFFFu
/* offsets inside an endpoint's meta line */
#define META_SLEEPING 4
#define META_WAITING_ON 36

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    char *base;        /* ring header */
    char *data;        /* data region */
    uint64_t cap, mask;
    uint32_t nreaders, max_payload;
    int endpoint;      /* -1 writer, else reader index */
    uint64_t pos;      /* this endpoint's own position (mirrors the shared word it alone writes) */
    uint64_t seen;     /* writer: last min reader position seen; reader: last writer position seen */
    PyObject *too_large; /* exception type for oversized messages */
    PyObject *bad_record; /* exception type for a record of the wrong size */
} Ring;

static inline au64 *w_pos(Ring *r) { return (au64 *)(r->base + 1 * LINE); }
static inline char *w_meta(Ring *r) { return r->base + 2 * LINE; }
static inline au64 *r_pos(Ring *r, uint32_t i) { return (au64 *)(r->base + (3 + 2 * i) * LINE); }
static inline char *r_meta(Ring *r, uint32_t i) { return r->base + (4 + 2 * i) * LINE; }
static inline au32 *meta_u32(char *meta, int off) { return (au32 *)(meta + off); }
static inline uint64_t frame_bytes(uint64_t len) { return FRAME_HDR + ((len + 7) & ~7ull); }

static uint64_t min_reader_pos(Ring *r, uint32_t *slowest) {
    uint64_t m = UINT64_MAX;
    for (uint32_t i = 0; i < r->nreaders; i++) {
        uint64_t p = atomic_load_explicit(r_pos(r, i), memory_order_acquire);
        if (p < m) { m = p; if (slowest) *slowest = i; }
    }
    return m;
}

/* Bytes the writer needs free to place a frame of `need` bytes at its position (a wrap skips the tail). */
static inline uint64_t space_needed(Ring *r, uint64_t need) {
    uint64_t tail = r->cap - (r->pos & r->mask);
    return tail < need ? tail + need : need;
}

static inline int has_space(Ring *r, uint64_t need) {
    uint64_t want = space_needed(r, need);
    if (r->cap - (r->pos - r->seen) >= want) return 1;
    r->seen = min_reader_pos(r, NULL);
    return r->cap - (r->pos - r->seen) >= want;
}

static inline void put_frame(Ring *r, const char *src, uint32_t len) {
    uint64_t need = frame_bytes(len), idx = r->pos & r->mask, tail = r->cap - idx;
    if (tail < need) {
        *(uint32_t *)(r->data + idx) = WRAP_MARK;
        r->pos += tail;
        idx = 0;
    }
    *(uint32_t *)(r->data + idx) = len;
    *(uint32_t *)(r->data + idx + 4) = 0;
    memcpy(r->data + idx + FRAME_HDR, src, len);
    r->pos += need;
}

static inline void publish_writer(Ring *r) {
    atomic_store_explicit(w_pos(r), r->pos, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    for (uint32_t i = 0; i < r->nreaders; i++) {
        if (atomic_load_explicit(meta_u32(r_meta(r, i), META_SLEEPING), memory_order_relaxed)) {
            futex_wake_all(low_half(w_pos(r)));
            break;
        }
    }
}

static inline int readable(Ring *r) {
    if (r->pos != r->seen) return 1;
    r->seen = atomic_load_explicit(w_pos(r), memory_order_acquire);
    return r->pos != r->seen;
}

/* Returns a pointer to the payload of the next frame and its length; the caller consumes with take_frame. */
static inline char *peek_frame(Ring *r, uint32_t *len) {
    uint64_t idx = r->pos & r->mask;
    uint32_t n = *(uint32_t *)(r->data + idx);
    if (n == WRAP_MARK) {
        r->pos += r->cap - idx;
        idx = 0;
        n = *(uint32_t *)(r->data + idx);
    }
    *len = n;
    return r->data + idx + FRAME_HDR;
}

static inline void publish_reader(Ring *r) {
    au64 *mine = r_pos(r, (uint32_t)r->endpoint);
    atomic_store_explicit(mine, r->pos, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    char *wm = w_meta(r);
    if (atomic_load_explicit(meta_u32(wm, META_SLEEPING), memory_order_relaxed) &&
        (int32_t)atomic_load_explicit(meta_u32(wm, META_WAITING_ON), memory_order_relaxed) == r->endpoint)
        futex_wake_all(low_half(mine));
}

static int ring_check_role(Ring *r, int want_writer) {
    if (want_writer && r->endpoint != -1) {
        PyErr_SetString(PyExc_RuntimeError, "this ring port is a reader; only the writer may put");
        return -1;
    }
    if (!want_writer && r->endpoint == -1) {
        PyErr_SetString(PyExc_RuntimeError, "this ring port is the writer; only readers may get");
        return -1;
    }
    if (!r->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "ring port is closed");
        return -1;
    }
    return 0;
}

static int too_large(Ring *r, Py_ssize_t len) {
    PyErr_Format(r->too_large, "message of %zd bytes exceeds this ring's limit of %u bytes", len, r->max_payload);
    return -1;
}

static PyObject *Ring_try_put(Ring *r, PyObject *arg) {
    Py_buffer b;
    if (ring_check_role(r, 1) < 0) return NULL;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    if (b.len > r->max_payload) { too_large(r, b.len); PyBuffer_Release(&b); return NULL; }
    int ok = has_space(r, frame_bytes((uint64_t)b.len));
    if (ok) {
        put_frame(r, b.buf, (uint32_t)b.len);
        publish_writer(r);
    }
    PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

/* try_put_many(sequence of buffers, start) -> number of items written from `start` on (0 when full). */
static PyObject *Ring_try_put_many(Ring *r, PyObject *args) {
    PyObject *seq; Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "On", &seq, &start)) return NULL;
    if (ring_check_role(r, 1) < 0) return NULL;
    if (start < 0) { PyErr_SetString(PyExc_ValueError, "start must be >= 0"); return NULL; }
    PyObject *fast = PySequence_Fast(seq, "put_many needs a sequence of bytes-like objects");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), done = 0;
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = start; i < n; i++) {
        Py_buffer b;
        if (PyObject_GetBuffer(items[i], &b, PyBUF_SIMPLE) < 0) goto fail;
        if (b.len > r->max_payload) { too_large(r, b.len); PyBuffer_Release(&b); goto fail; }
        if (!has_space(r, frame_bytes((uint64_t)b.len))) { PyBuffer_Release(&b); break; }
        put_frame(r, b.buf, (uint32_t)b.len);
        PyBuffer_Release(&b);
        done++;
    }
    if (done) publish_writer(r);
    Py_DECREF(fast);
    return PyLong_FromSsize_t(done);
fail:
    if (done) publish_writer(r); /* what was written before the bad item stays written, in order */
    Py_DECREF(fast);
    return NULL;
}

/* try_put_records(buffer, record_bytes) -> number of records written (each record is one message). */
static PyObject *Ring_try_put_records(Ring *r, PyObject *args) {
    PyObject *obj; Py_ssize_t rec, start; Py_buffer b;
    if (!PyArg_ParseTuple(args, "Onn", &obj, &rec, &start)) return NULL;
    if (ring_check_role(r, 1) < 0) return NULL;
    if (start < 0) { PyErr_SetString(PyExc_ValueError, "start must be >= 0"); return NULL; }
    if (PyObject_GetBuffer(obj, &b, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (rec <= 0 || b.len % rec) {
        PyBuffer_Release(&b);
        PyErr_Format(PyExc_ValueError, "records buffer of %zd bytes is not a whole number of %zd-byte records",
                     b.len, rec);
        return NULL;
    }
    if (rec > r->max_payload) { too_large(r, rec); PyBuffer_Release(&b); return NULL; }
    Py_ssize_t n = b.len / rec, done = 0;
    uint64_t need = frame_bytes((uint64_t)rec);
    for (Py_ssize_t i = start; i < n && has_space(r, need); i++, done++)
        put_frame(r, (char *)b.buf + i * rec, (uint32_t)rec);
    if (done) publish_writer(r);
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(done);
}

static PyObject *Ring_try_get(Ring *r, PyObject *noargs) {
    (void)noargs;
    if (ring_check_role(r, 0) < 0) return NULL;
    if (!readable(r)) Py_RETURN_NONE;
    uint32_t len;
    char *src = peek_frame(r, &len);
    PyObject *out = PyBytes_FromStringAndSize(src, len);
    if (!out) return NULL;
    r->pos += frame_bytes(len);
    publish_reader(r);
    return out;
}

static PyObject *Ring_try_get_many(Ring *r, PyObject *arg) {
    Py_ssize_t max_n = PyLong_AsSsize_t(arg);
    if (max_n < 0 && PyErr_Occurred()) return NULL;
    if (ring_check_role(r, 0) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    Py_ssize_t got = 0;
    while (got < max_n && readable(r)) {
        uint32_t len;
        uint64_t keep_pos = r->pos;
        char *src = peek_frame(r, &len);
        PyObject *item = PyBytes_FromStringAndSize(src, len);
        if (!item || PyList_Append(out, item) < 0) {
            /* keep this message (and the rest) in the ring: only what the list holds was consumed */
            Py_XDECREF(item);
            r->pos = keep_pos;
            if (got) { publish_reader(r); PyErr_Clear(); return out; }
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
        r->pos += frame_bytes(len);
        got++;
    }
    if (got) publish_reader(r);
    return out;
}

/* try_get_records(out_buffer, record_bytes) -> number of records copied into out_buffer. */
static PyObject *Ring_try_get_records(Ring *r, PyObject *args) {
    PyObject *obj; Py_ssize_t rec; Py_buffer b;
    if (!PyArg_ParseTuple(args, "On", &obj, &rec)) return NULL;
    if (ring_check_role(r, 0) < 0) return NULL;
    if (PyObject_GetBuffer(obj, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (rec <= 0) { PyBuffer_Release(&b); PyErr_SetString(PyExc_ValueError, "record size must be > 0"); return NULL; }
    Py_ssize_t max_n = b.len / rec, got = 0;
    while (got < max_n && readable(r)) {
        uint64_t keep = r->pos; /* a wrap skipped by peek is re-done on the next call if we stop here */
        uint32_t len;
        char *src = peek_frame(r, &len);
        if (len != (uint32_t)rec) {
            r->pos = keep;
            if (got == 0) {
                PyBuffer_Release(&b);
                PyErr_Format(r->bad_record, "next message is %u bytes, not a %zd-byte record", len, rec);
                return NULL;
            }
            break;
        }
        memcpy((char *)b.buf + got * rec, src, (size_t)rec);
        r->pos += frame_bytes(len);
        got++;
    }
    if (got) publish_reader(r);
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(got);
}

/* wait(need_bytes, spin_s, timeout_s) -> bool. Writer: until a frame of need_bytes fits. Reader: until a
 * message is readable (need_bytes ignored). Spins for spin_s, then sleeps on the futex of the word that
 * must change: the writer's position for a reader; the slowest reader's position for the writer. */
static PyObject *Ring_wait(Ring *r, PyObject *args) {
    Py_ssize_t need_payload; double spin_s, timeout_s;
    if (!PyArg_ParseTuple(args, "ndd", &need_payload, &spin_s, &timeout_s)) return NULL;
    if (!r->has_view) { PyErr_SetString(PyExc_RuntimeError, "ring port is closed"); return NULL; }
    int writer = r->endpoint == -1, ok = 0;
    uint64_t need = frame_bytes((uint64_t)(need_payload < 0 ? 0 : need_payload));
    char *meta = writer ? w_meta(r) : r_meta(r, (uint32_t)r->endpoint);
    au32 *flag = meta_u32(meta, META_SLEEPING);
    Py_BEGIN_ALLOW_THREADS
    uint64_t t0 = now_ns();
    uint64_t spin_end = t0 + (uint64_t)(spin_s * 1e9), deadline = t0 + (uint64_t)(timeout_s * 1e9);
    for (;;) {
        if (writer ? has_space(r, need) : readable(r)) { ok = 1; break; }
        uint64_t t = now_ns();
        if (t >= deadline) break;
        if (t < spin_end) { spin_step(t, t0); continue; }
        au64 *word;
        if (writer) {
            uint32_t slowest = 0;
            min_reader_pos(r, &slowest);
            word = r_pos(r, slowest);
            atomic_store_explicit(meta_u32(meta, META_WAITING_ON), slowest, memory_order_relaxed);
        } else {
            word = w_pos(r);
        }
        uint64_t old = atomic_load_explicit(word, memory_order_acquire);
        atomic_store_explicit(flag, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        int do_sleep = !(writer ? has_space(r, need) : readable(r)) && atomic_load_explicit(word, memory_order_acquire) == old;
        if (do_sleep && writer) {
            /* The slowest reader may have changed since we named it in waiting_on: then its progress would not
             * wake us. Sleep only if the one we named is still the one holding the space. */
            uint32_t now_slowest = 0;
            min_reader_pos(r, &now_slowest);
            do_sleep = (int32_t)now_slowest ==
                    (int32_t)atomic_load_explicit(meta_u32(meta, META_WAITING_ON), memory_order_relaxed);
        }
        if (do_sleep) futex_wait_ns(low_half(word), (uint32_t)old, deadline - t);
        atomic_store_explicit(flag, 0, memory_order_relaxed);
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

static PyObject *Ring_release(Ring *r, PyObject *noargs) {
    (void)noargs;
    if (r->has_view) { PyBuffer_Release(&r->view); r->has_view = 0; }
    Py_RETURN_NONE;
}

static PyObject *Ring_get_pos(Ring *r, void *closure) { (void)closure; return PyLong_FromUnsignedLongLong(r->pos); }

static int Ring_init(Ring *r, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"buffer", "header_offset", "data_offset", "capacity", "nreaders", "max_payload",
                         "endpoint", "too_large", "bad_record", NULL};
    PyObject *obj, *tl, *br; Py_ssize_t hoff, doff; unsigned long long cap; unsigned int nr, maxp; int ep;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnnKIIiOO", kw, &obj, &hoff, &doff, &cap, &nr, &maxp, &ep, &tl, &br))
        return -1;
    if (r->has_view) { PyBuffer_Release(&r->view); r->has_view = 0; }
    if (PyObject_GetBuffer(obj, &r->view, PyBUF_WRITABLE) < 0) return -1;
    r->has_view = 1;
    if (cap == 0 || (cap & (cap - 1)) || hoff < 0 || hoff % LINE || doff % LINE ||
        doff < hoff + (Py_ssize_t)(3 + 2 * nr) * LINE || doff + (Py_ssize_t)cap > r->view.len || nr == 0 ||
        ep < -1 || ep >= (int)nr || (uint64_t)maxp + FRAME_HDR + 8 > cap / 2) {
        PyErr_SetString(PyExc_ValueError, "ring geometry does not fit the buffer or is inconsistent");
        return -1;
    }
    r->base = (char *)r->view.buf + hoff;
    r->data = (char *)r->view.buf + doff;
    r->cap = cap; r->mask = cap - 1; r->nreaders = nr; r->max_payload = maxp; r->endpoint = ep;
    Py_XSETREF(r->too_large, Py_NewRef(tl));
    Py_XSETREF(r->bad_record, Py_NewRef(br));
    if (ep == -1) {
        r->pos = atomic_load_explicit(w_pos(r), memory_order_acquire);
        r->seen = min_reader_pos(r, NULL);
    } else {
        r->pos = atomic_load_explicit(r_pos(r, (uint32_t)ep), memory_order_acquire);
        r->seen = atomic_load_explicit(w_pos(r), memory_order_acquire);
    }
    return 0;
}

static void Ring_dealloc(Ring *r) {
    if (r->has_view) PyBuffer_Release(&r->view);
    Py_XDECREF(r->too_large);
    Py_XDECREF(r->bad_record);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef Ring_methods[] = {
    {"try_put", (PyCFunction)Ring_try_put, METH_O, "Write one message if it fits; returns whether it did."},
    {"try_put_many", (PyCFunction)Ring_try_put_many, METH_VARARGS, "Write items[start:] while they fit."},
    {"try_put_records", (PyCFunction)Ring_try_put_records, METH_VARARGS, "Write fixed-size records while they fit."},
    {"try_get", (PyCFunction)Ring_try_get, METH_NOARGS, "Next message as bytes, or None if empty."},
    {"try_get_many", (PyCFunction)Ring_try_get_many, METH_O, "Up to n messages, as a list of bytes."},
    {"try_get_records", (PyCFunction)Ring_try_get_records, METH_VARARGS, "Copy fixed-size records into a buffer."},
    {"wait", (PyCFunction)Ring_wait, METH_VARARGS, "Spin, then sleep until the port can make progress."},
    {"release", (PyCFunction)Ring_release, METH_NOARGS, "Drop the buffer reference (before the mmap closes)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"pos", (getter)Ring_get_pos, NULL, "this endpoint's byte position", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpkv._native.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One endpoint (the writer or one reader) of a shared-memory ring.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

/* ------------------------------------------------------------------------------------------------ */

static PyMethodDef module_methods[] = {
    {"load_u64", py_load_u64, METH_VARARGS, "load_u64(buf, off): acquire load of a 64-bit word."},
    {"store_u64", py_store_u64, METH_VARARGS, "store_u64(buf, off, x): release store of a 64-bit word."},
    {"load_u32", py_load_u32, METH_VARARGS, "load_u32(buf, off): acquire load of a 32-bit word."},
    {"store_u32", py_store_u32, METH_VARARGS, "store_u32(buf, off, x): release store of a 32-bit word."},
    {"cas_u64", py_cas_u64, METH_VARARGS, "cas_u64(buf, off, expected, new) -> (swapped, value seen)."},
    {"fence", py_fence, METH_NOARGS, "Full (sequentially consistent) memory fence."},
    {"seq_write", py_seq_write, METH_VARARGS, "seq_write(buf, off, words): single-writer seqlock write."},
    {"seq_read", py_seq_read, METH_VARARGS, "seq_read(buf, off, n, timeout_s=1) -> (seq, *words): consistent read."},
    {"wait_word_change", py_wait_word_change, METH_VARARGS, "Eventcount wait until a word changes."},
    {"wait_any", py_wait_any, METH_VARARGS, "Sleep until one of several 32-bit words changes (futex_waitv)."},
    {"wait_any_refused", py_wait_any_refused, METH_NOARGS, "errno futex_waitv was refused with here, or 0."},
    {"copy_blocks", py_copy_blocks, METH_VARARGS, "Copy blocks between two [planes][blocks][bytes] pools."},
    {"futex_wake", py_futex_wake, METH_VARARGS, "futex_wake(buf, off): wake every sleeper on a 64-bit word."},
    {"store_notify", py_store_notify, METH_VARARGS, "Store a word and wake its flagged waiters."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "mpkv._native", NULL, -1, module_methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&RingType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) { Py_DECREF(&RingType); Py_DECREF(m); return NULL; }
    PyModule_AddIntConstant(m, "LINE_BYTES", LINE);
    PyModule_AddIntConstant(m, "FRAME_HEADER_BYTES", FRAME_HDR);
    PyModule_AddIntConstant(m, "META_SLEEPING", META_SLEEPING);
    PyModule_AddIntConstant(m, "META_WAITING_ON", META_WAITING_ON);
    return m;
}
