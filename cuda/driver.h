/* The CUDA driver, loaded at first use: libcuda.so.1 is opened with dlopen and every entry point is resolved by
 * version, so the library has no link-time dependency on the driver and builds on machines without one.
 *
 * Each pointer type below is the ABI of one versioned driver symbol, named like cudaTypedefs.h names it
 * (PFN_<name>_v<cuda version that introduced that ABI>); the version is what cuGetProcAddress is asked for.
 * Asking with the header's CUDA_VERSION instead would be wrong twice: a 13.0 header asks a 12.x driver for a
 * version it does not have (CUDA_ERROR_INVALID_VALUE), and for functions whose signature changed (cuCtxGetDevice
 * has a 13.0 ABI with a context argument, PFN_cuCtxGetDevice_v13000) it returns the new ABI while we call the
 * old one. */
#ifndef MPKV_CUDA_DRIVER_H
#define MPKV_CUDA_DRIVER_H

#include <stdint.h>
#include <cuda.h>

#if CUDA_VERSION < 12000
#error "cuda/ needs a cuda.h from CUDA 12.0 or later (cuGetProcAddress_v2, CUdriverProcAddressQueryResult)"
#endif

#define MPKV_EXPORT __attribute__((visibility("default")))

/* mpkv's own status codes; every other nonzero status is a CUresult. */
enum {
    MPKV_ENOLIB = -1, /* libcuda.so.1 could not be opened */
    MPKV_ENOSYM = -2, /* libcuda.so.1 lacks an entry point */
    MPKV_EINVAL = -3, /* an argument was refused before anything was issued */
};

typedef CUresult (*mpkv_pfn_cuInit_v2000)(unsigned int flags);
typedef CUresult (*mpkv_pfn_cuGetErrorName_v6000)(CUresult error, const char **str);
typedef CUresult (*mpkv_pfn_cuGetErrorString_v6000)(CUresult error, const char **str);
typedef CUresult (*mpkv_pfn_cuCtxGetDevice_v2000)(CUdevice *device);
typedef CUresult (*mpkv_pfn_cuDeviceGetAttribute_v2000)(int *value, CUdevice_attribute attrib, CUdevice dev);
typedef CUresult (*mpkv_pfn_cuMemcpy2DAsync_v3020)(const CUDA_MEMCPY2D *copy, CUstream stream);
typedef CUresult (*mpkv_pfn_cuMemcpyAsync_v4000)(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream);
typedef CUresult (*mpkv_pfn_cuMemGetAllocationGranularity_v10020)(size_t *granularity, const CUmemAllocationProp *prop,
                                                                  CUmemAllocationGranularity_flags option);
typedef CUresult (*mpkv_pfn_cuMemAddressReserve_v10020)(CUdeviceptr *ptr, size_t size, size_t alignment,
                                                        CUdeviceptr addr, unsigned long long flags);
typedef CUresult (*mpkv_pfn_cuMemAddressFree_v10020)(CUdeviceptr ptr, size_t size);
typedef CUresult (*mpkv_pfn_cuMemCreate_v10020)(CUmemGenericAllocationHandle *handle, size_t size,
                                                const CUmemAllocationProp *prop, unsigned long long flags);
typedef CUresult (*mpkv_pfn_cuMemRelease_v10020)(CUmemGenericAllocationHandle handle);
typedef CUresult (*mpkv_pfn_cuMemMap_v10020)(CUdeviceptr ptr, size_t size, size_t offset,
                                             CUmemGenericAllocationHandle handle, unsigned long long flags);
typedef CUresult (*mpkv_pfn_cuMemUnmap_v10020)(CUdeviceptr ptr, size_t size);
typedef CUresult (*mpkv_pfn_cuMemSetAccess_v10020)(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc,
                                                   size_t count);
typedef CUresult (*mpkv_pfn_cuMemExportToShareableHandle_v10020)(void *shareable, CUmemGenericAllocationHandle handle,
                                                                 CUmemAllocationHandleType type,
                                                                 unsigned long long flags);
typedef CUresult (*mpkv_pfn_cuMemImportFromShareableHandle_v10020)(CUmemGenericAllocationHandle *handle,
                                                                   void *os_handle, CUmemAllocationHandleType type);

struct mpkv_driver {
    mpkv_pfn_cuInit_v2000 cuInit;
    mpkv_pfn_cuGetErrorName_v6000 cuGetErrorName;
    mpkv_pfn_cuGetErrorString_v6000 cuGetErrorString;
    mpkv_pfn_cuCtxGetDevice_v2000 cuCtxGetDevice;
    mpkv_pfn_cuDeviceGetAttribute_v2000 cuDeviceGetAttribute;
    mpkv_pfn_cuMemcpy2DAsync_v3020 cuMemcpy2DAsync;
    mpkv_pfn_cuMemcpyAsync_v4000 cuMemcpyAsync;
    mpkv_pfn_cuMemGetAllocationGranularity_v10020 cuMemGetAllocationGranularity;
    mpkv_pfn_cuMemAddressReserve_v10020 cuMemAddressReserve;
    mpkv_pfn_cuMemAddressFree_v10020 cuMemAddressFree;
    mpkv_pfn_cuMemCreate_v10020 cuMemCreate;
    mpkv_pfn_cuMemRelease_v10020 cuMemRelease;
    mpkv_pfn_cuMemMap_v10020 cuMemMap;
    mpkv_pfn_cuMemUnmap_v10020 cuMemUnmap;
    mpkv_pfn_cuMemSetAccess_v10020 cuMemSetAccess;
    mpkv_pfn_cuMemExportToShareableHandle_v10020 cuMemExportToShareableHandle;
    mpkv_pfn_cuMemImportFromShareableHandle_v10020 cuMemImportFromShareableHandle;
};

/* Loads the driver once per process (thread-safe) and returns 0 with *out set, or the status that every later call
 * returns too: MPKV_ENOLIB, MPKV_ENOSYM, or cuInit's CUresult. */
int mpkv_driver(const struct mpkv_driver **out);

#endif
