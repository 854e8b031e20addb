/* A stand-in libcuda.so.1 for tests/test_cuda_build.py: it records every call the library makes (to the file
 * $STAND_IN_LOG, one line per call) so the test can check, without a GPU, which versioned entry points are asked
 * for and which copies are issued. $STAND_IN_MODE selects behaviour: "nogpa" (cuGetProcAddress_v2 finds nothing:
 * the dlsym path), "refuse2d" (cuMemcpy2DAsync returns CUDA_ERROR_INVALID_VALUE), "fail:<name>" (that function
 * returns CUDA_ERROR_OUT_OF_MEMORY); $STAND_IN_MAX_PITCH the device's pitch limit. */
#define _POSIX_C_SOURCE 200809L
#include <cuda.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...) {
    FILE *f = fopen(getenv("STAND_IN_LOG"), "a");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static int mode(const char *m) {
    const char *v = getenv("STAND_IN_MODE");
    return v != NULL && strcmp(v, m) == 0;
}

static CUresult result(const char *name) {
    char want[128];
    snprintf(want, sizeof want, "fail:%s", name);
    return mode(want) ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS;
}

#define U(x) ((unsigned long long)(x))

CUresult cuInit(unsigned int flags) { say("cuInit %u", flags); return CUDA_SUCCESS; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = e == CUDA_ERROR_OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_X"; return CUDA_SUCCESS; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = e == CUDA_ERROR_OUT_OF_MEMORY ? "out of memory" : "x"; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; say("cuCtxGetDevice"); return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) {
    const char *p = getenv("STAND_IN_MAX_PITCH");
    *v = a == CU_DEVICE_ATTRIBUTE_MAX_PITCH ? (p ? atoi(p) : 2147483647) : 0;
    say("cuDeviceGetAttribute %d %d", (int)a, (int)d);
    return CUDA_SUCCESS;
}
CUresult cuMemcpy2DAsync_v2(const CUDA_MEMCPY2D *c, CUstream s) {
    say("cuMemcpy2DAsync types=%d,%d src=%llx+%zu,%zu spitch=%zu dst=%llx+%zu,%zu dpitch=%zu w=%zu h=%zu stream=%llx",
        (int)c->srcMemoryType, (int)c->dstMemoryType, U(c->srcDevice), c->srcXInBytes, c->srcY, c->srcPitch,
        U(c->dstDevice), c->dstXInBytes, c->dstY, c->dstPitch, c->WidthInBytes, c->Height, U(s));
    return mode("refuse2d") ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}
CUresult cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream st) {
    say("cuMemcpyAsync dst=%llx src=%llx n=%zu stream=%llx", U(d), U(s), n, U(st));
    return CUDA_SUCCESS;
}
CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *p, CUmemAllocationGranularity_flags o) {
    say("cuMemGetAllocationGranularity type=%d handles=%d loc=%d:%d option=%d", (int)p->type,
        (int)p->requestedHandleTypes, (int)p->location.type, p->location.id, (int)o);
    *g = 2u << 20;
    return result("cuMemGetAllocationGranularity");
}
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long f) {
    say("cuMemAddressReserve size=%zu align=%zu addr=%llx flags=%llu", size, align, U(addr), f);
    *p = 0x7f0000000000ull;
    return result("cuMemAddressReserve");
}
CUresult cuMemAddressFree(CUdeviceptr p, size_t size) { say("cuMemAddressFree %llx %zu", U(p), size); return CUDA_SUCCESS; }
CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *p, unsigned long long f) {
    say("cuMemCreate size=%zu type=%d handles=%d loc=%d:%d flags=%llu", size, (int)p->type,
        (int)p->requestedHandleTypes, (int)p->location.type, p->location.id, f);
    *h = 0x1234;
    return result("cuMemCreate");
}
CUresult cuMemRelease(CUmemGenericAllocationHandle h) { say("cuMemRelease %llx", U(h)); return CUDA_SUCCESS; }
CUresult cuMemMap(CUdeviceptr p, size_t size, size_t off, CUmemGenericAllocationHandle h, unsigned long long f) {
    say("cuMemMap %llx %zu off=%zu h=%llx flags=%llu", U(p), size, off, U(h), f);
    return result("cuMemMap");
}
CUresult cuMemUnmap(CUdeviceptr p, size_t size) { say("cuMemUnmap %llx %zu", U(p), size); return result("cuMemUnmap"); }
CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t n) {
    say("cuMemSetAccess %llx %zu loc=%d:%d flags=%d n=%zu", U(p), size, (int)d->location.type, d->location.id,
        (int)d->flags, n);
    return result("cuMemSetAccess");
}
CUresult cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, CUmemAllocationHandleType t,
                                      unsigned long long f) {
    say("cuMemExportToShareableHandle h=%llx type=%d flags=%llu", U(h), (int)t, f);
    if (mode("fail:cuMemExportToShareableHandle"))
        return CUDA_ERROR_OUT_OF_MEMORY;
    *(int *)out = open("/dev/null", O_RDONLY);
    return CUDA_SUCCESS;
}
CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *h, void *os, CUmemAllocationHandleType t) {
    say("cuMemImportFromShareableHandle fd=%d type=%d", (int)(intptr_t)os, (int)t);
    *h = 0x5678;
    return result("cuMemImportFromShareableHandle");
}

/* The CUDA IPC calls mpkv/pool/cuda_driver.py makes through ctypes (by their exported names, no cuGetProcAddress):
 * the handle's bytes start with a NUL and cover every value a byte takes in it, so a marshalling that stops at a
 * NUL or reorders bytes shows in the log of the open. */
#define ALLOC_PTR 0x7e0000000000ull
#define IMPORT_PTR 0x7e1000000000ull
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { say("cuMemAlloc_v2 %zu", n); *p = ALLOC_PTR; return result("cuMemAlloc_v2"); }
CUresult cuMemFree_v2(CUdeviceptr p) { say("cuMemFree_v2 %llx", U(p)); return result("cuMemFree_v2"); }
CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr p) {
    for (int i = 0; i < CU_IPC_HANDLE_SIZE; i++)
        h->reserved[i] = (char)((p & 0xff) + i * 37);
    say("cuIpcGetMemHandle %llx", U(p));
    return result("cuIpcGetMemHandle");
}
CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, CUipcMemHandle h, unsigned int flags) {
    char hex[2 * CU_IPC_HANDLE_SIZE + 1];
    for (int i = 0; i < CU_IPC_HANDLE_SIZE; i++)
        snprintf(hex + 2 * i, 3, "%02x", (unsigned char)h.reserved[i]);
    say("cuIpcOpenMemHandle_v2 %s flags=%u", hex, flags);
    *p = IMPORT_PTR;
    return result("cuIpcOpenMemHandle_v2");
}
CUresult cuIpcCloseMemHandle(CUdeviceptr p) { say("cuIpcCloseMemHandle %llx", U(p)); return result("cuIpcCloseMemHandle"); }
CUresult cuMemHostAlloc(void **p, size_t n, unsigned int flags) {
    say("cuMemHostAlloc %zu flags=%u", n, flags);
    *p = calloc(1, n);
    return result("cuMemHostAlloc");
}
CUresult cuMemFreeHost(void *p) { say("cuMemFreeHost"); free(p); return result("cuMemFreeHost"); }

struct row { const char *name; void *fn; };
#define ROW(name, fn) {name, (void *)fn}
static const struct row rows[] = {
    ROW("cuInit", cuInit), ROW("cuGetErrorName", cuGetErrorName), ROW("cuGetErrorString", cuGetErrorString),
    ROW("cuCtxGetDevice", cuCtxGetDevice), ROW("cuDeviceGetAttribute", cuDeviceGetAttribute),
    ROW("cuMemcpy2DAsync", cuMemcpy2DAsync_v2), ROW("cuMemcpyAsync", cuMemcpyAsync),
    ROW("cuMemGetAllocationGranularity", cuMemGetAllocationGranularity),
    ROW("cuMemAddressReserve", cuMemAddressReserve), ROW("cuMemAddressFree", cuMemAddressFree),
    ROW("cuMemCreate", cuMemCreate), ROW("cuMemRelease", cuMemRelease), ROW("cuMemMap", cuMemMap),
    ROW("cuMemUnmap", cuMemUnmap), ROW("cuMemSetAccess", cuMemSetAccess),
    ROW("cuMemExportToShareableHandle", cuMemExportToShareableHandle),
    ROW("cuMemImportFromShareableHandle", cuMemImportFromShareableHandle),
};

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                             CUdriverProcAddressQueryResult *status) {
    say("cuGetProcAddress_v2 %s %d %llu", symbol, version, U(flags));
    *pfn = NULL;
    *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    for (size_t i = 0; !mode("nogpa") && i < sizeof rows / sizeof rows[0]; i++)
        if (strcmp(rows[i].name, symbol) == 0) {
            *pfn = rows[i].fn;
            *status = CU_GET_PROC_ADDRESS_SUCCESS;
        }
    return CUDA_SUCCESS;
}
