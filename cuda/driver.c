/* Loading libcuda.so.1 at first use, and mpkv_cuda_error. See driver.h for why each entry point is asked for by
 * the version that introduced its ABI. */
#define _POSIX_C_SOURCE 200809L

#include "driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>

/* Where the toolkit ships cudaTypedefs.h, check at compile time that each ABI we call is the driver's. */
#if defined(__has_include)
#if __has_include(<cudaTypedefs.h>)
#include <cudaTypedefs.h>
#define MPKV_SAME_ABI(ours, theirs) \
    _Static_assert(__builtin_types_compatible_p(ours, theirs), #ours " differs from cudaTypedefs.h's " #theirs)
MPKV_SAME_ABI(mpkv_pfn_cuInit_v2000, PFN_cuInit_v2000);
MPKV_SAME_ABI(mpkv_pfn_cuGetErrorName_v6000, PFN_cuGetErrorName_v6000);
MPKV_SAME_ABI(mpkv_pfn_cuGetErrorString_v6000, PFN_cuGetErrorString_v6000);
MPKV_SAME_ABI(mpkv_pfn_cuCtxGetDevice_v2000, PFN_cuCtxGetDevice_v2000);
MPKV_SAME_ABI(mpkv_pfn_cuDeviceGetAttribute_v2000, PFN_cuDeviceGetAttribute_v2000);
MPKV_SAME_ABI(mpkv_pfn_cuMemcpy2DAsync_v3020, PFN_cuMemcpy2DAsync_v3020);
MPKV_SAME_ABI(mpkv_pfn_cuMemcpyAsync_v4000, PFN_cuMemcpyAsync_v4000);
MPKV_SAME_ABI(mpkv_pfn_cuMemGetAllocationGranularity_v10020, PFN_cuMemGetAllocationGranularity_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemAddressReserve_v10020, PFN_cuMemAddressReserve_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemAddressFree_v10020, PFN_cuMemAddressFree_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemCreate_v10020, PFN_cuMemCreate_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemRelease_v10020, PFN_cuMemRelease_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemMap_v10020, PFN_cuMemMap_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemUnmap_v10020, PFN_cuMemUnmap_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemSetAccess_v10020, PFN_cuMemSetAccess_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemExportToShareableHandle_v10020, PFN_cuMemExportToShareableHandle_v10020);
MPKV_SAME_ABI(mpkv_pfn_cuMemImportFromShareableHandle_v10020, PFN_cuMemImportFromShareableHandle_v10020);
MPKV_SAME_ABI(PFN_cuGetProcAddress_v12000, CUresult (*)(const char *, void **, int, cuuint64_t,
                                                        CUdriverProcAddressQueryResult *));
#endif
#endif

typedef CUresult (*pfn_cuGetProcAddress_v12000)(const char *symbol, void **pfn, int cuda_version, cuuint64_t flags,
                                                 CUdriverProcAddressQueryResult *status);

/* One row per entry point: the base name cuGetProcAddress takes, the CUDA version of the ABI we call, the name the
 * library exports for exactly that ABI (for dlsym when cuGetProcAddress_v2 is absent or finds nothing), and where
 * the pointer goes. */
struct entry {
    const char *name;
    int version;
    const char *exported;
    size_t offset;
};

#define ENTRY(name, version, exported) {#name, version, exported, offsetof(struct mpkv_driver, name)}
static const struct entry entries[] = {
    ENTRY(cuInit, 2000, "cuInit"),
    ENTRY(cuGetErrorName, 6000, "cuGetErrorName"),
    ENTRY(cuGetErrorString, 6000, "cuGetErrorString"),
    ENTRY(cuCtxGetDevice, 2000, "cuCtxGetDevice"),
    ENTRY(cuDeviceGetAttribute, 2000, "cuDeviceGetAttribute"),
    ENTRY(cuMemcpy2DAsync, 3020, "cuMemcpy2DAsync_v2"),
    ENTRY(cuMemcpyAsync, 4000, "cuMemcpyAsync"),
    ENTRY(cuMemGetAllocationGranularity, 10020, "cuMemGetAllocationGranularity"),
    ENTRY(cuMemAddressReserve, 10020, "cuMemAddressReserve"),
    ENTRY(cuMemAddressFree, 10020, "cuMemAddressFree"),
    ENTRY(cuMemCreate, 10020, "cuMemCreate"),
    ENTRY(cuMemRelease, 10020, "cuMemRelease"),
    ENTRY(cuMemMap, 10020, "cuMemMap"),
    ENTRY(cuMemUnmap, 10020, "cuMemUnmap"),
    ENTRY(cuMemSetAccess, 10020, "cuMemSetAccess"),
    ENTRY(cuMemExportToShareableHandle, 10020, "cuMemExportToShareableHandle"),
    ENTRY(cuMemImportFromShareableHandle, 10020, "cuMemImportFromShareableHandle"),
};

/* Written once, inside pthread_once; read only after pthread_once returned (which orders the reads after it). */
static pthread_once_t once = PTHREAD_ONCE_INIT;
static struct mpkv_driver driver;
static int status;
static char why[512];

static void *resolve(void *lib, pfn_cuGetProcAddress_v12000 gpa, const struct entry *e) {
    void *fn = NULL;
    if (gpa != NULL) {
        CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
        /* LEGACY_STREAM: stream 0 is the legacy default stream, as it is for torch; the default flag would pick
         * the per-thread (_ptsz) variants in a process built for per-thread default streams. */
        if (gpa(e->name, &fn, e->version, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &found) != CUDA_SUCCESS ||
            found != CU_GET_PROC_ADDRESS_SUCCESS)
            fn = NULL;
    }
    if (fn == NULL)
        fn = dlsym(lib, e->exported);
    return fn;
}

static void load(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        const char *err = dlerror();
        snprintf(why, sizeof why, "libcuda.so.1 could not be loaded (%s): is the NVIDIA driver installed here?",
                 err ? err : "no reason given");
        status = MPKV_ENOLIB;
        return;
    }
    /* Never dlclosed: the driver stays loaded for the life of the process, as torch keeps it too. */
    pfn_cuGetProcAddress_v12000 gpa = NULL;
    *(void **)&gpa = dlsym(lib, "cuGetProcAddress_v2");
    for (size_t i = 0; i < sizeof entries / sizeof entries[0]; i++) {
        void *fn = resolve(lib, gpa, &entries[i]);
        if (fn == NULL) {
            snprintf(why, sizeof why,
                     "libcuda.so.1 has no entry point %s (CUDA %d.%d ABI): the NVIDIA driver is too old for mpkv",
                     entries[i].name, entries[i].version / 1000, entries[i].version % 1000 / 10);
            status = MPKV_ENOSYM;
            return;
        }
        *(void **)((char *)&driver + entries[i].offset) = fn;
    }
    status = (int)driver.cuInit(0);
}

int mpkv_driver(const struct mpkv_driver **out) {
    pthread_once(&once, load);
    *out = status == 0 ? &driver : NULL;
    return status;
}

MPKV_EXPORT const char *mpkv_cuda_error(int code) {
    static _Thread_local char text[320];
    const struct mpkv_driver *d;
    switch (code) {
    case 0:
        return "no error";
    case MPKV_EINVAL:
        return "bad argument, refused before anything was issued (a negative block id, a zero count, a run past "
               "the end of its pool's plane, an offset that overflows 64 bits, or a null or negative handle)";
    case MPKV_ENOLIB:
    case MPKV_ENOSYM:
        /* The detailed reason (dlerror's text, the missing name) is this process's; a code from elsewhere gets the
         * generic one. */
        if (mpkv_driver(&d) == code)
            return why;
        return code == MPKV_ENOLIB ? "libcuda.so.1 could not be loaded" : "libcuda.so.1 lacks an entry point";
    default:
        break;
    }
    if (code < 0)
        return "unknown mpkv status code";
    /* A CUresult. cuInit's own failure leaves the table unusable, but the two describing functions were resolved
     * before it ran: use them whenever the library loaded. */
    mpkv_driver(&d);
    const char *name = NULL, *str = NULL;
    if (driver.cuGetErrorName != NULL && driver.cuGetErrorString != NULL &&
        driver.cuGetErrorName((CUresult)code, &name) == CUDA_SUCCESS &&
        driver.cuGetErrorString((CUresult)code, &str) == CUDA_SUCCESS && name != NULL && str != NULL)
        snprintf(text, sizeof text, "%s: %s", name, str);
    else
        snprintf(text, sizeof text, "CUDA error %d (the driver could not describe it)", code);
    return text;
}
